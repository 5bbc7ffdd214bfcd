"""The formats large image sets are kept in: WebDataset tar shards and Parquet files.

`--data 'shards/{00000..00127}.tar'` (as img2dataset writes them): samples are the members that
share a key (`000123.jpg` + `000123.cls`); the label is the member named by `--label-field`
(default `cls`), the id is the key. Parquet (`parquet.py`): one row per image. Splits:
`train=PATTERN,test=PATTERN`, a folder with `train/` and `val/`/`test/` sub-folders of shards, or
one pattern, split 80/20 (stratified, seed 0) like a flat folder tree. Nothing is unpacked: each
image is read in place by its byte range.
"""

from __future__ import annotations

import glob
import os
import stat
import tarfile
from collections import Counter
from functools import lru_cache
from typing import Any

import numpy as np

from tlfeat.datasets import parquet
from tlfeat.datasets.base import SPLIT_SEED, ImageSplit, stratified_split
from tlfeat.datasets.labels import MAX_LABEL, class_label, class_names
from tlfeat.datasets.spec import braceexpand, parts
from tlfeat.errors import DatasetNotFound, TlfeatError, did_you_mean, printable
from tlfeat.images import file_kind

SHARD_SUFFIXES = (".tar", ".parquet")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
FLAT_TEST_FRACTION = 0.2


COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
SPLIT_NAMES = ("train", "val", "test")


def refuse_compressed(data: str) -> None:
    """Compressed tar shards cannot be read in place by byte range: one line that says what to do."""
    found = [p for p in parts(data).values() if p.lower().endswith(COMPRESSED)]
    if found:
        raise TlfeatError(
            f"shards {printable(found[0][:200])} are compressed tar files, which cannot be read in place; "
            "decompress them to .tar (e.g. `gunzip -k`, `xz -dk`) and give those"
        )


def is_shard_spec(data: str) -> bool:
    """Does `--data` name shards (a pattern or a split mapping of .tar/.parquet files)?"""
    found = parts(data)
    return bool(found) and all(p.endswith(SHARD_SUFFIXES) for p in found.values())


def canonical(data: str) -> str:
    """The dataset id of a shard spec: the same spec with absolute paths (wherever it is run from)."""
    found = parts(data)
    empty = [f"split {k!r}" if k else "the pattern" for k, v in found.items() if not v] if found else ["the pattern"]
    if empty:
        raise TlfeatError(
            f"shards {printable(data[:200])!r}: {empty[0]} is empty; give a pattern such as sh/{{0..9}}.tar"
        )
    for split in found:
        if split and split not in SPLIT_NAMES and (close := did_you_mean(split, list(SPLIT_NAMES))):
            raise TlfeatError(f"shards {printable(data[:200])}: unknown split {split!r}.{close}")
    absolute = {k: os.path.abspath(os.path.expanduser(v)) for k, v in found.items()}
    if "val" in absolute and "test" not in absolute:  # as in folder trees: val is the evaluation split
        absolute["test"] = absolute.pop("val")
    if "" in absolute:
        return "shards:" + absolute[""]
    return "shards:" + ",".join(f"{k}={v}" for k, v in sorted(absolute.items()))


def patterns(dataset_id: str) -> dict[str, str]:
    """The absolute pattern of each split of a shard dataset id ({"": pattern} for one pattern)."""
    return parts(dataset_id.removeprefix("shards:"))


def fixed_folder(pattern: str) -> str:
    """The folder a pattern starts from: its path up to the first component with a brace or glob."""
    parts = pattern.split(os.sep)
    static = []
    for part in parts[:-1]:  # the file name itself is never the folder
        if any(ch in part for ch in "{*?["):
            break
        static.append(part)
    return os.sep.join(static) or os.sep


def _files(pattern: str) -> list[str]:
    files: list[str] = []
    if os.path.isfile(pattern):  # `a[1].tar` or `{x}.tar` that exists is that file, not a pattern
        return [pattern]
    for expanded in braceexpand(pattern):
        found = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        files.extend(found)
    missing = [f for f in files if not os.path.exists(f)]
    if not files or len(missing) == len(files):
        raise DatasetNotFound(
            f"shards {printable(pattern)}: the pattern matches no file; check it (braces like {{00000..00127}} "
            "and globs are expanded)"
        )
    if missing:
        raise DatasetNotFound(
            f"shards {printable(pattern)}: {len(missing)} of {len(files)} file(s) missing (first: "
            f"{printable(missing[0])}); check the pattern (braces like {{00000..00127}} and globs are expanded)"
        )
    for f in files:
        mode = os.stat(f).st_mode
        if not stat.S_ISREG(mode):
            raise TlfeatError(f"shard {printable(f)} is {file_kind(mode)}, not a regular file; check the pattern")
    return files


def splits_of(dataset_id: str) -> tuple[str, ...]:
    found = patterns(dataset_id)
    if "" in found:
        return ("train", "test")
    order = {"train": 0, "val": 1, "test": 2}
    return tuple(sorted(found, key=lambda s: (order.get(s, 3), s)))


# --------------------------------------------------------------------------- listing


def _tar_samples(path: str, label_field: str) -> list[tuple[str, Any, int, int]]:
    """(key, label, offset, size) of every sample with an image in one tar shard."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, Any] = {}
    seen_ext: dict[str, str] = {}  # the image member kept for each key
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), stem)
                ext = ext.lower()
                where = f"{printable(path)}: sample {printable(key)}"
                if member.issparse() and (ext in IMAGE_MEMBERS or ext == label_field):
                    raise TlfeatError(f"{where} is stored sparse, so it cannot be read in place; repack the shard")
                if ext in IMAGE_MEMBERS and key not in images:
                    images[key] = (member.offset_data, member.size)
                    order.append(key)
                elif ext in IMAGE_MEMBERS and ext == seen_ext.get(key):
                    raise TlfeatError(f"{printable(path)} holds sample {printable(key)}.{ext} more than once")
                elif ext == label_field:
                    if key in labels:
                        raise TlfeatError(f"{printable(path)} holds the label {printable(key)}.{ext} more than once")
                    if member.size > 4 * MAX_LABEL:
                        raise TlfeatError(
                            f"{where}: its .{ext} member holds {member.size:,} bytes, not a label; "
                            "choose the label member with --label-field"
                        )
                    fh = tar.extractfile(member)
                    labels[key] = class_label(fh.read() if fh else b"", f"{where}.{ext}")
                if ext in IMAGE_MEMBERS:
                    seen_ext.setdefault(key, ext)
            _check_complete(path, tar.fileobj, tar.offset)
    except (OSError, tarfile.TarError, EOFError) as exc:
        if "unexpected end of data" in str(exc):  # a member's bytes run past the end of the file
            raise TlfeatError(
                f"{printable(path)} is truncated: a member runs past its end (a copy or download cut short); "
                "copy the shard again"
            ) from exc
        raise TlfeatError(f"{printable(path)} is not a readable tar shard ({exc})") from exc
    missing = [k for k in order if k not in labels]
    if missing:
        raise TlfeatError(
            f"{printable(path)}: sample {printable(missing[0])} has no .{label_field} member "
            f"({len(missing)} of {len(order)} samples); choose the label member with --label-field"
        )
    return [(k, labels[k], *images[k]) for k in order]


def _check_complete(path: str, fh: Any, end: int) -> None:
    """Refuse a shard cut short: a tar ends with a zero block after its last member, so a copy that
    stopped at a member's boundary (or inside a header, which tarfile takes for the end) lacks it."""
    size = os.fstat(fh.fileno()).st_size
    fh.seek(end)
    if size < end + tarfile.BLOCKSIZE or fh.read(tarfile.BLOCKSIZE).count(0) != tarfile.BLOCKSIZE:
        raise TlfeatError(
            f"{printable(path)} is truncated: it stops after {size:,} bytes without the end-of-archive block "
            "(a copy or download cut short); copy the shard again"
        )


def _list(pattern: str, label_field: str) -> tuple[list[str], list[Any], list[Any], np.ndarray, str]:
    """ids, labels, refs, stats and kind of every sample of the shards a pattern names."""
    ids: list[str] = []
    labels: list[Any] = []
    refs: list[Any] = []
    stats: list[tuple[int, int]] = []
    kinds = set()
    for path in _files(pattern):
        mtime = os.stat(path).st_mtime_ns
        if path.endswith(".parquet"):
            kinds.add("parquet")
            for key, label, ref, size in parquet.samples(path, label_field, fixed_folder(pattern)):
                ids.append(key)
                labels.append(label)
                refs.append(ref)
                stats.append((size, mtime))
        else:
            kinds.add("members")
            for key, label, offset, size in _tar_samples(path, label_field):
                ids.append(key)
                labels.append(label)
                refs.append((path, offset, size))
                stats.append((size, mtime))
    if len(kinds) > 1:
        raise TlfeatError(f"shards {printable(pattern)} mix tar and Parquet files; give them as separate datasets")
    if len(set(ids)) != len(ids):
        dup = next(k for k, n in Counter(ids).items() if n > 1)
        raise TlfeatError(
            f"shards {printable(pattern)} hold sample key {printable(dup)} more than once; keys must be unique"
        )
    return ids, labels, refs, np.asarray(stats, dtype=np.int64).reshape(-1, 2), kinds.pop() if kinds else "members"


def _listed(pattern: str, label_field: str) -> tuple[Any, ...]:
    stamp = tuple((f, *_stat(f)) for f in _files(pattern))  # a changed shard is listed again
    return _listed_at(pattern, label_field, stamp)


@lru_cache(maxsize=8)
def _listed_at(pattern: str, label_field: str, stamp: tuple[Any, ...]) -> tuple[Any, ...]:
    return _list(pattern, label_field)


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def load_shards(dataset_id: str, split: str, label_field: str = "cls") -> ImageSplit:
    spec = dataset_id.removeprefix("shards:")
    found = patterns(dataset_id)
    flat = "" in found
    if not flat and split not in found:
        raise TlfeatError(
            f"{printable(spec)} has no {split!r} split; it has {', '.join(found)}.{did_you_mean(split, list(found))}"
        )
    train_pattern = found[""] if flat else found.get("train", next(iter(found.values())))
    ids, raw, refs, stats, kind = _listed(found[""] if flat else found[split], label_field)
    train_raw = raw if flat or split == "train" else _listed(train_pattern, label_field)[1]
    classes = class_names(train_raw)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(v) for v in raw} - set(index))
    if unknown:
        raise TlfeatError(
            f"split {split!r} of {printable(spec)} has label(s) {printable(', '.join(unknown[:5]))} "
            "that train has none of"
        )
    labels = np.asarray([index[str(v)] for v in raw], dtype=np.int64)
    idx = np.arange(len(ids))
    source = spec
    if flat:
        train, test = stratified_split(labels, FLAT_TEST_FRACTION, ids=ids)
        idx = train if split == "train" else test
        source = f"{spec} (stratified 80/20 split, seed {SPLIT_SEED})"
    return ImageSplit(
        dataset=dataset_id,
        split=split,
        class_names=tuple(classes),
        labels=labels[idx],
        ids=tuple(ids[i] for i in idx),
        source=source,
        kind=kind,
        refs=tuple(refs[i] for i in idx),
        stats=stats[idx],
    )
