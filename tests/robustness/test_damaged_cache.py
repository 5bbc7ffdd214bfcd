"""Damaged cache files (truncated, edited, older format): detected on load, marked by `ls`, rebuilt by `extract`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from tlfeat import cache, catalog, load_features
from tlfeat.errors import CacheDamaged

from ..conftest import make_tree
from .helpers import FAST, cli


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_one_value(path: Path) -> None:
    with h5py.File(path, "r+") as h5:
        h5["features"][3, 7] += 0.5


def _older_format(path: Path) -> None:
    with h5py.File(path, "r+") as h5:
        h5.attrs["format"] = 0


def _incomplete(path: Path) -> None:
    with h5py.File(path, "r+") as h5:
        h5.attrs["complete"] = False


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncate, "damaged"),
        (_edit_one_value, "checksum differs"),
        (_older_format, "written by an older tlfeat (format 0"),
        (_incomplete, "incomplete"),
    ],
    ids=["truncated", "edited", "older-format", "incomplete"],
)
def test_damage_is_detected_marked_and_rebuilt(tmp_path: Path, damage: Callable[[Path], None], why: str) -> None:
    tree = make_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    args = ["extract", "--data", tree, *FAST, "--split", "train", "--cache-dir", cache_dir]
    assert cli(*args).returncode == 0
    [entry] = catalog.scan(cache_dir)
    original = cache.read(entry.path)
    damage(entry.path)

    with pytest.raises(CacheDamaged, match=re.escape(why)):
        load_features("resnet18", str(tree), cache_dir=cache_dir)
    listing = cli("ls", "--cache-dir", cache_dir)
    assert listing.returncode == 0 and "DAMAGED" in listing.stdout and why in listing.stdout, listing.stdout

    rebuilt = cli(*args)
    assert rebuilt.returncode == 0 and "computed in" in rebuilt.stdout, rebuilt.stderr
    assert "moved it to" in rebuilt.stderr
    assert np.array_equal(cache.read(entry.path).X, original.X)
    aside = entry.path.with_name(entry.path.name + cache.DAMAGED)
    assert aside.is_file(), "the damaged file is set aside, not deleted"
    statuses = sorted(e.status for e in catalog.scan(cache_dir))
    assert statuses == ["ok", "set aside"]


def test_a_file_from_tlfeat_0_1_is_set_aside_and_extracted_again(tmp_path: Path) -> None:
    """tlfeat 0.1 wrote format 1: no fingerprints, no index checksum, and a key of its own (the format
    is part of the key), so no request of this version names it: extract moves it aside, never deletes it."""
    tree = make_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    args = ["extract", "--data", tree, *FAST, "--split", "train", "--cache-dir", cache_dir]
    assert cli(*args).returncode == 0
    [entry] = catalog.scan(cache_dir)
    original = cache.read(entry.path)
    old = entry.path.with_name(entry.path.name.rsplit("__", 1)[0] + "__0123456789abcdef.h5")
    entry.path.rename(old)
    with h5py.File(old, "r+") as h5:  # the 0.1 layout
        h5.attrs["format"] = 1
        for name in ("stats", "digests"):
            del h5[name]
        for name in ("index_sha256", "sha256", "listing_sha256", "signature", "key_fields"):
            del h5.attrs[name]
    written = old.read_bytes()

    listing = cli("ls", "--cache-dir", cache_dir)
    assert "DAMAGED" in listing.stdout and "older tlfeat (format 1" in listing.stdout, listing.stdout
    with pytest.raises(CacheDamaged, match=re.escape("older tlfeat (format 1")):
        load_features("resnet18", str(tree), cache_dir=cache_dir)
    rebuilt = cli(*args)
    assert rebuilt.returncode == 0 and "computed in" in rebuilt.stdout, rebuilt.stderr
    assert "written by an older tlfeat (format 1)" in rebuilt.stderr
    aside = old.with_name(old.name + cache.DAMAGED)
    assert not old.exists() and aside.read_bytes() == written, "set aside whole, never deleted"
    assert np.array_equal(cache.read(entry.path).X, original.X)
    assert sorted(e.status for e in catalog.scan(cache_dir)) == ["ok", "set aside"]
