"""A full disk, a per-file size limit and a read-only cache: one clear line, earlier files intact, resumable."""

from __future__ import annotations

import hashlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlfeat import cache, catalog

from ..conftest import make_tree
from .helpers import FAST, assert_one_clear_line, cli, env
from .tmpfs import Tmpfs, can_mount, tmpfs


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


def _file_size_limit(nbytes: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def test_file_size_limit_while_writing_the_cache(tmp_path: Path) -> None:
    """RLIMIT_FSIZE works for any user: blocks (8 KB) fit, the assembled file (50 KB) does not."""
    tree = make_tree(tmp_path / "tree", per_class=8)
    cache_dir = tmp_path / "cache"
    args = ["extract", "--data", tree, *FAST, "--cache-dir", cache_dir]
    assert cli(*args, "--split", "test").returncode == 0
    before = _digest(cache_dir)

    proc = cli(*args, "--split", "train", env=env(TLFEAT_FLUSH_EVERY="4"), preexec_fn=_file_size_limit(40_000))
    assert_one_clear_line(proc, "cannot write", "file too large", "completed blocks are kept")
    assert _digest(cache_dir) == before, "files already complete must not change"
    [partial] = [e for e in catalog.scan(cache_dir) if e.status == "partial"]
    assert partial.attrs["n_done"] == 24 and not list(cache_dir.glob("*.writing"))

    rerun = cli(*args, "--split", "train")
    assert rerun.returncode == 0, rerun.stderr
    [train] = [cache.read(e.path) for e in catalog.scan(cache_dir) if e.attrs.get("split") == "train"]
    assert train.meta["resumed_from"] == 24, "every row was computed before the limit hit: nothing is recomputed"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A real 2 MiB tmpfs: mounted where the test may, else in a user namespace (no rights needed)."""
    with tmpfs(tmp_path / "fs", "2m", "mount" if can_mount() else "userns") as fs:
        yield fs


def test_full_disk_keeps_earlier_files_and_resumes_when_space_is_freed(tmp_path: Path, small_fs: Tmpfs) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8)
    cache_dir = small_fs.path / "cache"
    args = ["extract", "--data", tree, *FAST, "--cache-dir", cache_dir]
    assert cli(*args, "--split", "test").returncode == 0
    before = _digest(cache_dir)
    filler = small_fs.path / "filler"
    free = os.statvfs(small_fs.path).f_bavail * os.statvfs(small_fs.path).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 120_000))  # room for the blocks, not for the assembled file

    proc = cli(*args, "--split", "train", env=env(TLFEAT_FLUSH_EVERY="4"))
    assert_one_clear_line(proc, "cannot write", "no space left on the device")
    assert _digest(cache_dir) == before

    [partial] = [e for e in catalog.scan(cache_dir) if e.status == "partial"]
    assert partial.attrs["n_done"] == 24

    filler.unlink()
    rerun = cli(*args, "--split", "train")
    assert rerun.returncode == 0, rerun.stderr
    statuses = {e.attrs.get("split"): e.status for e in catalog.scan(cache_dir)}
    assert statuses == {"train": "ok", "test": "ok"}
    [train] = [cache.read(e.path) for e in catalog.scan(cache_dir) if e.attrs.get("split") == "train"]
    assert train.meta["resumed_from"] == 24


def test_read_only_cache_and_results(tmp_path: Path, small_fs: Tmpfs) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8)
    cache_dir, results = small_fs.path / "cache", small_fs.path / "results"
    args = ["extract", "--data", tree, *FAST, "--cache-dir", cache_dir]
    assert cli(*args).returncode == 0
    before = _digest(cache_dir)
    small_fs.read_only()

    assert_one_clear_line(cli(*args, "--image-size", "48"), "cannot write", "read-only")
    fit = cli("fit", "--clf", "logreg", "--C", "1", "--cache-dir", cache_dir, "--results-dir", results)
    assert_one_clear_line(fit, "cannot write", "read-only", str(results))  # the line names what it could not write
    listing = cli("ls", "--cache-dir", cache_dir)
    assert listing.returncode == 0 and listing.stdout.count(" ok ") == 2, listing.stdout
    reused = cli(*args)  # reading a complete cache needs no write access
    assert reused.returncode == 0 and reused.stdout.count("cached, no work done") == 2, reused.stderr
    assert _digest(cache_dir) == before
