from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Every place a library keeps downloads or caches, moved into one folder per test session, so no
# test depends on what a developer's machine happens to hold (weights in the torch hub cache,
# exports, remembered hashes) and no test leaves anything there. Only the registry downloads
# (verified by sha256, see tlfeat.offline) are shared between sessions: see `_share_downloads`.
HOMES = {
    "TLFEAT_HOME": "tlfeat-home",
    "TORCH_HOME": "torch-home",
    "XDG_CACHE_HOME": "xdg-cache",
    "HF_HOME": "hf-home",
    "MPLCONFIGDIR": "matplotlib",
}
SESSION: dict[str, Path] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Set before collection, so module-scoped fixtures see it too (the per-test fixture comes later).
    shared = _downloads()
    for name in [
        n for n in os.environ if n.startswith("TLFEAT_") or n in ("RAY_ADDRESS", "HYPOTHESIS_STORAGE_DIRECTORY")
    ]:
        if name not in ("TLFEAT_TEST_DOWNLOADS", "TLFEAT_FUZZ_EXAMPLES", "TLFEAT_FUZZ_TIMES"):
            del os.environ[name]  # a developer's settings must not change what the tests see
    root = Path(tempfile.mkdtemp(prefix="tlfeat-tests-"))
    SESSION["root"] = root
    for name, folder in HOMES.items():
        (root / folder).mkdir()
        os.environ[name] = str(root / folder)
    _share_downloads(shared, root / HOMES["TLFEAT_HOME"] / "registry")
    os.environ.update(
        TLFEAT_OFFLINE="1",
        TLFEAT_BACKEND="torch",  # tests of the ONNX Runtime backend ask for it by name
        TLFEAT_CACHE_DIR=str(root / "features_cache"),
        TLFEAT_RESULTS_DIR=str(root / "results"),  # never ./results
        TLFEAT_DATA_DIR=str(root / "data"),
        TLFEAT_MODEL_CACHE=str(root / "models"),  # ONNX exports: one model cache per session, as on a user's machine
    )
    _hypothesis_profile()


def pytest_unconfigure(config: pytest.Config) -> None:
    if "root" in SESSION:
        shutil.rmtree(SESSION.pop("root"), ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from hypothesis import settings

    return [
        f"tlfeat test homes: {SESSION.get('root')} (registry downloads shared from {_downloads()})",
        f"hypothesis profile: {settings.get_current_profile_name()}",
    ]


def _downloads() -> Path:
    """Where registry wheels' files are kept between sessions: TLFEAT_TEST_DOWNLOADS, else the
    developer's own tlfeat registry cache (the same verified files tlfeat itself would fetch)."""
    if "downloads" not in SESSION:
        from tlfeat.config import tlfeat_home

        SESSION["downloads"] = Path(os.environ.get("TLFEAT_TEST_DOWNLOADS") or tlfeat_home() / "registry")
    return SESSION["downloads"]


def _share_downloads(shared: Path, registry: Path) -> None:
    """The session's registry folder is the shared one: a file fetched once (the MobileNetV2 weights,
    MNIST) is fetched once for every later session. tlfeat writes there only through
    `offline.fetch`, which checks each file's sha256 and renames it into place whole."""
    try:
        shared.mkdir(parents=True, exist_ok=True)
        registry.symlink_to(shared, target_is_directory=True)
    except OSError:
        registry.mkdir(exist_ok=True)  # an unwritable shared folder: this session downloads its own


def _hypothesis_profile() -> None:
    """`ci` (the default): derandomised, no example database, so a failure found once is found again
    on every machine; HYPOTHESIS_PROFILE=explore searches afresh each run."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.register_profile("explore", derandomize=False, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A per-test cache, results and data directory (the homes above are per session)."""
    monkeypatch.setenv("TLFEAT_CACHE_DIR", str(tmp_path / "features_cache"))
    monkeypatch.setenv("TLFEAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("TLFEAT_DATA_DIR", str(tmp_path / "data"))


# A model whose pretrained weights this session cannot find: no registry package carries them (see
# tlfeat.weights.REGISTRY_WEIGHTS) and the session's torch hub cache starts empty, whatever the
# developer's own cache holds. Tests of failed cells use it.
NO_WEIGHTS_HERE = "alexnet"


def cuda_devices() -> int:
    """CUDA GPUs torch sees here (0 on a CPU-only machine or build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def absent_cuda() -> tuple[str, str]:
    """A --device that is not on this machine, whatever it has, and the words its error says."""
    n = cuda_devices()
    return ("cuda", "torch sees no CUDA GPU") if n == 0 else (f"cuda:{n}", f"only {n} CUDA GPU(s)")


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


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight features of 150 + 150 digits at 16 px, shared by the probe and analysis tests:
    ResNet-18 at layer2, layer3, layer4 and the penultimate layer (one pass), MobileNetV2 at the penultimate."""
    from tlfeat import ExtractConfig, extract

    root = tmp_path_factory.mktemp("tiny_features")
    base = dict(
        data="digits",
        untrained=True,
        image_size=16,
        limit=150,
        test_limit=150,
        workers=0,
        cache_dir=root,
        progress=False,
    )
    extract(ExtractConfig(model="resnet18", layer="layer2,layer3,layer4,penultimate", **base))  # type: ignore[arg-type]
    extract(ExtractConfig(model="mobilenet_v2", **base))  # type: ignore[arg-type]
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's sample photographs as an image folder tree (one photo per class, train and test)."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "test"):
        for name in ("chelsea", "coffee", "astronaut", "rocket"):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(getattr(skimage.data, name)()).save(root / split / name / f"{name}.png")
    return root
