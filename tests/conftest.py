from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pytest_configure(config: pytest.Config) -> None:
    # Also for module-scoped fixtures, which run before the per-test environment below.
    os.environ["TLFEAT_BACKEND"] = "torch"
    # ONNX exports: one model cache for the session, as on a user's machine (never the user's own);
    # a test that inspects or damages exports sets its own with monkeypatch.
    os.environ["TLFEAT_MODEL_CACHE"] = tempfile.mkdtemp(prefix="tlfeat-models-")
    os.environ["TLFEAT_RESULTS_DIR"] = tempfile.mkdtemp(prefix="tlfeat-results-")  # never ./results


def pytest_unconfigure(config: pytest.Config) -> None:
    for name in ("TLFEAT_MODEL_CACHE", "TLFEAT_RESULTS_DIR"):
        shutil.rmtree(os.environ.get(name, ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No torchvision downloads, and a per-test cache directory; registry files stay shared."""
    monkeypatch.setenv("TLFEAT_OFFLINE", "1")
    monkeypatch.setenv("TLFEAT_BACKEND", "torch")  # tests of the ONNX Runtime backend ask for it by name
    monkeypatch.setenv("TLFEAT_CACHE_DIR", str(tmp_path / "features_cache"))
    monkeypatch.setenv("TLFEAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TLFEAT_RESULTS_DIR", str(tmp_path / "results"))


def _pattern(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0: horizontal stripes, class 1: vertical stripes, class 2: a bright disc; plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == 0:
        img = 127 + 120 * np.sin(yy / 2.0)
    elif kind == 1:
        img = 127 + 120 * np.sin(xx / 2.0)
    else:
        img = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2, 230.0, 25.0)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def make_tree(
    root: Path,
    per_class: int = 4,
    classes: tuple[str, ...] = ("bees", "ants", "disc"),
    splits: tuple[str, ...] = ("train", "val"),
    size: int = 40,
) -> Path:
    """A tiny image folder tree in mixed formats: RGB JPEG, grey PNG, RGBA PNG, 16-bit PNG."""
    rng = np.random.default_rng(0)
    for split in splits:
        for kind, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                grey = _pattern(kind, size, rng)
                fmt = i % 4
                if fmt == 0:
                    Image.fromarray(np.stack([grey] * 3, -1)).save(folder / f"{i}.jpg", quality=95)
                elif fmt == 1:
                    Image.fromarray(grey, "L").save(folder / f"{i}.png")
                elif fmt == 2:
                    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
                    Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
                else:
                    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / f"{i}.png")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "bugs")
