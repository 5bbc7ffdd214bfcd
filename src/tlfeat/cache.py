"""The feature cache: one self-describing HDF5 file per (model, weights, layer, preprocessing,
dataset, split, limit), read back and checked here (`writer.py` writes it).

A file holds `features` (float32, n x d), `labels`, `ids`, `class_names`, and what identifies
each image as it was when extracted (`stats`: size and modification time; `digests`: sha256 of
its bytes), with the provenance as attributes. Two checksums cover everything: `features_sha256`
the rows, `index_sha256` the labels, ids, class names, fingerprints and skipped images; `sha256`
combines them and is what results name as their input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.errors import CacheDamaged, CacheMismatch, first_line

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SUFFIX = ".h5"
PARTIAL = ".partial"
DAMAGED = ".damaged"
REBUILD = "delete it (or move it away) and run the same `tlfeat extract` again to rebuild it"


@dataclass
class FeatureSet:
    """Features of one split, with everything needed to trace them back.

    `X` is a float32 array, or with `load_features(..., lazy=True)` a `LazyRows` view read from the
    file on demand; `iter_batches` streams either in blocks.
    """

    X: Any  # float32 (n_samples, n_features): np.ndarray or LazyRows
    y: np.ndarray  # int64 (n_samples,)
    ids: list[str]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reused: bool = False  # True when the cache already held these features
    changes: Any = None  # fingerprint.Changes when extract updated the set, or found it stale

    @property
    def model(self) -> str:
        return str(self.meta.get("model", ""))

    @property
    def split(self) -> str:
        return str(self.meta.get("split", ""))

    @property
    def sha256(self) -> str:
        """What identifies these features and their labels (results name it as their input)."""
        return str(self.meta.get("sha256") or self.meta.get("features_sha256", ""))

    def __len__(self) -> int:
        return len(self.y)

    def iter_batches(self, n: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(X, y) in blocks of `n` rows, without holding the whole matrix in memory."""
        for start in range(0, len(self.y), n):
            yield np.asarray(self.X[start : start + n], dtype=np.float32), self.y[start : start + n]

    def __repr__(self) -> str:
        shape = (len(self.y), self.X.shape[1])
        return (
            f"FeatureSet(model={self.model!r}, dataset={self.meta.get('dataset')!r}, split={self.split!r}, "
            f"X={shape}, classes={len(self.class_names)})"
        )


class LazyRows:
    """The kept rows of a cache file's `features`, read on demand (slices, index arrays, np.asarray)."""

    def __init__(
        self, path: Path, keep: np.ndarray | None, dim: int, identity: tuple[int, int, int, int] | None = None
    ) -> None:
        self.path, self.keep, self.dim = Path(path), keep, dim
        # The file that was verified (its identity taken before the check): rows are read from it only.
        self.identity = identity or _identity(os.stat(self.path))
        n = None if keep is None else len(keep)
        if n is None:
            import h5py

            with h5py.File(self.path, "r") as h5:
                n = int(h5["features"].shape[0])
        self.shape = (int(n), dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        import h5py

        rows = np.arange(self.shape[0])[index]
        scalar = np.ndim(rows) == 0
        rows = np.atleast_1d(rows)
        stored = rows if self.keep is None else self.keep[rows]
        order = np.argsort(stored, kind="stable")
        out = np.empty((len(stored), self.dim), dtype=np.float32)
        with h5py.File(self.path, "r") as h5:
            if _identity(os.fstat(h5.id.get_vfd_handle())) != self.identity:
                raise CacheMismatch(
                    f"{self.path} was replaced after these features were loaded (extract updated or rebuilt it); "
                    "load them again (or run the same command again)"
                )
            dset = h5["features"]
            sorted_rows = stored[order]
            if len(sorted_rows) and np.all(np.diff(sorted_rows) == 1):
                out[order] = dset[int(sorted_rows[0]) : int(sorted_rows[-1]) + 1]
            elif len(sorted_rows):
                unique, inverse = np.unique(sorted_rows, return_inverse=True)
                out[order] = dset[unique][inverse]
        return out[0] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def cache_key(key_fields: dict[str, Any]) -> str:
    """The 16-hex-digit key of a set of key fields (file names and result folders end with it)."""
    blob = json.dumps(key_fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(cache_dir: Path, model: str, slug: str, split: str, key: str) -> Path:
    return Path(cache_dir) / f"{model}__{slug}__{split}__{key}{SUFFIX}"


# --------------------------------------------------------------------------- checksums


def features_digest(features: Any) -> str:
    """sha256 of the float32 rows of an array or HDF5 dataset, a block at a time so memory stays flat."""
    digest = hashlib.sha256()
    step = max(1, 2**24 // (4 * max(1, features.shape[1])))
    for start in range(0, features.shape[0], step):
        digest.update(np.ascontiguousarray(features[start : start + step], dtype=np.float32).tobytes())
    return digest.hexdigest()


def encode_strings(values: list[str] | tuple[str, ...]) -> np.ndarray:
    """Strings for HDF5; file names that are not valid UTF-8 keep their bytes (surrogateescape)."""
    return np.asarray([v.encode("utf-8", "surrogateescape") for v in values], dtype=object)


def decode_strings(values: Any) -> list[str]:
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values]


def index_digest(
    labels: np.ndarray,
    ids: list[str],
    class_names: list[str],
    stats: np.ndarray,
    digests: np.ndarray,
    skipped_index: np.ndarray,
    skipped_error: list[str],
) -> str:
    """sha256 of everything in a cache file besides the features: an edited label shows here."""
    digest = hashlib.sha256()
    for part in (
        np.ascontiguousarray(labels, dtype=np.int64).tobytes(),
        b"\0".join(encode_strings(ids)),
        b"\0".join(encode_strings(class_names)),
        np.ascontiguousarray(stats, dtype=np.int64).tobytes(),
        np.ascontiguousarray(digests, dtype=np.uint8).tobytes(),
        np.ascontiguousarray(skipped_index, dtype=np.int64).tobytes(),
        b"\0".join(encode_strings(skipped_error)),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def combined_digest(features_sha256: str, index_sha256: str) -> str:
    return hashlib.sha256(f"{features_sha256}:{index_sha256}".encode()).hexdigest()


# --------------------------------------------------------------------------- reading


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def read_attrs(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as h5:
        return {k: _plain(v) for k, v in h5.attrs.items()}


@dataclass
class Index:
    """What a cache file says about its images (everything but the features)."""

    labels: np.ndarray
    ids: list[str]
    class_names: list[str]
    stats: np.ndarray  # (n, 2) int64
    digests: np.ndarray  # (n, 32) uint8
    skipped_index: np.ndarray
    skipped_error: list[str]

    def digest(self) -> str:
        return index_digest(
            self.labels, self.ids, self.class_names, self.stats, self.digests, self.skipped_index, self.skipped_error
        )


def read_index(h5: Any) -> Index:
    n = h5["labels"].shape[0]
    return Index(
        labels=h5["labels"][...].astype(np.int64),
        ids=decode_strings(h5["ids"][...]),
        class_names=decode_strings(h5["class_names"][...]),
        stats=h5["stats"][...] if "stats" in h5 else np.zeros((n, 2), np.int64),
        digests=h5["digests"][...] if "digests" in h5 else np.zeros((n, 32), np.uint8),
        skipped_index=h5["skipped_index"][...].astype(np.int64),
        skipped_error=decode_strings(h5["skipped_error"][...]),
    )


def check(path: Path, verify: bool = True) -> dict[str, Any]:
    """The attributes of a whole, current-format cache file; raises CacheDamaged otherwise.

    Cheap checks always (opens, complete, format, datasets and shapes agree); with `verify`, both
    checksums too (features, and labels/ids/fingerprints).
    """
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            meta = {k: _plain(v) for k, v in h5.attrs.items()}
            fmt = meta.get("format")
            if fmt != FORMAT_VERSION:
                older = "an older" if isinstance(fmt, int) and fmt < FORMAT_VERSION else "another"
                raise CacheDamaged(
                    f"{path} was written by {older} tlfeat (format {'unknown' if fmt in (None, '') else fmt}, "
                    f"this one reads {FORMAT_VERSION}); {REBUILD}"
                )
            if not meta.get("complete"):
                raise CacheDamaged(f"{path} is incomplete; {REBUILD}")
            n = int(meta.get("n_images", -1))
            shapes = {name: h5[name].shape[0] for name in ("features", "labels", "ids", "stats", "digests")}
            if any(v != n for v in shapes.values()):
                raise CacheDamaged(f"{path} is damaged (rows: {shapes}, expected {n}); {REBUILD}")
            if verify:
                if features_digest(h5["features"]) != meta.get("features_sha256"):
                    raise CacheDamaged(f"{path} is damaged (features checksum differs); {REBUILD}")
                if read_index(h5).digest() != meta.get("index_sha256"):
                    raise CacheDamaged(f"{path} is damaged (labels, ids or fingerprints checksum differs); {REBUILD}")
    except CacheDamaged:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CacheDamaged(f"{path} is damaged ({first_line(exc, 160)}); {REBUILD}") from exc
    return meta


def read(path: Path, verify: bool = True, lazy: bool = False) -> FeatureSet:
    """Load a complete cache file without its skipped images; a damaged one raises CacheDamaged.

    With `lazy`, the features stay on disk (`LazyRows`); the checksums are still verified, a
    block at a time.
    """
    import h5py

    path = Path(path)
    try:
        before = _identity(os.stat(path))
    except OSError as exc:
        raise CacheDamaged(f"{path} cannot be read ({first_line(exc, 160)}); {REBUILD}") from exc
    meta = check(path, verify=verify and lazy)
    try:
        with h5py.File(path, "r") as h5:
            if _identity(os.fstat(h5.id.get_vfd_handle())) != before:  # replaced while it was being checked
                raise CacheMismatch(f"{path} was replaced while it was being loaded; load it again")
            index = read_index(h5)
            dim = int(h5["features"].shape[1])
            X = None if lazy else h5["features"][...]
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CacheDamaged(f"{path} is damaged ({first_line(exc, 160)}); {REBUILD}") from exc
    if verify and not lazy:
        if features_digest(X) != meta.get("features_sha256"):
            raise CacheDamaged(f"{path} is damaged (features checksum differs); {REBUILD}")
        if index.digest() != meta.get("index_sha256"):
            raise CacheDamaged(f"{path} is damaged (labels, ids or fingerprints checksum differs); {REBUILD}")
    ids, y = index.ids, index.labels
    meta["skipped"] = [
        {"id": ids[i], "error": err} for i, err in zip(index.skipped_index.tolist(), index.skipped_error, strict=True)
    ]
    keep = None
    if len(index.skipped_index):
        mask = np.ones(len(y), dtype=bool)
        mask[index.skipped_index] = False
        keep = np.flatnonzero(mask)
        y, ids = y[keep], [ids[i] for i in keep]
        if X is not None:
            X = X[keep]
    rows: Any = X if X is not None else LazyRows(path, keep, dim, identity=before)
    return FeatureSet(X=rows, y=y, ids=ids, class_names=index.class_names, meta=meta, path=path)


def stored_index(path: Path) -> Index:
    """The index of a complete cache file (for comparing its images with the dataset as it is now)."""
    import h5py

    with h5py.File(path, "r") as h5:
        return read_index(h5)
