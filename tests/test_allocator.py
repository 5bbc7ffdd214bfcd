"""The malloc pinning that `extract` does: on where glibc is, off when asked, never over the user's own."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SNIPPET = "from tlfeat import allocator; print(allocator.pin_malloc_thresholds(), allocator.pin_malloc_thresholds())"


def _pinned(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TLFEAT_PIN_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds exist only in glibc")
def test_pins_once_on_glibc() -> None:
    assert _pinned() == "True True"


def test_left_alone_when_switched_off_or_set_by_the_user() -> None:
    assert _pinned(TLFEAT_PIN_MALLOC="0") == "False False"
    assert _pinned(MALLOC_MMAP_THRESHOLD_="1048576") == "False False"
