"""Fitting on features larger than the memory a fit may use: streamed from the HDF5 file, block by block."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tlfeat import cache
from tlfeat.fitting import FitConfig, fit
from tlfeat.writer import Listing, Writer

from ..robustness.helpers import env

N, D, K = 50_000, 256, 5  # 51 MB of train features (57 MB with the index)


def _write(root: Path, split: str, n: int, rng: np.random.Generator, centers: np.ndarray) -> None:
    y = rng.integers(0, K, n)
    listing = Listing(
        [f"{split}/{i}" for i in range(n)], y, [str(c) for c in range(K)], np.zeros((n, 2), np.int64), "synthetic"
    )
    attrs = {
        "model": "synthetic", "dataset": "synthetic", "split": split, "layer": "penultimate", "weights_id": "none",
        "pooling": "global-average", "preprocessing": "{}", "backend": "none", "precision": "fp32", "label_field": "cls",
        "limit": 0, "created": "now",
    }  # fmt: skip
    writer = Writer(root / f"synthetic__synthetic__{split}__{split:0<16}.h5", split, attrs, listing, flush_every=16384)
    for s in range(0, n, 8192):
        yb = y[s : s + 8192]
        writer.append((centers[yb] * 0.25 + rng.normal(0, 1, (len(yb), D))).astype(np.float32))
    writer.finish({})


def _synthetic(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (K, D))
    _write(root, "train", n, rng, centers)
    _write(root, "test", 5000, rng, centers)
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("ooc"), N)


@pytest.fixture(scope="module")
def synthetic_twice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("ooc2"), 2 * N)


# argv: CACHE_DIR RESULTS_DIR CLF OPTIONS_JSON. Fits in a fresh process and prints its route, accuracy
# and how far its resident memory (RSS: numpy, HDF5's buffers, torch, everything) rose above what
# it held once the libraries a fit uses were imported.
MEASURED_FIT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import h5py, numpy, scipy.optimize, sklearn.linear_model, sklearn.model_selection, sklearn.svm, torch
    from tlfeat.fitting import FitConfig, fit

    def kb(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

    cache_dir, results, clf, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # 2 threads' buffers on any machine
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak (VmHWM) starts again from here
    base = kb("VmRSS")
    trained = {"epochs": 3} if clf == "linear" else {}  # logistic regression and the SVM take no epochs
    config = FitConfig(clf=clf, C=0.1, cache_dir=Path(cache_dir), results_dir=Path(results), **trained, **options)
    [result] = fit(config, allow_stale=True)
    record = result.record
    grown = (kb("VmHWM") - base) * 1024
    print(json.dumps({"accuracy": record.metrics["accuracy"], "route": record.details["route"], "grown": grown}))
    """
)


def _fit(root: Path, clf: str, **kw: object) -> tuple[float, str, int]:
    results = root / "results" / f"{clf}-{'-'.join(map(str, kw.values()))}"
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED_FIT, str(root), str(results), clf, json.dumps(kw)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["accuracy"], out["route"], out["grown"]


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*__train__*.h5"))


@pytest.mark.slow
@pytest.mark.parametrize("clf", ["logreg", "svm", "linear"])
def test_streaming_fit_matches_the_in_memory_fit_in_memory_that_does_not_grow_with_the_rows(
    synthetic: Path, synthetic_twice: Path, clf: str
) -> None:
    """RSS of the whole process. In memory it rises by more than the file; streamed, by a fixed amount
    (libraries' buffers, the C search's subset, a few blocks per thread; torch's own for the linear
    head) plus the index (ids, labels, fingerprints: about 130 bytes a row, 13% of these 1 KB rows),
    so twice the rows add little. Measured on 2 CPUs for 57 and 114 MB files: logreg 57 -> 63 MB,
    svm 55 -> 64 MB, linear head 206 -> 211 MB (from one run to the next torch's share moves by ~10 MB);
    in memory 194, 452 and 283 MB for the smaller file."""
    size, size_twice = _size(synthetic), _size(synthetic_twice)
    accuracy, route, grown = _fit(synthetic, clf, route="memory")
    assert route == "memory" and grown > size, (
        f"in memory, RSS rose {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    )
    # The memory allowance (10 MB) is a sixth of the file: `auto` streams it.
    s_accuracy, s_route, s_grown = _fit(synthetic, clf, memory_gb=0.01)
    assert s_route == "streaming" and abs(s_accuracy - accuracy) <= 0.002, (accuracy, s_accuracy)
    *_, s_grown_twice = _fit(synthetic_twice, clf, memory_gb=0.01)
    print(
        f"{clf}: RSS rose {grown / 1e6:.0f} MB in memory, {s_grown / 1e6:.0f} -> {s_grown_twice / 1e6:.0f} MB streamed"
    )
    more = s_grown_twice - s_grown
    assert more < 0.5 * (size_twice - size), (
        f"streamed, {(size_twice - size) / 1e6:.0f} MB more rows took {more / 1e6:.0f} MB more"
    )


def test_lazy_features_stream_in_blocks(synthetic: Path) -> None:
    path = next(synthetic.glob("*__test__*.h5"))
    full, lazy = cache.read(path), cache.read(path, lazy=True)
    assert lazy.X.shape == full.X.shape and not isinstance(lazy.X, np.ndarray)
    assert np.array_equal(lazy.X[10:20], full.X[10:20]) and np.array_equal(lazy.X[[7, 3, 3]], full.X[[7, 3, 3]])
    stacked = np.concatenate([X for X, _ in lazy.iter_batches(1000)])
    assert np.array_equal(stacked, full.X) and np.array_equal(np.asarray(lazy.X), full.X)


def test_a_lazy_set_refuses_to_read_a_file_replaced_after_it_was_loaded(synthetic: Path, tmp_path: Path) -> None:
    import shutil

    from tlfeat.errors import CacheMismatch

    path = tmp_path / next(synthetic.glob("*__test__*.h5")).name
    shutil.copyfile(next(synthetic.glob("*__test__*.h5")), path)
    lazy = cache.read(path, lazy=True)
    first = np.asarray(lazy.X[:5])
    replacement = tmp_path / "other.h5"
    shutil.copyfile(path, replacement)
    replacement.replace(path)  # what an update does: a new file renamed over the old name
    with pytest.raises(CacheMismatch, match="replaced after these features were loaded"):
        lazy.X[:5]
    assert np.array_equal(cache.read(path, lazy=True).X[:5], first)  # loaded again, it reads


def test_an_rbf_svm_is_refused_on_the_streamed_route(synthetic: Path) -> None:
    from tlfeat.errors import TlfeatError

    with pytest.raises(TlfeatError, match="svm-rbf has no streamed fit"):
        fit(FitConfig(clf="svm", kernel="rbf", route="streaming", cache_dir=synthetic, results_dir=synthetic / "r"))
    with pytest.raises(TlfeatError, match="do not fit --memory-gb"):
        fit(FitConfig(clf="svm", kernel="rbf", memory_gb=0.01, cache_dir=synthetic, results_dir=synthetic / "r"))
