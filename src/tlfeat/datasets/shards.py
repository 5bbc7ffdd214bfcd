"""The formats large image sets are kept in: WebDataset tar shards and Parquet files.

`--data 'shards/{00000..00127}.tar'` (as img2dataset writes them): samples are the members that
share a key (`000123.jpg` + `000123.cls`); the label is the member named by `--label-field`
(default `cls`), the id is the key. Parquet: one row per image, the image bytes in a binary
column (or a struct with a `bytes` field, as Hugging Face datasets write it), the label in the
`--label-field` column. Splits: `train=PATTERN,test=PATTERN`, a folder with `train/` and
`val/`/`test/` sub-folders of shards, or one pattern, split 80/20 (stratified, seed 0) like a
flat folder tree. Nothing is unpacked: each image is read in place by its byte range.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.datasets.base import SPLIT_SEED, ImageSplit, stratified_split
from tlfeat.errors import DatasetNotFound, TlfeatError, printable

SHARD_SUFFIXES = (".tar", ".parquet")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
FLAT_TEST_FRACTION = 0.2


def braceexpand(pattern: str) -> list[str]:
    """`a{00..02}b` -> a00b a01b a02b; `{x,y}` -> x y; nested and repeated braces too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    if ranged := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        lo, hi = ranged.group(1), ranged.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in braceexpand(head + option + tail)]


def is_shard_spec(data: str) -> bool:
    """Does `--data` name shards (a pattern or a split mapping of .tar/.parquet files)?"""
    parts = _spec_parts(data)
    return bool(parts) and all(p.endswith(SHARD_SUFFIXES) for p in parts.values())


def _spec_parts(data: str) -> dict[str, str]:
    text = data.strip()
    if "=" in text and re.match(r"^\w+=", text):
        out = {}
        for part in re.split(r"[,;](?=\w+=)", text):
            split, _, pattern = part.partition("=")
            out[split.strip()] = pattern.strip()
        return out
    return {"": text} if text else {}


def canonical(data: str) -> str:
    """The dataset id of a shard spec: the same spec with absolute paths."""
    parts = _spec_parts(data)
    absolute = {k: os.path.abspath(os.path.expanduser(v)) for k, v in parts.items()}
    if "val" in absolute and "test" not in absolute:  # as in folder trees: val is the evaluation split
        absolute["test"] = absolute.pop("val")
    if "" in absolute:
        return "shards:" + absolute[""]
    return "shards:" + ",".join(f"{k}={v}" for k, v in sorted(absolute.items()))


def _files(pattern: str) -> list[str]:
    files: list[str] = []
    for expanded in braceexpand(pattern):
        found = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        files.extend(found)
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise DatasetNotFound(
            f"shards {printable(pattern)}: {len(missing) if files else 'no'} file(s) missing"
            + (f" (first: {printable(missing[0])})" if missing else "")
            + "; check the pattern (braces like {00000..00127} and globs are expanded)"
        )
    return files


def splits_of(dataset_id: str) -> tuple[str, ...]:
    spec = dataset_id.removeprefix("shards:")
    parts = _spec_parts(spec)
    if "" in parts:
        return ("train", "test")
    order = {"train": 0, "val": 1, "test": 2}
    return tuple(sorted(parts, key=lambda s: (order.get(s, 3), s)))


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
                if ext in IMAGE_MEMBERS and key not in images:
                    images[key] = (member.offset_data, member.size)
                    order.append(key)
                elif ext in IMAGE_MEMBERS and ext == seen_ext.get(key):
                    raise TlfeatError(f"{printable(path)} holds sample {printable(key)}.{ext} more than once")
                elif ext == label_field:
                    if key in labels:
                        raise TlfeatError(f"{printable(path)} holds the label {printable(key)}.{ext} more than once")
                    fh = tar.extractfile(member)
                    labels[key] = _label_value(fh.read() if fh else b"")
                    if labels[key] == "":
                        raise TlfeatError(f"{printable(path)}: sample {printable(key)} has an empty .{ext} label")
                if ext in IMAGE_MEMBERS:
                    seen_ext.setdefault(key, ext)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise TlfeatError(f"{printable(path)} is not a readable tar shard ({exc})") from exc
    missing = [k for k in order if k not in labels]
    if missing:
        raise TlfeatError(
            f"{printable(path)}: sample {printable(missing[0])} has no .{label_field} member "
            f"({len(missing)} of {len(order)} samples); choose the label member with --label-field"
        )
    return [(k, labels[k], *images[k]) for k in order]


def _label_value(raw: bytes) -> Any:
    text = raw.decode("utf-8", "replace").strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _parquet_samples(path: str, label_field: str) -> list[tuple[str, Any, Any, int]]:
    """(key, label, ref, size) of every row of one Parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise TlfeatError("reading Parquet needs pyarrow: `pip install 'tlfeat[parquet]'`") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise TlfeatError(f"{printable(path)} is not a readable Parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    column = next((c for c in IMAGE_COLUMNS if c in names), None)
    if column is None:
        raise TlfeatError(
            f"{printable(path)} has no image column (looked for {', '.join(IMAGE_COLUMNS)}; it has {', '.join(names)})"
        )
    field = label_field if label_field in names else ("label" if "label" in names and label_field == "cls" else None)
    if field is None:
        raise TlfeatError(
            f"{printable(path)} has no label column {label_field!r} (it has {', '.join(names)}); choose it with --label-field"
        )
    key_column = next((c for c in ("__key__", "key", "id") if c in names), None)
    out = []
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=[field] + ([key_column] if key_column else []))
        labels = table.column(field).to_pylist()
        keys = table.column(key_column).to_pylist() if key_column else None
        for row, label in enumerate(labels):
            key = str(keys[row]) if keys else f"{Path(path).name}/{group}/{row}"
            if label is None or (isinstance(label, str) and not label.strip()):
                raise TlfeatError(
                    f"sample {printable(key)} of {printable(path)} has no label (column {field!r} is empty there); "
                    "label it or remove the row"
                )
            out.append((key, label, (path, group, row, column), 0))
    return out


@lru_cache(maxsize=2)
def _row_group(path: str, group: int, column: str) -> list[Any]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column).to_pylist()


def parquet_bytes(ref: tuple[str, int, int, str]) -> bytes:
    path, group, row, column = ref
    try:
        value = _row_group(path, group, column)[row]
    except Exception as exc:  # noqa: BLE001
        raise TlfeatError(f"cannot read row {row} of {printable(path)}: {exc}") from exc
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise TlfeatError(f"row {row} of {printable(path)} holds no image bytes in column {column!r}")
    return bytes(value)


def _list(pattern: str, label_field: str) -> tuple[list[str], list[Any], list[Any], np.ndarray, str]:
    """ids, raw labels, refs, stats and kind of every sample of the shards a pattern names."""
    ids: list[str] = []
    labels: list[Any] = []
    refs: list[Any] = []
    stats: list[tuple[int, int]] = []
    kinds = set()
    for path in _files(pattern):
        mtime = os.stat(path).st_mtime_ns
        if path.endswith(".parquet"):
            kinds.add("parquet")
            rows = _parquet_samples(path, label_field)
            for key, label, ref, size in rows:
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
        dup = next(k for k in ids if ids.count(k) > 1)
        raise TlfeatError(
            f"shards {printable(pattern)} hold sample key {printable(dup)} more than once; keys must be unique"
        )
    return ids, labels, refs, np.asarray(stats, dtype=np.int64).reshape(-1, 2), kinds.pop() if kinds else "members"


def _class_names(values: list[Any]) -> list[str]:
    unique = sorted(set(values), key=lambda v: (not isinstance(v, int), v if isinstance(v, int) else str(v)))
    return [str(v) for v in unique]


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
    parts = _spec_parts(spec)
    flat = "" in parts
    if not flat and split not in parts:
        raise TlfeatError(f"{printable(spec)} has no {split!r} split; it has {', '.join(parts)}")
    train_pattern = parts[""] if flat else parts.get("train", next(iter(parts.values())))
    ids, raw, refs, stats, kind = _listed(parts[""] if flat else parts[split], label_field)
    train_raw = raw if flat or split == "train" else _listed(train_pattern, label_field)[1]
    classes = _class_names(train_raw)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(v) for v in raw} - set(index))
    if unknown:
        raise TlfeatError(
            f"split {split!r} of {printable(spec)} has label(s) {', '.join(unknown[:5])} that train has none of"
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
