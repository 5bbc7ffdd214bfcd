"""A small, real tmpfs for the disk-full tests, mounted with or without the right to mount.

`mount`: mounted here (root with CAP_SYS_ADMIN, as in CI's container). `userns`: mounted inside a user
and mount namespace of its own (`unshare --user --map-root-user --mount`, which needs no rights where
the kernel allows unprivileged user namespaces), held open by a sleeping process and reached through
that process's `/proc/PID/root`: every process of the test writes to the same kernel tmpfs, gets the
same ENOSPC and EROFS, without any mount being visible outside.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOW = ("mount", "userns")


@dataclass
class Tmpfs:
    path: Path  # where the tests' processes reach the filesystem
    remount: list[str]  # the command that makes it read-only

    def read_only(self) -> None:
        subprocess.run(self.remount, check=True, capture_output=True)


def can_mount() -> bool:
    """May this process mount filesystems (root with CAP_SYS_ADMIN)?"""
    import os

    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    with open("/proc/self/status") as fh:
        effective = next(int(line.split()[1], 16) for line in fh if line.startswith("CapEff:"))
    return bool(effective & (1 << 21))  # CAP_SYS_ADMIN


@contextlib.contextmanager
def tmpfs(where: Path, size: str, how: str) -> Iterator[Tmpfs]:
    """A tmpfs of `size` (`2m`) at `where`, made the way `how` says; skips, saying why, when it cannot be made."""
    where.mkdir(parents=True, exist_ok=True)
    if how == "mount":
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tlfeat-test", str(where)], capture_output=True
        )
        if made.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); the userns variant needs no rights"
            )
        try:
            yield Tmpfs(where, ["mount", "-o", "remount,ro", str(where)])
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
        return
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("no unshare/nsenter command here (util-linux)")
    holder = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size={size} tlfeat-test '{where}' && echo ready && exec sleep 3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stderr is not None
        if holder.stdout.readline().strip() != "ready":
            holder.wait(timeout=30)
            pytest.skip(f"cannot mount a tmpfs in a user namespace here ({holder.stderr.read().strip()})")
        remount = ["nsenter", "--target", str(holder.pid), "--user", "--mount", "mount", "-o", "remount,ro", str(where)]
        yield Tmpfs(Path(f"/proc/{holder.pid}/root") / where.relative_to("/"), remount)
    finally:
        holder.kill()
        holder.communicate()
