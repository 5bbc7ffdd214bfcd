"""Two real processes asking for the same work at once: one computes, the other waits and reuses it.

No timer decides the overlap: the first process stops itself (SIGSTOP) as soon as it holds its output's
lock. The second is started, and the test reads its "waiting for it" line (which it can only print
while the lock is held by the first) and sees it blocked; then the first continues, finishes and
releases the lock, and the second reuses its output. Without the lock the second never waits: it
computes on its own and ends, and the test fails on its missing line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tlfeat import catalog

from ..conftest import make_tree
from .helpers import FAST, cli, env, popen
from .test_interrupt import wait_until_stopped

# Runs `tlfeat ARGS`; once it holds its first output lock, the process stops itself until SIGCONT.
LOCKED_CHILD = textwrap.dedent(
    """
    import contextlib, os, signal, sys
    from tlfeat import fsio
    original = fsio.lock
    held = []
    @contextlib.contextmanager
    def lock(final):
        with original(final):
            if not held:
                held.append(final)
                os.kill(os.getpid(), signal.SIGSTOP)
            yield
    fsio.lock = lock
    from tlfeat_cli.main import cli
    cli(sys.argv[1:], prog_name="tlfeat")
    """
)


def wait_until_blocked_on_a_lock(pid: int, timeout: float = 300) -> None:
    """Block until the kernel lists `pid` as waiting for a POSIX lock (`->` in /proc/locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/locks") as fh:
            if any("->" in line and line.split("->", 1)[1].split()[3] == str(pid) for line in fh):
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never waited for a lock")


def _race(*args: str | Path) -> tuple[str, str]:
    """(first's stdout, second's stdout), the second having provably waited for the first's lock."""
    first = subprocess.Popen(
        [sys.executable, "-c", LOCKED_CHILD, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    procs = [first]
    try:
        wait_until_stopped(first.pid)
        second = popen(*args)
        procs.append(second)
        assert second.stderr is not None
        line = second.stderr.readline()  # blocks until the second has something to say
        assert "another tlfeat process is computing" in line and "waiting for it" in line, line
        wait_until_blocked_on_a_lock(second.pid)
        assert second.poll() is None
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.communicate()
        raise
    os.kill(first.pid, signal.SIGCONT)
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert (first.returncode, second.returncode) == (0, 0), (err1, err2)
    return out1, out2


def test_two_extract_processes_on_the_same_key(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4, size=32)
    cache_dir = tmp_path / "cache"
    first, second = _race("extract", "--data", tree, *FAST, "--split", "train", "--cache-dir", cache_dir)
    assert "computed in" in first and "cached, no work done" in second, (first, second)
    [entry] = catalog.scan(cache_dir)
    assert entry.status == "ok" and not list(cache_dir.glob("*.partial"))


def test_two_fits_of_the_same_config(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8, size=32)
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    assert cli("extract", "--data", tree, *FAST, "--cache-dir", cache_dir).returncode == 0
    first, second = _race("fit", "--clf", "logreg", "--C", "1", "--cache-dir", cache_dir, "--results-dir", results)
    assert "reused" not in first and "reused" in second, (first, second)
    assert len(list(results.glob("fits/*/record.json"))) == 1


def test_two_finetunes_of_the_same_run(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4, size=32)
    first, second = _race(
        "finetune", "--model", "resnet18", "--data", tree, "--strategy", "scratch", "--epochs", "1",
        "--image-size", "32", "--batch-size", "8", "--workers", "0", "-q", "--results-dir", tmp_path / "results",
    )  # fmt: skip
    assert "trained " in first and "reused" in second, (first, second)
    assert len(list((tmp_path / "results").glob("finetunes/*/record.json"))) == 1
