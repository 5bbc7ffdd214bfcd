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
