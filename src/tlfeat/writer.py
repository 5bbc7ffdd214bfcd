"""Writing a cache file so that no crash, kill or full disk can leave a wrong or half one.

Rows stream into `<final>.partial/` in blocks (features, skipped-image errors, image digests and
ids). Each block is written to a temporary name, synced and renamed, so a process killed at any
instant leaves only whole blocks. `manifest.json` names the key and the image list (`listing`):
a rerun over the same list resumes after the last whole block; over a changed list, the rows of
images that are still there are carried over by id and fingerprint, never by position. `finish`
reserves the disk space of the whole file first (another process may fill the disk meanwhile, and
HDF5 does not survive a failed write), assembles it under a temporary name, syncs it and renames
it, so a file under the final name is always complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import cache, catalog, fsio
from tlfeat.errors import TlfeatError, printable

log = logging.getLogger(__name__)

DIGEST = 32  # bytes of an image's sha256


@dataclass(frozen=True)
class Listing:
    """The image list a file is written for: rows in this order, with their fingerprints."""

    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    stats: np.ndarray  # (n, 2) int64 size, mtime_ns (zeros for in-memory images)
    signature: str  # the dataset's listing signature (see ImageSplit.signature)

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        h = hashlib.sha256(self.signature.encode())
        h.update(b"\0".join(cache.encode_strings(self.ids)))
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        h.update(b"\0".join(cache.encode_strings(self.class_names)))
        h.update(np.ascontiguousarray(self.stats, dtype=np.int64).tobytes())
        return h.hexdigest()


@dataclass
class Block:
    """Rows of one saved block, as read back for resuming or carrying over."""

    start: int
    features: np.ndarray
    errors: np.ndarray
    digests: np.ndarray
    ids: list[str]
    stats: np.ndarray


def _block_bytes(
    features: np.ndarray, errors: list[str], digests: np.ndarray, ids: list[str], stats: np.ndarray
) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        features=features,
        errors=np.asarray(cache.encode_strings(errors), dtype=bytes) if errors else np.zeros(0, dtype="S1"),
        digests=digests,
        ids=np.asarray(cache.encode_strings(ids), dtype=bytes) if ids else np.zeros(0, dtype="S1"),
        stats=stats,
    )
    return buf.getvalue()


def load_block(path: Path) -> Block | None:
    """A saved block, or None when it is unreadable (cut short, edited): it is computed again."""
    try:
        start, _ = (int(x) for x in path.stem.split("-"))
        if not path.is_file():  # a FIFO or a folder of that name: nothing to read (and never to wait on)
            return None
        with np.load(path) as f:
            feats, errors, digests = f["features"], f["errors"], f["digests"]
            ids, stats = f["ids"], f["stats"]
        n = len(feats)
        if not (len(errors) == len(digests) == len(ids) == len(stats) == n) or feats.ndim != 2:
            return None
        return Block(start, feats, errors, digests, cache.decode_strings(ids), stats)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def whole_blocks(partial: Path) -> list[tuple[int, int, Path]]:
    """The contiguous run of readable blocks from row 0: (start, stop, path). Later ones are dropped."""
    found: dict[int, tuple[int, int, Path]] = {}
    for path in partial.glob("*.npz"):
        try:
            start, stop = (int(x) for x in path.stem.split("-"))
        except ValueError:
            continue
        found[start] = (start, stop, path)
    out, row = [], 0
    while row in found:
        block = load_block(found[row][2])
        if block is None or len(block.features) != found[row][1] - row:
            log.warning("block %s is unreadable; computing its rows again", found[row][2].name)
            break
        out.append(found[row])
        row = found[row][1]
    return out


class Writer:
    """Streams feature rows into `<final>.partial/` and assembles the HDF5 file at the end."""

    def __init__(self, final: Path, key: str, attrs: dict[str, Any], listing: Listing, flush_every: int = 1024) -> None:
        self.final = Path(final)
        self.partial = self.final.with_name(self.final.name + cache.PARTIAL)
        self.key, self.attrs, self.listing = key, dict(attrs), listing
        self.n = len(listing)
        self.flush_every = max(1, int(flush_every))
        self._rows: list[np.ndarray] = []
        self._errors: list[str] = []
        self._digests: list[np.ndarray] = []
        self.done = 0
        self.leftover: list[Block] = []  # blocks of an earlier image list, to carry rows over from
        manifest = {"key": key, "n_images": self.n, "format": cache.FORMAT_VERSION, "listing": listing.digest()}
        shown = {k: _attr(v) for k, v in attrs.items() if k in catalog.SHOWN}  # for `tlfeat ls` while in progress
        with fsio.writing(self.partial):
            if self.partial.is_file():  # a partial HDF5 file from tlfeat 0.1: start over
                self.partial.unlink()
            stored = (catalog.read_manifest(self.partial) or {}) if self.partial.is_dir() else {}
            blocks = whole_blocks(self.partial) if self.partial.is_dir() else []
            if blocks and {k: stored.get(k) for k in manifest} == manifest:
                self._drop_after(blocks[-1][1])
                self.done = blocks[-1][1]
                log.info("resuming %s after %d of %d images", self.partial.name, self.done, self.n)
            else:
                if blocks and stored.get("key") == key:
                    self.leftover = [b for _, _, p in blocks if (b := load_block(p)) is not None]
                    log.info(
                        "the image list changed since %s was started; carrying over its rows by id", self.partial.name
                    )
                shutil.rmtree(self.partial, ignore_errors=True)
                self.partial.mkdir(parents=True)
                fsio.atomic_write(self.partial / catalog.MANIFEST, json.dumps({**manifest, "attrs": shown}))
        self.flushed = self.resumed_from = self.done

    def _drop_after(self, row: int) -> None:
        for path in self.partial.glob("*.npz"):
            try:
                start = int(path.stem.split("-")[0])
            except ValueError:
                continue
            if start >= row:
                path.unlink(missing_ok=True)

    def append(self, feats: np.ndarray, errors: list[str] | None = None, digests: np.ndarray | None = None) -> None:
        """Add the next rows; `errors[i]` non-empty marks row i as a skipped image (stored as NaN)."""
        feats = np.array(feats, dtype=np.float32)
        if feats.ndim != 2 or (self._rows and feats.shape[1] != self._rows[0].shape[1]):
            raise TlfeatError(f"internal: feature rows of shape {feats.shape} do not fit this file")
        errors = list(errors) if errors is not None else [""] * len(feats)
        for i, err in enumerate(errors):
            if err:
                feats[i] = np.nan
        if digests is None:
            digests = np.zeros((len(feats), DIGEST), dtype=np.uint8)
        self._rows.append(feats)
        self._errors.extend(errors)
        self._digests.append(np.asarray(digests, dtype=np.uint8).reshape(len(feats), DIGEST))
        self.done += len(feats)
        if self.done - self.flushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one block; after this returns they survive any crash."""
        if not self._rows:
            return
        rows = np.concatenate(self._rows)
        start, stop = self.flushed, self.flushed + len(rows)
        data = _block_bytes(
            rows,
            self._errors,
            np.concatenate(self._digests),
            self.listing.ids[start:stop],
            self.listing.stats[start:stop],
        )
        fsio.atomic_write(self.partial / f"{start:010d}-{stop:010d}.npz", data)
        self._rows, self._errors, self._digests, self.flushed = [], [], [], stop

    def close(self) -> None:
        """Keep what was computed so far for the next run to resume; never masks the error that got here."""
        try:
            self.flush()
        except (OSError, TlfeatError) as exc:
            log.warning("could not save the last %d rows (%s); they will be computed again", len(self._errors), exc)
            self._rows, self._errors, self._digests = [], [], []
        if not self.leftover and self.partial.is_dir() and not whole_blocks(self.partial):
            shutil.rmtree(self.partial, ignore_errors=True)  # nothing computed yet: nothing for `ls` to list

    def finish(self, extra_attrs: dict[str, Any]) -> Path:
        self.flush()
        blocks = whole_blocks(self.partial)
        if self.done != self.n or not blocks or blocks[-1][1] != self.n:
            raise TlfeatError(f"internal: wrote {self.done} of {self.n} feature rows")
        self._refuse_if_all_skipped(blocks)
        with np.load(blocks[0][2]) as first:
            dim = int(first["features"].shape[1])
        tmp = fsio.temp_name(self.final)
        size = _estimate_size(self.n, dim, self.listing)
        fsio.check_room(tmp, size)
        try:
            with fsio.writing(tmp):
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                with os.fdopen(fd, "r+b") as fh:
                    _reserve(fd, size, tmp)
                    _assemble(fh, blocks, dim, self, extra_attrs)
                    fh.flush()
                    os.fsync(fd)
                os.replace(tmp, self.final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # free the space; the blocks stay for the next run
            raise
        fsio.fsync_dir(self.final.parent)
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.final

    def _refuse_if_all_skipped(self, blocks: list[tuple[int, int, Path]]) -> None:
        """A split whose every image was skipped is an error: no file of zero features is written."""
        errors: list[str] = []
        for _, _, path in blocks:
            block = load_block(path)
            found = cache.decode_strings(block.errors) if block is not None else [""]
            if not all(found):
                return
            errors += found[: 3 - len(errors)]
        shutil.rmtree(self.partial, ignore_errors=True)  # nothing in it is worth resuming
        split, dataset = self.attrs.get("split", "?"), self.attrs.get("dataset", "?")
        raise TlfeatError(
            f"every one of the {self.n} image(s) of split {split!r} of {printable(str(dataset))} was skipped as "
            f"unreadable, so no features were written (first: {'; '.join(errors)}); fix or replace them and run again"
        )


def _assemble(fh: Any, blocks: list[tuple[int, int, Path]], dim: int, w: Writer, extra_attrs: dict[str, Any]) -> None:
    """Write the whole HDF5 file into `fh`, whose disk space is already reserved."""
    import h5py

    digest = hashlib.sha256()
    skipped_index: list[int] = []
    skipped_error: list[str] = []
    digests = np.zeros((w.n, DIGEST), dtype=np.uint8)
    with h5py.File(fh, "w") as h5:
        for name, value in {**w.attrs, **extra_attrs}.items():
            h5.attrs[name] = _attr(value)
        features = h5.create_dataset(
            "features", shape=(w.n, dim), dtype=np.float32, chunks=(max(1, min(w.n, 2**20 // (4 * dim))), dim)
        )
        for start, stop, path in blocks:
            block = load_block(path)
            if block is None:
                raise TlfeatError(f"block {path} became unreadable while assembling; run the same command again")
            features[start:stop] = block.features
            digest.update(np.ascontiguousarray(block.features, dtype=np.float32).tobytes())
            digests[start:stop] = block.digests
            for i, err in enumerate(cache.decode_strings(block.errors)):
                if err:
                    skipped_index.append(start + i)
                    skipped_error.append(err)
        labels = np.asarray(w.listing.labels, dtype=np.int64)
        stats = np.asarray(w.listing.stats, dtype=np.int64).reshape(-1, 2)
        h5.create_dataset("labels", data=labels)
        h5.create_dataset("ids", data=cache.encode_strings(w.listing.ids), dtype=h5py.string_dtype())
        h5.create_dataset("class_names", data=cache.encode_strings(w.listing.class_names), dtype=h5py.string_dtype())
        h5.create_dataset("stats", data=stats)
        h5.create_dataset("digests", data=digests)
        h5.create_dataset("skipped_index", data=np.asarray(skipped_index, dtype=np.int64))
        h5.create_dataset("skipped_error", data=cache.encode_strings(skipped_error), dtype=h5py.string_dtype())
        features_sha, index_sha = (
            digest.hexdigest(),
            cache.index_digest(
                labels, w.listing.ids, w.listing.class_names, stats, digests, np.asarray(skipped_index), skipped_error
            ),
        )
        h5.attrs.update(
            {
                "format": cache.FORMAT_VERSION,
                "key": w.key,
                "n_images": w.n,
                "n_features": dim,
                "n_done": w.n,
                "n_skipped": len(skipped_index),
                "features_sha256": features_sha,
                "index_sha256": index_sha,
                "sha256": cache.combined_digest(features_sha, index_sha),
                "listing_sha256": w.listing.digest(),
                "signature": w.listing.signature,
                "complete": True,
            }
        )


def _estimate_size(n: int, dim: int, listing: Listing) -> int:
    """A generous bound on the assembled file's size, so the reservation covers every write."""
    ids = sum(len(i.encode("utf-8", "surrogateescape")) + 48 for i in listing.ids)
    names = sum(len(c.encode("utf-8", "surrogateescape")) + 48 for c in listing.class_names)
    rows = n * (dim * 4 + 8 + 16 + DIGEST)
    return int((rows + ids + names) * 1.1) + (1 << 20) + 64 * 1024 * max(1, n // 4096)


_libc: Any = None


def _reserve(fd: int, size: int, path: Path) -> None:
    """Claim `size` bytes of disk for `fd` without changing its length (FALLOC_FL_KEEP_SIZE)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    if _libc.fallocate(fd, 1, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return  # a filesystem without reservations: the free space was checked before
        raise fsio.as_write_failed(path, OSError(code, os.strerror(code))) or OSError(code, os.strerror(code))


def _attr(value: Any) -> Any:
    """HDF5 attributes take plain str/int/float/bool; None becomes ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value
