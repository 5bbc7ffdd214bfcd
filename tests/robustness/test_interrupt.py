"""Kill a real extraction mid-run (SIGKILL, Ctrl-C): the rerun resumes and equals an uninterrupted run.

No timer decides when the signal lands: the child stops itself (SIGSTOP) once it has saved a given
number of blocks, the test waits until the kernel reports it stopped, sends the signal, and lets it
continue. However busy the machine, the signal arrives mid-run, at the same place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tlfeat import cache, catalog

from ..conftest import make_tree
from .helpers import FAST, cli, env

# Runs `tlfeat ARGS`; after saving STOP_AFTER blocks the process stops itself until it gets SIGCONT.
STOPPING_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from tlfeat import writer
    stop_after = int(os.environ["STOP_AFTER"])
    original = writer.Writer.flush
    stopped = []
    def flush(self):
        original(self)
        if not stopped and len(list(self.partial.glob("*.npz"))) == stop_after:
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGSTOP)
    writer.Writer.flush = flush
    from tlfeat_cli.main import cli
    cli(sys.argv[1:], prog_name="tlfeat")
    """
)


def wait_until_stopped(pid: int, timeout: float = 300) -> None:
    """Block until the kernel reports the process stopped (state T), however long that takes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        if state == "Z":
            raise AssertionError("the child exited before it stopped itself")
        time.sleep(0.01)
    raise AssertionError("the child never stopped")


def start_stopping(args: list[str | Path], stop_after: int, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", STOPPING_CHILD, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(STOP_AFTER=str(stop_after), **extra),
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
@pytest.mark.parametrize("stop_after", [1, 3])
def test_killed_extraction_resumes_from_its_last_block(tmp_path: Path, sig: signal.Signals, stop_after: int) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8, size=48, splits=("train", "val"))
    args: list[str | Path] = ["extract", "--data", tree, *FAST, "--image-size", "64", "--split", "train"]
    ref = cli(*args, "--cache-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    [reference] = [cache.read(e.path) for e in catalog.scan(tmp_path / "ref")]

    cache_dir = tmp_path / "cache"
    proc = start_stopping([*args, "--cache-dir", cache_dir], stop_after, TLFEAT_FLUSH_EVERY="4")
    wait_until_stopped(proc.pid)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr
    if sig == signal.SIGINT:
        assert "Traceback" not in stderr and "interrupted: completed work is kept" in stderr

    [partial] = catalog.scan(cache_dir)
    done = int(partial.attrs["n_done"])
    assert partial.status == "partial" and done == 4 * stop_after, partial
    assert not list(cache_dir.glob("*.h5")), "an incomplete run must never leave a file under the final name"

    rerun = cli(*args, "--cache-dir", cache_dir)
    assert rerun.returncode == 0, rerun.stderr
    [entry] = catalog.scan(cache_dir)
    resumed = cache.read(entry.path)
    assert entry.status == "ok" and resumed.meta["resumed_from"] == done
    assert np.array_equal(resumed.X, reference.X) and resumed.ids == reference.ids
    assert not list(cache_dir.glob("*.partial"))


def test_killed_extraction_leaves_no_worker_and_no_lock(tmp_path: Path) -> None:
    """SIGKILL of `extract` with decoding workers: they die with it and the rerun never waits for a lock."""
    tree = make_tree(tmp_path / "tree", per_class=40, size=48, splits=("train", "val"))
    args: list[str | Path] = [
        "extract",
        "--data",
        tree,
        *[a for a in FAST if a not in ("--workers", "0")],
        "--workers",
        "2",
    ]
    args += ["--batch-size", "4", "--split", "train", "--cache-dir", tmp_path / "cache"]
    proc = start_stopping(args, 2, TLFEAT_FLUSH_EVERY="8")
    wait_until_stopped(proc.pid)
    children = _children(proc.pid)
    assert len(children) >= 2, children  # the two decoding workers (and multiprocessing's resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c for c in children if _alive(c)], "workers outlived their parent"
    rerun = cli(*args)
    assert rerun.returncode == 0 and "waiting for it" not in rerun.stderr, rerun.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_rows_reach_disk_in_synced_and_renamed_blocks_of_1024(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scikit-learn's 1347 training digits: one block of 1024 rows, then the rest. Each block is written
    under a temporary name, fsynced, renamed into place, and the rename made durable (the folder fsynced)."""
    from tlfeat import ExtractConfig, extract, inference

    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", f"{Path(src).name} -> {Path(dst).name}"))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    # The subject is the writer: a network that returns each crop's first pixels keeps the test fast.
    monkeypatch.setattr(inference, "load", lambda spec: (lambda batch: [batch.reshape(len(batch), -1)[:, :8]], {}))
    cfg = ExtractConfig(model="resnet18", untrained=True, data="digits", splits=("train",), image_size=16,
                        workers=0, cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    [fs] = extract(cfg)
    assert len(fs) == 1347
    partial, pid = str(fs.path) + ".partial", os.getpid()
    renamed = [what for kind, what in events if kind == "replace" and what.endswith(".npz")]
    assert renamed == [f".{n}.{pid}.tmp -> {n}" for n in ("0000000000-0000001024.npz", "0000001024-0000001347.npz")]
    for name in ("0000000000-0000001024.npz", "0000001024-0000001347.npz"):
        written = events.index(("fsync", os.path.join(partial, f".{name}.{pid}.tmp")))
        moved = events.index(("replace", f".{name}.{pid}.tmp -> {name}"))
        assert written < moved < events.index(("fsync", partial), moved), events  # synced, renamed, rename synced


def test_a_block_cut_short_is_computed_again(tmp_path: Path) -> None:
    """Resuming stops at the first unreadable block: its rows and every later block's are computed again."""
    from tlfeat.writer import Listing, Writer, whole_blocks

    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 3)).astype(np.float32)
    listing = Listing([str(i) for i in range(10)], np.zeros(10, np.int64), ["a"], np.zeros((10, 2), np.int64), "sig")
    final = tmp_path / "f.h5"
    first = Writer(final, "k", {}, listing, flush_every=3)
    for row in X[:9]:
        first.append(row[None])  # blocks 0-3, 3-6, 6-9
    second = first.partial / "0000000003-0000000006.npz"
    second.write_bytes(second.read_bytes()[:-50])  # cut short (a crash mid-write of a non-atomic writer)
    assert [start for start, _, _ in whole_blocks(first.partial)] == [0]
    again = Writer(final, "k", {}, listing, flush_every=3)
    assert again.done == 3 and not second.exists()  # resumes after block 0; the later blocks are dropped
    again.append(X[3:])
    assert np.array_equal(cache.read(again.finish({})).X, X)
