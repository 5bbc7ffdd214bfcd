"""`ImageSplit`: one split of one dataset, in a fixed order, and what it was listed from.

Every source (named dataset, folder tree, WebDataset shards, Parquet) resolves to an ImageSplit:
labels, stable sample ids, class names, how to read each image, and what identifies the images
as they are now (`stats`: size and modification time per file; `signature`: a digest of the whole
listing). The cache stores these, so a later run can tell whether the images changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfeat import images
from tlfeat.datasets.readers import parquet_bytes, read_range
from tlfeat.errors import TlfeatError, printable

if TYPE_CHECKING:
    from PIL import Image

SPLIT_SEED = 0  # flat folders and digits are split with this seed (recorded in every cache file)
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class ImageSplit:
    """One split of one dataset: what to feed the model, in a fixed order."""

    dataset: str  # the canonical dataset id: a name ("mnist"), an absolute folder path, a shard spec
    split: str
    class_names: tuple[str, ...]
    labels: np.ndarray  # int64 (n,)
    ids: tuple[str, ...]  # file paths relative to the dataset root, "train/123", or sample keys
    source: str  # where the images were read from, for provenance
    kind: str = "files"
    refs: tuple[Any, ...] = ()  # files: path; members: (tar, offset, size); parquet: (file, group, row, column)
    arrays: np.ndarray | None = field(default=None, repr=False)  # arrays: (n, h, w[, 3]) uint8
    stats: np.ndarray | None = field(default=None, repr=False)  # (n, 2) int64: size, mtime_ns
    source_files: tuple[str, ...] = ()  # named datasets: the files the arrays were read from

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, i: int) -> images.Item:
        """How to read image i, as a picklable description a decoding worker can act on."""
        if self.kind == "files":
            return ("path", self.refs[i])
        if self.kind == "arrays":
            assert self.arrays is not None
            return ("array", (self.arrays[i], self.ids[i]))
        try:  # read here, in the main process; what cannot be read fails where decoding errors are handled
            if self.kind == "members":
                tar, offset, size = self.refs[i]
                return ("bytes", (read_range(tar, offset, size), f"{tar}:{self.ids[i]}"))
            return ("bytes", (parquet_bytes(self.refs[i]), f"{self.refs[i][0]}:{self.ids[i]}"))
        except TlfeatError as exc:  # so `--on-error skip` records it like any unreadable image
            return ("error", str(exc))

    def items(self, indices: Any) -> list[images.Item]:
        return [self.item(int(i)) for i in indices]

    def image(self, i: int) -> Image.Image:
        """The i-th image as an 8-bit RGB PIL image."""
        content, name = images.read(self.item(i))
        return images.decode(content, name)

    def known_digests(self) -> np.ndarray | None:
        """Content digests that cost nothing to compute (in-memory arrays), else None."""
        if self.kind != "arrays" or self.arrays is None:
            return None
        return np.frombuffer(b"".join(images.content_digest(a) for a in self.arrays), dtype=np.uint8).reshape(-1, 32)

    def content_digest(self, i: int) -> bytes:
        """sha256 of image i's stored bytes (reads the file)."""
        content, _ = images.read(self.item(i))
        return images.content_digest(content)

    def signature(self) -> str:
        """A digest of what identifies these images now: the listing with sizes and times, or the
        source files of a named dataset. Equal signatures mean nothing needs to be compared row by row."""
        digest = hashlib.sha256()
        digest.update("\0".join(self.class_names).encode("utf-8", "surrogateescape"))
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        digest.update("\0".join(self.ids).encode("utf-8", "surrogateescape"))
        if self.stats is not None:
            digest.update(np.ascontiguousarray(self.stats, dtype=np.int64).tobytes())
        for path in self.source_files:
            try:
                st = Path(path).stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                digest.update(f"{path}\0missing\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def subset(self, indices: np.ndarray) -> ImageSplit:
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            labels=self.labels[idx],
            ids=tuple(self.ids[i] for i in idx),
            refs=tuple(self.refs[i] for i in idx) if self.refs else (),
            arrays=None if self.arrays is None else self.arrays[idx],
            stats=None if self.stats is None else self.stats[idx],
        )


def from_arrays(
    name: str,
    split: str,
    arrays: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    source: str,
    source_files: tuple[str, ...] = (),
    ids: tuple[str, ...] | None = None,
) -> ImageSplit:
    labels = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):  # a damaged or edited label file: one line, never an index error further on
        where = source_files[-1] if source_files else source
        raise TlfeatError(
            f"{printable(where)} gives sample {int(bad[0])} the label {int(labels[bad[0]])}, but {name} has "
            f"{len(classes)} classes (0-{len(classes) - 1}); replace the file with a good copy"
        )
    return ImageSplit(
        dataset=name,
        split=split,
        class_names=tuple(classes),
        labels=labels,
        ids=ids if ids is not None else tuple(f"{split}/{i}" for i in range(len(labels))),
        source=source,
        kind="arrays",
        arrays=np.ascontiguousarray(arrays, dtype=np.uint8),
        source_files=source_files,
    )


def _hash_order(ids: Any, seed: int) -> np.ndarray:
    """A pseudo-random but stable order of samples: each sample's place depends on its id alone, so
    adding or removing an image moves no other image in or out of a split or a subset."""
    key = str(seed).encode()
    digests = b"".join(
        hashlib.blake2b(str(i).encode("utf-8", "surrogateescape"), digest_size=8, key=key).digest() for i in ids
    )
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def stratified_subset(labels: np.ndarray, n: int, seed: int = SPLIT_SEED, *, ids: Any) -> np.ndarray:
    """Indices of a fixed subset of `n` samples with class proportions kept, in original order."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    order = _hash_order(ids, seed)
    # Give each sample a position in (0, 1) within its class; taking the n smallest positions
    # takes about the same fraction of every class.
    rank = np.empty(len(labels), dtype=np.float64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[np.argsort(order[members], kind="stable")]
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)
    chosen = np.lexsort((order, labels, rank))
    return np.sort(chosen[:n].astype(np.int64))


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED, *, ids: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices; every class with 2+ samples appears in both, chosen by id (stable)."""
    labels = np.asarray(labels)
    order = _hash_order(ids, seed)
    train: list[int] = []
    test: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[np.argsort(order[members], kind="stable")]
        n_test = int(round(len(members) * test_fraction))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))
