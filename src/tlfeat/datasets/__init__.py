"""Image sources: named datasets, image folder trees, WebDataset shards and Parquet files.

Every source resolves to `ImageSplit`s: how to read each image, labels, stable sample ids, class
names, and what identifies the images as they are now. Images come out as 8-bit RGB; what the
model needs (resize, crop, normalise) is applied later, following the weights. numpy and PIL only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tlfeat import config
from tlfeat.datasets import shards as _shards
from tlfeat.datasets.base import SPLIT_SEED, TEST_FRACTION, ImageSplit, stratified_split, stratified_subset
from tlfeat.datasets.folders import layout, load_folder
from tlfeat.datasets.named import FASHION_DEBIAN, NO_FLIP, SMALL_CENTRED, NamedDataset, named_datasets
from tlfeat.datasets.shards import SHARD_SUFFIXES, is_shard_spec, load_shards, splits_of
from tlfeat.errors import DatasetNotFound, TlfeatError, did_you_mean, printable
from tlfeat.images import IMAGE_EXTENSIONS

ALIASES = {
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "stl-10": "stl10",
}


def default_data_dir() -> Path:
    return config.default_data_dir()


def canonical(data: str) -> str:
    """The dataset id a `--data` value stands for: a known name, an absolute folder path, or shards."""
    if not isinstance(data, str) or not data.strip():
        raise TlfeatError("--data is empty; give a dataset name (`tlfeat datasets`) or a folder")
    key = data.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    named = named_datasets()
    if key in named:
        return key
    if data.startswith("shards:"):
        return data
    path = Path(data).expanduser()
    if path.is_dir():
        spec = _shard_folder(path)
        return _shards.canonical(spec) if spec else str(path.resolve())
    if is_shard_spec(data):
        return _shards.canonical(data)
    if path.exists():
        raise TlfeatError(f"--data {printable(data)}: is a file, not a folder of class sub-folders or shards")
    raise DatasetNotFound(
        f"unknown dataset {printable(data)!r}: not a named dataset ({', '.join(named)}), no folder at "
        f"{printable(str(path.resolve()))}, and not shards (*.tar, *.parquet).{did_you_mean(key, list(named))}"
    )


def _shard_folder(root: Path) -> str | None:
    """`root/train/*.tar` with `root/val/` or `root/test/`: a shard spec, else None (an image tree)."""

    def shards_in(folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        return sorted(str(p) for p in folder.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())

    parts = {name: shards_in(root / name) for name in ("train", "val", "test")}
    if not parts["train"] or not (parts["val"] or parts["test"]):
        return None
    suffix = Path(parts["train"][0]).suffix
    spec = {"train": str(root / "train" / f"*{suffix}")}
    spec["test"] = str(root / ("test" if parts["test"] else "val") / f"*{suffix}")
    if parts["test"] and parts["val"]:
        spec["val"] = str(root / "val" / f"*{suffix}")
    return ",".join(f"{k}={v}" for k, v in spec.items())


def splits(data: str) -> tuple[str, ...]:
    ds = canonical(data)
    if ds in named_datasets():
        return named_datasets()[ds].splits
    if ds.startswith("shards:"):
        return splits_of(ds)
    return tuple(layout(Path(ds)))


def load_split(
    data: str,
    split: str,
    data_dir: Path | None = None,
    limit: int | None = None,
    subset_seed: int = SPLIT_SEED,
    label_field: str = "cls",
) -> ImageSplit:
    """Load one split of a dataset (a name, a folder or shards), optionally a stratified subset."""
    ds = canonical(data)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    named = named_datasets()
    if ds in named:
        spec = named[ds]
        if split not in spec.splits:
            raise TlfeatError(f"{ds} has no split {split!r}; valid: {', '.join(spec.splits)}")
        out = spec.load(split, data_dir)
    elif ds.startswith("shards:"):
        out = load_shards(ds, split, label_field)
    else:
        out = load_folder(Path(ds), split)
    if limit is not None:
        if limit <= 0:
            raise TlfeatError(f"--limit must be a positive number of images, got {limit}")
        out = out.subset(stratified_subset(out.labels, limit, seed=subset_seed, ids=out.ids))
    return out


def dataset_slug(dataset_id: str) -> str:
    """A short file-name-safe name: "mnist", or "<folder name>-<hash of its path>"."""
    if dataset_id in named_datasets():
        return dataset_id
    if dataset_id.startswith("shards:"):  # the folder the shards of every split share: "sh" for sh/{train,test}/*.tar
        parents = [str(Path(part.split("=", 1)[-1]).parent) for part in dataset_id.removeprefix("shards:").split(",")]
        stem = Path(os.path.commonpath(parents)).name or "shards"
    else:
        stem = Path(dataset_id).name
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40]
    digest = hashlib.sha256(dataset_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{name}-{digest}"


def short_name(dataset_id: str) -> str:
    """How tables show a dataset: its name, or its folder's name."""
    if dataset_id in named_datasets() or "/" not in dataset_id:
        return dataset_id
    if dataset_id.startswith("shards:"):
        return dataset_slug(dataset_id).rsplit("-", 1)[0]
    return Path(dataset_id).name


__all__ = [
    "FASHION_DEBIAN",
    "IMAGE_EXTENSIONS",
    "NO_FLIP",
    "SMALL_CENTRED",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "ImageSplit",
    "NamedDataset",
    "canonical",
    "dataset_slug",
    "default_data_dir",
    "load_split",
    "named_datasets",
    "short_name",
    "splits",
    "stratified_split",
    "stratified_subset",
]
