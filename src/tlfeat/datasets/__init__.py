"""Image sources: named datasets, image folder trees, WebDataset shards and Parquet files.

Every source resolves to `ImageSplit`s: how to read each image, labels, stable sample ids, class
names, and what identifies the images as they are now. Images come out as 8-bit RGB; what the
model needs (resize, crop, normalise) is applied later, following the weights. numpy and PIL only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
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


NAMED_PREFIX = "named:"  # `--data named:mnist`: the named dataset, even where a folder `mnist` exists


def canonical(data: str) -> str:
    """The dataset id a `--data` value stands for: an absolute folder path, shards, or a known name.

    A path that exists is always that folder (or shard file), even when it is spelled like a named
    dataset (`digits`, `./mnist`); `named:mnist` asks for the named one.
    """
    if not isinstance(data, str) or not data.strip():
        raise TlfeatError("--data is empty; give a dataset name (`tlfeat datasets`) or a folder")
    named = named_datasets()
    if data.startswith(NAMED_PREFIX):
        key = _name_key(data.removeprefix(NAMED_PREFIX))
        if key not in named:
            raise DatasetNotFound(
                f"unknown named dataset {printable(data)!r}; valid: {', '.join(named)}.{did_you_mean(key, list(named))}"
            )
        return key
    if data.startswith("shards:"):
        return _shards.canonical(data.removeprefix("shards:"))
    _shards.refuse_compressed(data)
    path = Path(data).expanduser()
    if _exists(path):
        if path.is_dir():
            spec = _shard_folder(path)
            return _shards.canonical(spec) if spec else str(path.resolve())
        if is_shard_spec(data):
            return _shards.canonical(data)
        what = "a file" if path.is_file() else "not a folder"
        hint = f"; for the named dataset write --data named:{_name_key(data)}" if _name_key(data) in named else ""
        raise TlfeatError(f"--data {printable(data)}: is {what}, not a folder of class sub-folders or shards{hint}")
    key = _name_key(data)
    if key in named:
        return key
    if is_shard_spec(data):
        return _shards.canonical(data)
    raise DatasetNotFound(
        f"unknown dataset {printable(data)!r}: not a named dataset ({', '.join(named)}), no folder at "
        f"{printable(str(path.resolve()))}, and not shards (*.tar, *.parquet).{did_you_mean(key, list(named))}"
    )


def data_of(dataset_id: str) -> str:
    """The `--data` value that names exactly the dataset of a stored id (a cache file's `dataset`).

    Folder ids are absolute paths and shard ids start with `shards:`, so they name themselves; a
    named dataset's id is its bare name, which a folder of that name in the current directory
    would take over, so it is given as `named:NAME`.
    """
    return NAMED_PREFIX + dataset_id if dataset_id in named_datasets() else dataset_id


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, or one it cannot hold: no path
        return False


def _name_key(text: str) -> str:
    key = text.strip().lower().replace("_", "-")
    return ALIASES.get(key, key)


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
    config.max_image_bytes()  # a bad TLFEAT_MAX_IMAGE_MB is one line here, not an error per image later
    ds = canonical(data)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    named = named_datasets()
    if ds in named:
        spec = named[ds]
        if split not in spec.splits:
            raise TlfeatError(
                f"{ds} has no split {split!r}; valid: {', '.join(spec.splits)}.{did_you_mean(split, list(spec.splits))}"
            )
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


def folder_of(dataset_id: str) -> Path | None:
    """The real folder of an image folder dataset (where an output folder must not go), else None."""
    if dataset_id in named_datasets() or dataset_id.startswith("shards:"):
        return None
    return Path(os.path.realpath(dataset_id))


def _where(dataset_id: str) -> str:
    """The folder a dataset id lives in: a folder's path, the folder its shards share, or ""."""
    if dataset_id in named_datasets():
        return ""
    if dataset_id.startswith("shards:"):  # the folder the shards of every split share: "sh" for sh/{train,test}/*.tar
        parents = [os.path.dirname(p) for p in _shards.patterns(dataset_id).values()]
        try:
            return os.path.commonpath(parents) if parents else ""
        except ValueError:  # relative and absolute patterns (an id written by an earlier tlfeat)
            return parents[0]
    return dataset_id


def dataset_slug(dataset_id: str) -> str:
    """A short file-name-safe name: "mnist", or "<folder name>-<hash of its path>"."""
    if dataset_id in named_datasets():
        return dataset_id
    stem = Path(_where(dataset_id)).name or ("shards" if dataset_id.startswith("shards:") else "data")
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40]
    digest = hashlib.sha256(dataset_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{name}-{digest}"


def short_name(dataset_id: str) -> str:
    """How a message shows one dataset: its name, or its folder's name (`display_names` tells apart several)."""
    if dataset_id in named_datasets() or "/" not in dataset_id:
        return printable(dataset_id)
    return printable(Path(_where(dataset_id)).name or dataset_id)


def display_names(dataset_ids: Iterable[str]) -> dict[str, str]:
    """A readable label per dataset id, distinct for distinct ids: the short name, and where several
    datasets share it, the parent folders that tell them apart (`data (twin/a)`, `data (twin/b)`),
    `shards` for shards, and a short hash of the id where even those are equal."""
    named = named_datasets()
    by_name: dict[str, list[str]] = {}
    for i in sorted(set(dataset_ids)):
        by_name.setdefault(short_name(i), []).append(i)
    out: dict[str, str] = {}
    for name, group in by_name.items():
        others = [i for i in group if i not in named]  # a named dataset keeps its name
        out.update({i: name for i in group if i in named})
        out.update(_told_apart(name, others) if len(group) > 1 else {i: name for i in others})
    return out


def _told_apart(name: str, ids: list[str]) -> dict[str, str]:
    """Labels for datasets that share the short name `name`: as few parent folders as tell them apart."""
    parents = {i: Path(_where(i)).parent.parts[1:] for i in ids}  # without the root "/"
    kinds = {i: "shards" if i.startswith("shards:") else "" for i in ids}
    depth = max((len(p) for p in parents.values()), default=0)
    tags: dict[str, tuple[str, str]] = {}
    for k in range(1, max(depth, 1) + 1):
        tags = {i: ("/".join(parents[i][-k:]), kinds[i]) for i in ids}
        if len(set(tags.values())) == len(ids):
            break
    out = {}
    for i in ids:
        parts = [printable(tags[i][0]) or "/", tags[i][1]]
        if sum(1 for j in ids if tags[j] == tags[i]) > 1:
            parts.append(hashlib.sha256(i.encode("utf-8", "surrogateescape")).hexdigest()[:6])
        out[i] = f"{name} ({', '.join(x for x in parts if x)})"
    return out


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
    "data_of",
    "dataset_slug",
    "default_data_dir",
    "display_names",
    "folder_of",
    "load_split",
    "named_datasets",
    "short_name",
    "splits",
    "stratified_split",
    "stratified_subset",
]
