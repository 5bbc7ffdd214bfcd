"""Has a dataset changed since its features were cached? Which images, exactly?

A cache file stores, per image, its id, label, size, modification time and the sha256 of its
bytes. `compare` matches the dataset as it is now against that, by id: an image whose size and
time are unchanged is taken as unchanged (unless `verify_content`); one whose size or time moved
is read and hashed, so a `touch` is not a change but a replaced picture is. The result says what
was added, removed, modified or relabelled, and which stored row each unchanged image can reuse.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tlfeat.cache import Index
from tlfeat.datasets import ImageSplit
from tlfeat.errors import TlfeatError, printable

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

    @property
    def stale(self) -> bool:
        return bool(self.added or self.modified or self.removed or self.relabelled or self.reordered)

    def summary(self) -> str:
        parts = [
            f"{len(v)} {name}"
            for name, v in (
                ("added", self.added),
                ("removed", self.removed),
                ("modified", self.modified),
                ("relabelled", self.relabelled),
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


def compare(stored: Index, stored_signature: str, current: ImageSplit, verify_content: bool = False) -> Changes:
    """Match `current` against a cache file's index, by id and fingerprint."""
    if not verify_content and stored_signature and stored_signature == current.signature():
        return unchanged(len(current))
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
        same_stat = current.stats is not None and np.array_equal(current.stats[i], stored.stats[j])
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
