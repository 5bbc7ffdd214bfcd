"""Running tlfeat as a user does: a real process, its exit code and its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# A small, fast extraction: random-weight ResNet-18 at 64 px, one image per batch block.
FAST = ["--model", "resnet18", "--untrained", "--image-size", "64", "--batch-size", "4", "--workers", "0", "-q"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TLFEAT_OFFLINE": "1", "TLFEAT_BACKEND": "torch", **extra}


def cli(*args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run `tlfeat ARGS` to completion."""
    kw.setdefault("env", env())
    return subprocess.run(
        [sys.executable, "-m", "tlfeat_cli.main", *map(str, args)], capture_output=True, text=True, timeout=600, **kw
    )


def popen(*args: str | Path, **kw: Any) -> subprocess.Popen[str]:
    kw.setdefault("env", env())
    return subprocess.Popen(
        [sys.executable, "-m", "tlfeat_cli.main", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def assert_one_clear_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, no traceback, and an `error:` line holding every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
