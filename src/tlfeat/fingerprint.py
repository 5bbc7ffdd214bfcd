"""Has a dataset changed since its features were cached? Which images, exactly?

A cache file stores, per image, its id, label, size, modification time and the sha256 of its
bytes. `compare` matches the dataset as it is now against that, by id: an image whose size and
time are unchanged is taken as unchanged (unless `verify_content`); one whose size or time moved
is read and hashed, so a `touch` is not a change but a replaced picture is. The result says what
was added, removed, modified or relabelled, and which stored row each unchanged image can reuse.

A touched image is hashed once: `compare_file` keeps the sizes and times it verified beside the
cache file (`<file>.touched.npz`, bound to the file's checksum; the file itself is never
rewritten for a touch), so later runs take them as they do the stored ones.
"""

from __future__ import annotations

import io
import logging
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import cache, fsio
from tlfeat.cache import Index
from tlfeat.datasets import ImageSplit
from tlfeat.errors import TlfeatError, printable

log = logging.getLogger(__name__)

HASH_THREADS = 8  # reading files is I/O bound; hashlib releases the GIL


@dataclass
class Changes:
    """How the current image list differs from a stored one."""

    carry: dict[int, int] = field(default_factory=dict)  # current row -> stored row with the same image
    added: list[int] = field(default_factory=list)  # current rows with no stored image
    modified: list[int] = field(default_factory=list)  # current rows whose image changed
    removed: list[str] = field(default_factory=list)  # stored ids no longer there
    relabelled: list[int] = field(default_factory=list)  # current rows with the same image, another label
    reordered: bool = False  # the same images in another order (rows are rewritten, nothing computed)
    digests: dict[int, bytes] = field(default_factory=dict)  # digests computed while comparing
    carried_skipped: list[int] = field(default_factory=list)  # carried rows the file holds as unreadable
    retried: list[int] = field(default_factory=list)  # of those, rows that read now: computed again
    restat: dict[int, tuple[int, int]] = field(default_factory=dict)  # stored row -> verified (size, mtime)

    @property
    def stale(self) -> bool:
        return bool(self.added or self.modified or self.removed or self.relabelled or self.reordered or self.retried)

    def retry(self, rows: list[int]) -> None:
        """Compute these carried rows again (images skipped as unreadable that read now)."""
        for i in rows:
            self.carry.pop(i, None)
        self.retried = sorted(set(self.retried) | set(rows))

    def summary(self) -> str:
        parts = [
            f"{len(v)} {name}"
            for name, v in (
                ("added", self.added),
                ("removed", self.removed),
                ("modified", self.modified),
                ("relabelled", self.relabelled),
                ("unreadable before, readable now", self.retried),
            )
            if v
        ]
        if self.reordered and not parts:
            parts.append("rows reordered")
        return ", ".join(parts) or "unchanged"

    def examples(self, split: ImageSplit, n: int = 3) -> str:
        """A few ids of each kind, for a message."""
        out = []
        for name, rows in (("added", self.added), ("modified", self.modified), ("relabelled", self.relabelled)):
            if rows:
                out.append(f"{name}: " + ", ".join(printable(split.ids[i]) for i in rows[:n]))
        if self.removed:
            out.append("removed: " + ", ".join(printable(i) for i in self.removed[:n]))
        return "; ".join(out)


def unchanged(n: int) -> Changes:
    return Changes(carry={i: i for i in range(n)})


def compare(
    stored: Index,
    stored_signature: str,
    current: ImageSplit,
    verify_content: bool = False,
    verified: dict[int, tuple[int, int]] | None = None,
) -> Changes:
    """Match `current` against a cache file's index, by id and fingerprint. `verified`: sizes and
    times of stored rows whose content was hashed since and found the same (a touch)."""
    if not verify_content and stored_signature and stored_signature == current.signature():
        return _with_skipped(unchanged(len(current)), stored)
    verified = verified or {}
    rows = {sid: j for j, sid in enumerate(stored.ids)}
    stored_names = [stored.class_names[int(y)] for y in stored.labels]
    current_names = [current.class_names[int(y)] for y in current.labels]
    known = current.known_digests()
    changes = Changes()
    to_hash: list[tuple[int, int]] = []  # (current row, stored row) whose content must be compared
    for i, cid in enumerate(current.ids):
        j = rows.get(cid)
        if j is None:
            changes.added.append(i)
            continue
        same_stat = current.stats is not None and (
            np.array_equal(current.stats[i], stored.stats[j]) or verified.get(j) == tuple(current.stats[i].tolist())
        )
        if known is not None:
            if bytes(known[i]) == bytes(stored.digests[j]):
                changes.carry[i] = j
            else:
                changes.modified.append(i)
        elif same_stat and not verify_content:
            changes.carry[i] = j
        else:
            to_hash.append((i, j))
    for (i, j), digest in zip(to_hash, _hash_rows(current, [i for i, _ in to_hash]), strict=True):
        changes.digests[i] = digest
        if digest == bytes(stored.digests[j]):
            changes.carry[i] = j
            if current.stats is not None and digest != bytes(32):
                changes.restat[j] = (int(current.stats[i][0]), int(current.stats[i][1]))
        else:
            changes.modified.append(i)
    changes.modified.sort()
    changes.relabelled = [i for i, j in changes.carry.items() if stored_names[j] != current_names[i]]
    current_ids = set(current.ids)
    changes.removed = [sid for sid in stored.ids if sid not in current_ids]
    changes.reordered = not changes.stale and (
        len(stored.ids) != len(current.ids)
        or any(i != j for i, j in changes.carry.items())
        or list(stored.class_names) != list(current.class_names)
    )
    return _with_skipped(changes, stored)


def _with_skipped(changes: Changes, stored: Index) -> Changes:
    skipped = set(stored.skipped_index.tolist())
    changes.carried_skipped = sorted(i for i, j in changes.carry.items() if j in skipped)
    return changes


def _touched_path(path: Path) -> Path:
    return path.with_name(path.name + ".touched.npz")


def _load_touched(path: Path, sha256: str) -> tuple[dict[int, tuple[int, int]], str]:
    """(stored row -> verified size and time, the listing signature they make) kept beside a cache file."""
    if not _touched_path(path).is_file():
        return {}, ""
    try:
        with np.load(_touched_path(path), allow_pickle=False) as f:
            if str(f["sha256"]) != sha256:  # written for an earlier version of the file
                return {}, ""
            rows, stats, signature = f["rows"], f["stats"], str(f["signature"])
        return {int(j): (int(a), int(b)) for j, (a, b) in zip(rows, stats.reshape(-1, 2), strict=True)}, signature
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return {}, ""


def _save_touched(path: Path, sha256: str, verified: dict[int, tuple[int, int]], signature: str) -> None:
    buf = io.BytesIO()
    rows = sorted(verified)
    np.savez(
        buf,
        sha256=np.asarray(sha256),
        rows=np.asarray(rows, dtype=np.int64),
        stats=np.asarray([verified[j] for j in rows], dtype=np.int64).reshape(-1, 2),
        signature=np.asarray(signature),
    )
    try:
        fsio.atomic_write(_touched_path(path), buf.getvalue())
    except (OSError, TlfeatError) as exc:  # a read-only cache: the next run hashes them again
        log.debug("cannot keep the verified times of %s: %s", path.name, exc)


def compare_file(path: Path, meta: dict[str, Any], current: ImageSplit, verify_content: bool = False) -> Changes:
    """`compare` against the cache file at `path` (its attributes `meta`), remembering touched images."""
    sha256 = str(meta.get("sha256", ""))
    verified, touched_signature = _load_touched(path, sha256)
    signature = current.signature()
    if not verify_content and signature in (str(meta.get("signature", "")), touched_signature):
        changes = unchanged(len(current))
        return _with_skipped(changes, cache.stored_index(path)) if int(meta.get("n_skipped") or 0) else changes
    changes = compare(cache.stored_index(path), "", current, verify_content, verified)
    if changes.restat or (verified and not changes.stale):
        verified.update(changes.restat)
        _save_touched(path, sha256, verified, "" if changes.stale else signature)
    return changes


def _hash_rows(split: ImageSplit, rows: list[int]) -> list[bytes]:
    """sha256 of the bytes of each row's image (zeros for one that cannot be read now)."""

    def one(i: int) -> bytes:
        try:
            return split.content_digest(i)
        except TlfeatError:
            return bytes(32)

    if len(rows) < 16:
        return [one(i) for i in rows]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(one, rows))
