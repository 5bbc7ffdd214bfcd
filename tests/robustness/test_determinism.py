"""The same command twice gives bit-identical features and identical metrics, whatever the worker count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tlfeat import cache, catalog

from ..conftest import make_tree
from .helpers import FAST, cli, env


def test_same_command_twice_is_bit_identical(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=12)
    runs = []
    for run, workers in (("a", "0"), ("b", "2")):
        cache_dir, results = tmp_path / run / "cache", tmp_path / run / "results"
        extracted = cli("extract", "--data", tree, *FAST, "--workers", workers, "--cache-dir", cache_dir)
        assert extracted.returncode == 0, extracted.stderr
        records = []
        for clf in ("logreg", "linear"):
            fitted = cli("fit", "--clf", clf, "--json", "--cache-dir", cache_dir, "--results-dir", results)
            assert fitted.returncode == 0, fitted.stderr
            records += json.loads(fitted.stdout)
        sets = {e.attrs["split"]: cache.read(e.path) for e in catalog.scan(cache_dir)}
        runs.append((sets, records))
    (sets_a, records_a), (sets_b, records_b) = runs
    for split in ("train", "test"):
        assert sets_a[split].meta["features_sha256"] == sets_b[split].meta["features_sha256"]
        assert np.array_equal(sets_a[split].X, sets_b[split].X)
    for a, b in zip(records_a, records_b, strict=True):
        assert a["metrics"] == b["metrics"] and a["params"] == b["params"], a["method"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_the_batch_size_does_not_change_a_bit(tmp_path: Path, backend: str) -> None:
    """Images share a forward pass with other neighbours at each batch size (5: 5 + 5 + 2; 12: all at once);
    the network still runs in fixed-size micro-batches, so every image's features are the same bits."""
    tree = make_tree(tmp_path / "tree", per_class=4)
    features = []
    for batch in ("5", "12"):
        cache_dir = tmp_path / f"batch{batch}"
        args = ["extract", "--data", tree, "--model", "mobilenet_v2", "--untrained", "--image-size", "64"]
        proc = cli(*args, "--workers", "0", "-q", "--split", "train", "--batch-size", batch, "--cache-dir", cache_dir,
                   env=env(TLFEAT_BACKEND=backend))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        [entry] = catalog.scan(cache_dir)
        features.append(cache.read(entry.path).X)
    assert all(np.array_equal(features[0], other) for other in features[1:])
