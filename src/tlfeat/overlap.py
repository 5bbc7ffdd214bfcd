"""Are test images also training images? Checked from the cache files alone, before a fit.

Every cache file stores the sha256 of each image's bytes (`digests`), so train and test are
compared by content without reading or decoding an image again: the same shard given for both
splits, overlapping patterns, or a folder copied into `train/` and `test/` all show here. A test
set that lies wholly inside train is refused; a partial overlap is a warning and a count in the
fit record (`details["train_test_overlap"]`), which the report shows. Rows without a digest
(images skipped as unreadable, files from a tlfeat that did not store them) are not checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlfeat.errors import TlfeatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overlap:
    n_test: int  # test images compared (those with a digest)
    in_train: int  # of those, images whose bytes are also a training image's
    same_ids: int  # of those, images under the same id in both splits (the same shard or list twice)

    def as_details(self) -> dict[str, int]:
        return {"test_images_in_train": self.in_train, "test_images_checked": self.n_test, "same_ids": self.same_ids}


def _digests(path: Path) -> dict[bytes, str]:
    """Content digest -> id of each readable image of one cache file (rows without a digest left out)."""
    import h5py

    from tlfeat.cache import decode_strings

    try:
        with h5py.File(path, "r") as h5:
            if "digests" not in h5:
                return {}
            digests = np.asarray(h5["digests"][...], dtype=np.uint8)
            ids = decode_strings(h5["ids"][...])
            skipped = set(np.asarray(h5["skipped_index"][...]).tolist())
    except (OSError, KeyError, ValueError):  # a damaged file: loading it says so, in one line
        return {}
    if digests.ndim != 2 or len(digests) != len(ids):
        return {}
    return {bytes(d): i for k, (d, i) in enumerate(zip(digests, ids, strict=True)) if k not in skipped and d.any()}


def measure(train: Path, test: Path) -> Overlap:
    """How many test images of the cache file `test` are training images of `train`, by content."""
    train_digests, test_digests = _digests(train), _digests(test)
    shared = train_digests.keys() & test_digests.keys()
    same = sum(1 for d in shared if train_digests[d] == test_digests[d])
    return Overlap(len(test_digests), len(shared), same)


def check(train: Path, test: Path, dataset: str) -> Overlap:
    """Refuse a test set that is wholly in train; warn (one line) about a partial overlap."""
    found = measure(train, test)
    if found.n_test and found.in_train == found.n_test:
        how = "the same images under the same ids" if found.same_ids == found.n_test else "the same image bytes"
        raise TlfeatError(
            f"every test image of {dataset} is also a training image ({found.in_train} of {found.n_test}, {how}), "
            "so the test accuracy would measure memory, not transfer; give test images that are not in train "
            "(check that train= and test= name different shards, patterns or folders)"
        )
    if found.in_train:
        log.warning(
            "%d of %d test images of %s are also training images (same bytes); the test accuracy is optimistic, "
            "remove them from one split",
            found.in_train,
            found.n_test,
            dataset,
        )
    return found
