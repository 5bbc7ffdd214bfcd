"""Fitting on features larger than the memory a fit may use: streamed from the HDF5 file, block by block."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tlfeat import cache
from tlfeat.fitting import FitConfig, fit
from tlfeat.writer import Listing, Writer

N, D, K = 60_000, 256, 5  # 61 MB of train features


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


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ooc")
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (K, D))
    _write(root, "train", N, rng, centers)
    _write(root, "test", 5000, rng, centers)
    return root


def _fit(root: Path, clf: str, **kw: object) -> tuple[float, str, float]:
    tracemalloc.start()
    [result] = fit(
        FitConfig(clf=clf, C=0.1, epochs=3, cache_dir=root, results_dir=root / "results", **kw), allow_stale=True
    )  # type: ignore[arg-type]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result.record.metrics["accuracy"], result.record.details["route"], peak


@pytest.mark.slow
@pytest.mark.parametrize("clf", ["logreg", "svm", "linear"])
def test_streaming_fit_matches_the_in_memory_fit_at_a_fraction_of_the_memory(synthetic: Path, clf: str) -> None:
    size = sum(p.stat().st_size for p in synthetic.glob("*__train__*.h5"))
    accuracy, route, peak = _fit(synthetic, clf, route="memory")
    assert route == "memory" and peak > size  # the matrix was in memory
    # The memory allowance (10 MB) is a sixth of the file: `auto` streams it.
    s_accuracy, s_route, s_peak = _fit(synthetic, clf, memory_gb=0.01)
    assert s_route == "streaming"
    assert s_peak < size / 2, f"streaming held {s_peak / 1e6:.0f} MB of a {size / 1e6:.0f} MB file"
    assert abs(s_accuracy - accuracy) <= 0.002, (accuracy, s_accuracy)


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

    with pytest.raises(TlfeatError, match="--kernel rbf has no streamed fit"):
        fit(FitConfig(clf="svm", kernel="rbf", route="streaming", cache_dir=synthetic, results_dir=synthetic / "r"))
    with pytest.raises(TlfeatError, match="do not fit --memory-gb"):
        fit(FitConfig(clf="svm", kernel="rbf", memory_gb=0.01, cache_dir=synthetic, results_dir=synthetic / "r"))
