"""The feature cache: one self-describing HDF5 file per (model, weights, layer, preprocessing,
dataset, split, limit).

A file holds `features` (float32, n x d), `labels`, `ids` and `class_names`, and its provenance
as attributes. It is written under a `.partial` name in chunks (so an interrupted extraction
resumes) and renamed when complete, so a file with the final name is always whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.errors import CacheDamaged, CacheMismatch, TlfeatError, WriteFailed

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIX = ".h5"
PARTIAL = ".partial"
DAMAGED = ".damaged"


@dataclass
class FeatureSet:
    """Features of one split, with everything needed to trace them back."""

    X: np.ndarray  # float32 (n_samples, n_features)
    y: np.ndarray  # int64 (n_samples,)
    ids: list[str]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reused: bool = False  # True when the cache already held these features

    @property
    def model(self) -> str:
        return str(self.meta.get("model", ""))

    @property
    def split(self) -> str:
        return str(self.meta.get("split", ""))

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (
            f"FeatureSet(model={self.model!r}, dataset={self.meta.get('dataset')!r}, split={self.split!r}, "
            f"X={self.X.shape}, classes={len(self.class_names)})"
        )


def cache_key(key_fields: dict[str, Any]) -> str:
    blob = json.dumps(key_fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(cache_dir: Path, model: str, slug: str, split: str, key: str) -> Path:
    return Path(cache_dir) / f"{model}__{slug}__{split}__{key}{SUFFIX}"


class Writer:
    """Streams feature rows into `<final>.partial/` in blocks and assembles the HDF5 file at the end.

    Every block is written under a temporary name, synced and renamed, so a process killed at any
    instant (Ctrl-C, SIGKILL, a full disk) leaves only whole blocks behind; reopening the same key
    resumes after the last one. `finish` streams the blocks into `<final>.writing`, syncs it and
    renames it to `final`, so a file with the final name is always complete.
    """

    def __init__(
        self,
        final: Path,
        key: str,
        attrs: dict[str, Any],
        labels: np.ndarray,
        ids: list[str],
        class_names: list[str],
        flush_every: int = 1024,
    ) -> None:
        self.final = Path(final)
        self.partial = self.final.with_name(self.final.name + PARTIAL)
        self.key, self.attrs = key, dict(attrs)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids, self.class_names = list(ids), list(class_names)
        self.n = len(self.labels)
        self.flush_every = max(1, int(flush_every))
        self._rows: list[np.ndarray] = []
        self._errors: list[str] = []
        self.done = 0
        manifest = {"key": key, "n_images": self.n, "format": FORMAT_VERSION}
        shown = {k: _attr(v) for k, v in attrs.items() if k in _SHOWN}  # for `tlfeat ls` while in progress
        with writing(self.partial):
            if self.partial.is_file():  # a partial HDF5 file from tlfeat 0.1: start over
                self.partial.unlink()
            blocks = _blocks(self.partial) if self.partial.is_dir() else []
            stored = _read_manifest(self.partial) or {}
            if blocks and {k: stored.get(k) for k in manifest} == manifest:
                self.done = blocks[-1][1]
                log.info("resuming %s after %d of %d images", self.partial.name, self.done, self.n)
            else:
                shutil.rmtree(self.partial, ignore_errors=True)
                self.partial.mkdir(parents=True)
                _atomic_write(self.partial / MANIFEST, json.dumps({**manifest, "attrs": shown}).encode())
        self.flushed = self.done

    def append(self, feats: np.ndarray, errors: list[str] | None = None) -> None:
        """Add the next rows; `errors[i]` non-empty marks row i as a skipped image (stored as NaN)."""
        feats = np.array(feats, dtype=np.float32)
        errors = list(errors) if errors is not None else [""] * len(feats)
        for i, err in enumerate(errors):
            if err:
                feats[i] = np.nan
        self._rows.append(feats)
        self._errors.extend(errors)
        self.done += len(feats)
        if self.done - self.flushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one block; after this returns they survive any crash."""
        if not self._rows:
            return
        rows = np.concatenate(self._rows)
        start, stop = self.flushed, self.flushed + len(rows)
        buf = io.BytesIO()
        np.savez(buf, features=rows, errors=np.asarray(self._errors, dtype=str))
        with writing(self.partial):
            _atomic_write(self.partial / f"{start:010d}-{stop:010d}.npz", buf.getvalue())
        self._rows, self._errors, self.flushed = [], [], stop

    def finish(self, extra_attrs: dict[str, Any]) -> Path:
        import h5py

        self.flush()
        blocks = _blocks(self.partial)
        if self.done != self.n or not blocks or blocks[-1][1] != self.n:
            raise TlfeatError(f"internal: wrote {self.done} of {self.n} feature rows")
        tmp = self.final.with_name(self.final.name + ".writing")
        with np.load(blocks[0][2]) as first:
            dim = first["features"].shape[1]
        _check_room(tmp, self.n * dim * 4 + sum(len(i) + 40 for i in self.ids) + 256 * 1024)
        digest = hashlib.sha256()
        skipped_index: list[int] = []
        skipped_error: list[str] = []
        try:
            with writing(tmp), h5py.File(tmp, "w") as h5:
                for name, value in {**self.attrs, **extra_attrs}.items():
                    h5.attrs[name] = _attr(value)
                h5.create_dataset("labels", data=self.labels)
                h5.create_dataset("ids", data=np.asarray(self.ids, dtype=object), dtype=h5py.string_dtype())
                h5.create_dataset(
                    "class_names", data=np.asarray(self.class_names, dtype=object), dtype=h5py.string_dtype()
                )
                chunk = max(1, min(self.n, 2**20 // (4 * dim)))
                features = h5.create_dataset("features", shape=(self.n, dim), dtype=np.float32, chunks=(chunk, dim))
                for start, stop, path in blocks:
                    with np.load(path) as block:
                        rows, errors = block["features"], block["errors"]
                    features[start:stop] = rows
                    digest.update(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
                    for i, err in enumerate(errors):
                        if err:
                            skipped_index.append(start + i)
                            skipped_error.append(str(err))
                h5.create_dataset("skipped_index", data=np.asarray(skipped_index, dtype=np.int64))
                h5.create_dataset(
                    "skipped_error", data=np.asarray(skipped_error, dtype=object), dtype=h5py.string_dtype()
                )
                h5.attrs["format"] = FORMAT_VERSION
                h5.attrs["key"] = self.key
                h5.attrs["n_images"] = self.n
                h5.attrs["n_done"] = self.n
                h5.attrs["n_skipped"] = len(skipped_index)
                h5.attrs["features_sha256"] = digest.hexdigest()
                h5.attrs["complete"] = True
                h5.flush()
                os.fsync(h5.id.get_vfd_handle())
            with writing(self.final):
                os.replace(tmp, self.final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # free the space; the blocks stay for the next run
            raise
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.final

    def close(self) -> None:
        """Keep what was computed so far for the next run to resume; never masks the error that got here."""
        try:
            self.flush()
        except (OSError, TlfeatError) as exc:
            log.warning("could not save the last %d rows (%s); they will be computed again", len(self._errors), exc)
            self._rows, self._errors = [], []


MANIFEST = "manifest.json"
_SHOWN = ("model", "dataset", "split", "layer", "weights_id", "pretrained", "image_size", "limit", "backend")


def _read_manifest(partial: Path) -> dict[str, Any] | None:
    try:
        return json.loads((partial / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _blocks(partial: Path) -> list[tuple[int, int, Path]]:
    """The contiguous run of complete blocks from row 0: (start, stop, path)."""
    found = {}
    for path in partial.glob("*.npz"):
        try:
            start, stop = (int(x) for x in path.stem.split("-"))
        except ValueError:
            continue
        found[start] = (start, stop, path)
    out, row = [], 0
    while row in found:
        out.append(found[row])
        row = found[row][1]
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# errno values that mean "this place cannot be written", with what the user can do about it.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem or process limit",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _check_room(path: Path, needed: int) -> None:
    """Refuse to start a file that cannot fit, before HDF5 half-writes it.

    HDF5 fails badly on a full disk (RuntimeErrors while closing, even a crash at exit), so the
    free space and the process's file-size limit are checked first.
    """
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise _write_failed(
            path, errno.EFBIG, f"needs about {needed / 1e6:.1f} MB, the file-size limit is {limit / 1e6:.1f} MB"
        )
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise _write_failed(path, errno.ENOSPC, f"needs about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free")


def _write_failed(path: Path, code: int, detail: str = "") -> WriteFailed:
    reason = _WRITE_ERRORS[code] + (f": {detail}" if detail else "")
    return WriteFailed(
        f"cannot write {path} ({reason}); free space or choose a writable --cache-dir/--results-dir/--out. "
        "Finished files are untouched and completed blocks are kept for the next run"
    )


def as_write_failed(path: Path, exc: BaseException) -> WriteFailed | None:
    """`exc` as one clear WriteFailed if it means the disk is full or `path` not writable, else None."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in _WRITE_ERRORS:  # HDF5 puts the errno in its message
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return _write_failed(path, code) if code in _WRITE_ERRORS else None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, no permission) into one clear TlfeatError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        clear = as_write_failed(path, exc)
        if clear is None:
            raise
        raise clear from exc


def _attr(value: Any) -> Any:
    """HDF5 attributes take plain str/int/float/bool; None becomes ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # str subclasses such as torch's TorchVersion
    return value


@contextlib.contextmanager
def lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock for computing `final`, so two processes never write the same file.

    A second process waits here, then finds the finished file and reuses it. The lock is the
    kernel's (flock): it goes away with its process, so a killed run never leaves a stale lock.
    """
    lock_path = final.with_name(final.name + ".lock")
    with writing(lock_path):
        final.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a")  # noqa: SIM115 - held for the whole block
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        with fh:
            yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another tlfeat process is computing %s; waiting for it", final.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_attrs(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as h5:
        return {k: _plain(v) for k, v in h5.attrs.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _strings(values: Any) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in values]


def check(path: Path, verify: bool = True) -> dict[str, Any]:
    """The attributes of a whole, current-format cache file; raises CacheDamaged otherwise.

    Cheap checks always (opens, complete, format, datasets and shapes agree); with `verify`, the
    features' sha256 too.
    """
    import h5py

    rebuild = "delete it (or move it away) and run the same `tlfeat extract` again to rebuild it"
    try:
        with h5py.File(path, "r") as h5:
            meta = {k: _plain(v) for k, v in h5.attrs.items()}
            fmt = meta.get("format")
            if fmt != FORMAT_VERSION:
                raise CacheDamaged(
                    f"{path} was written by another tlfeat (format {'unknown' if fmt in (None, '') else fmt}, "
                    f"this one reads {FORMAT_VERSION}); {rebuild}"
                )
            if not meta.get("complete"):
                raise CacheDamaged(f"{path} is incomplete; {rebuild}")
            n = int(meta.get("n_images", -1))
            shapes = {name: h5[name].shape[0] for name in ("features", "labels", "ids")}
            if any(v != n for v in shapes.values()):
                raise CacheDamaged(f"{path} is damaged (rows: {shapes}, expected {n}); {rebuild}")
            if verify and _features_digest(h5["features"]) != meta.get("features_sha256"):
                raise CacheDamaged(f"{path} is damaged (features checksum differs); {rebuild}")
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CacheDamaged(f"{path} is damaged ({_short(exc)}); {rebuild}") from exc
    return meta


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def _features_digest(features: Any) -> str:
    """sha256 of the float32 rows of an array or HDF5 dataset, a block at a time so memory stays flat.

    Equal to the digest `Writer.finish` streams while writing the blocks.
    """
    digest = hashlib.sha256()
    step = max(1, 2**24 // (4 * max(1, features.shape[1])))
    for start in range(0, features.shape[0], step):
        digest.update(np.ascontiguousarray(features[start : start + step], dtype=np.float32).tobytes())
    return digest.hexdigest()


def read(path: Path, verify: bool = True) -> FeatureSet:
    """Load a complete cache file without its skipped images; a damaged one raises CacheDamaged."""
    import h5py

    path = Path(path)
    meta = check(path, verify=False)
    try:
        with h5py.File(path, "r") as h5:
            X = h5["features"][...]
            y = h5["labels"][...]
            ids = _strings(h5["ids"][...])
            names = _strings(h5["class_names"][...])
            skipped = h5["skipped_index"][...] if "skipped_index" in h5 else np.zeros(0, dtype=np.int64)
            errors = _strings(h5["skipped_error"][...]) if "skipped_error" in h5 else []
    except (OSError, KeyError, ValueError) as exc:
        raise CacheDamaged(f"{path} is damaged ({_short(exc)}); delete it and run `tlfeat extract` again") from exc
    if verify and _features_digest(X) != meta.get("features_sha256"):
        raise CacheDamaged(f"{path} is damaged (features checksum differs); delete it and run `tlfeat extract` again")
    meta["skipped"] = [{"id": ids[i], "error": err} for i, err in zip(skipped.tolist(), errors, strict=True)]
    if len(skipped):
        keep = np.ones(len(y), dtype=bool)
        keep[skipped] = False
        X, y, ids = X[keep], y[keep], [i for i, k in zip(ids, keep, strict=True) if k]
    return FeatureSet(X=X, y=y, ids=ids, class_names=names, meta=meta, path=path)


def set_aside(path: Path) -> Path:
    """Move a damaged file out of the way (never delete computed data); returns where it went."""
    aside = path.with_name(path.name + DAMAGED)
    with writing(aside):
        os.replace(path, aside)
    return aside


@dataclass(frozen=True)
class Entry:
    """One cache file as `tlfeat ls` shows it."""

    path: Path
    attrs: dict[str, Any]
    status: str  # "ok", "partial", "damaged", "set aside"
    problem: str = ""


def scan(cache_dir: Path, verify: bool = False) -> list[Entry]:
    """Every cache file (complete, partial or damaged) under `cache_dir`, newest first."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    entries = []
    for path in sorted(cache_dir.glob(f"*{SUFFIX}*")):
        name = path.name
        if name.endswith(SUFFIX):
            try:
                entries.append(Entry(path, check(path, verify=verify), "ok"))
            except CacheDamaged as exc:
                entries.append(Entry(path, _attrs_or_empty(path), "damaged", str(exc)))
        elif name.endswith(SUFFIX + PARTIAL) and path.is_dir():
            manifest = _read_manifest(path) or {}
            blocks = _blocks(path)
            attrs = {
                **_key_attrs(name),
                **manifest.pop("attrs", {}),
                **manifest,
                "n_done": blocks[-1][1] if blocks else 0,
            }
            entries.append(Entry(path, attrs, "partial", "run the same `tlfeat extract` again to finish it"))
        elif name.endswith(SUFFIX + DAMAGED):
            entries.append(
                Entry(path, _attrs_or_empty(path), "set aside", "damaged; extract rebuilt or will rebuild it")
            )
    entries.sort(key=lambda e: str(e.attrs.get("created", "")), reverse=True)
    return entries


def _attrs_or_empty(path: Path) -> dict[str, Any]:
    try:
        return {**_key_attrs(path.name), **read_attrs(path)}
    except OSError:
        return _key_attrs(path.name)


def _key_attrs(name: str) -> dict[str, Any]:
    """model, dataset slug and split from a cache file name, for files whose attributes are unreadable."""
    parts = name.split(SUFFIX)[0].split("__")
    return dict(zip(("model", "dataset", "split"), parts[:3], strict=False))


# Options a user can pass to narrow down which cached set to load, and their attribute names.
SELECTORS = ("layer", "weights_id", "image_size", "limit")


def find(cache_dir: Path, model: str, dataset_id: str, split: str, **selectors: Any) -> Path:
    """The one complete cache file matching (model, dataset, split) and any given selectors."""
    from tlfeat.datasets import dataset_slug

    entries = scan(cache_dir)
    candidates = [
        e
        for e in entries
        if e.status == "ok"
        and e.attrs.get("model") == model
        and e.attrs.get("dataset") == dataset_id
        and e.attrs.get("split") == split
    ]
    prefix = f"{model}__{dataset_slug(dataset_id)}__{split}__"
    damaged = [e for e in entries if e.status == "damaged" and e.path.name.startswith(prefix)]
    if not candidates and damaged:
        raise CacheDamaged(damaged[0].problem)
    if not candidates:
        raise CacheMismatch(
            f"no cached features for model {model!r}, dataset {dataset_id!r}, split {split!r} in {cache_dir}; "
            f"run `tlfeat extract --model {model} --data {dataset_id}` first"
        )
    wanted = {k: v for k, v in selectors.items() if v is not None}
    matching = [e for e in candidates if all(_same(e.attrs.get(k), v) for k, v in wanted.items())]
    if len(matching) > 1 and "limit" not in wanted:  # no limit asked: the whole dataset, where cached
        whole = [e for e in matching if e.attrs.get("limit") in (None, "", 0)]
        matching = whole if len(whole) == 1 else matching
    if len(matching) == 1:
        return matching[0].path
    describe = "; ".join(", ".join(f"{k}={e.attrs.get(k) or '-'}" for k in SELECTORS) for e in (matching or candidates))
    if not matching:
        raise CacheMismatch(
            f"cached features for {model}/{dataset_id}/{split} exist but none has "
            f"{', '.join(f'{k}={v}' for k, v in wanted.items())}; stored: {describe}"
        )
    raise CacheMismatch(
        f"{len(matching)} cached feature sets match {model}/{dataset_id}/{split}; pick one with "
        f"layer=, weights_id=, image_size= or limit=. Stored: {describe}"
    )


def _same(stored: Any, wanted: Any) -> bool:
    if stored in ("", None):
        stored = None
    return stored == wanted or str(stored) == str(wanted)
