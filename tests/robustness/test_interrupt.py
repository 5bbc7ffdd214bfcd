"""Kill a real extraction mid-run (SIGKILL, Ctrl-C): the rerun resumes and equals an uninterrupted run."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tlfeat import cache

from ..conftest import make_tree
from .helpers import FAST, cli, env, popen


def _blocks(cache_dir: Path) -> int:
    return sum(len(list(p.glob("*.npz"))) for p in cache_dir.glob("*.partial"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_extraction_resumes_from_its_last_block(tmp_path: Path, sig: signal.Signals) -> None:
    tree = make_tree(tmp_path / "tree", per_class=40, size=48, splits=("train", "val"))
    args = ["extract", "--data", tree, *FAST, "--image-size", "112", "--split", "train"]
    ref = cli(*args, "--cache-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    [reference] = [cache.read(e.path) for e in cache.scan(tmp_path / "ref")]

    cache_dir = tmp_path / "cache"
    proc = popen(*args, "--cache-dir", cache_dir, env=env(TLFEAT_FLUSH_EVERY="4"))
    deadline = time.monotonic() + 120
    while _blocks(cache_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "extraction finished before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr
    if sig == signal.SIGINT:
        assert "Traceback" not in stderr and "interrupted: completed work is kept" in stderr

    [partial] = cache.scan(cache_dir)
    done = int(partial.attrs["n_done"])
    assert partial.status == "partial" and 0 < done < len(reference), partial
    assert not list(cache_dir.glob("*.h5")), "an incomplete run must never leave a file under the final name"

    rerun = cli(*args, "--cache-dir", cache_dir)
    assert rerun.returncode == 0, rerun.stderr
    [entry] = cache.scan(cache_dir)
    resumed = cache.read(entry.path)
    assert entry.status == "ok" and resumed.meta["resumed_from"] == done
    assert np.array_equal(resumed.X, reference.X) and resumed.ids == reference.ids
    assert not list(cache_dir.glob("*.partial"))
