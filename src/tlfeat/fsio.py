"""Every file tlfeat writes goes through here: a crash never leaves half of one.

`atomic_write` / `atomic_path`: write under a temporary name in the same folder, fsync, rename
over the final name, fsync the folder. `writing` turns a full disk or a read-only folder into one
clear error line. `lock` keeps two processes from computing the same output. `set_aside` moves a
damaged file out of the way without deleting it. `sweep_temps` removes the temporary files of
processes that were killed mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlfeat.errors import WriteFailed

log = logging.getLogger(__name__)

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temp_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (`.NAME.PID.tmp`, same folder)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path for a library that writes by file name (torch.save, savefig, h5py).

    When the block ends without error the file is fsynced and renamed to `path`; otherwise it is
    removed and `path` is untouched. Write errors become one clear `WriteFailed`.
    """
    path = Path(path)
    tmp = temp_name(path)
    with writing(path):
        if mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    # Text holding a file name that is not UTF-8 (kept by surrogateescape) is written as its own bytes.
    payload = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
    return Path(path)


def sweep_temps(folder: Path) -> int:
    """Remove temporary files left in `folder` by tlfeat processes that no longer exist."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        match = _TEMP.match(name)
        if match is None or _alive(int(match["pid"])):
            continue
        try:
            target = Path(folder) / name
            if target.is_dir():
                import shutil

                shutil.rmtree(target)
            else:
                target.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# errno values that mean "this place cannot be written", with what the user can do about it.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem or process limit",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def write_failed(path: Path, code: int, detail: str = "") -> WriteFailed:
    reason = _WRITE_ERRORS[code] + (f": {detail}" if detail else "")
    return WriteFailed(
        f"cannot write {path} ({reason}); free space or choose a writable --cache-dir/--results-dir/--out. "
        "Finished files are untouched and completed blocks are kept for the next run"
    )


def as_write_failed(path: Path, exc: BaseException) -> WriteFailed | None:
    """`exc` as one clear WriteFailed if it means the disk is full or `path` not writable, else None."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in _WRITE_ERRORS:  # HDF5 puts the errno in its message
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code not in _WRITE_ERRORS:
        return None
    named = Path(exc.filename) if isinstance(exc, OSError) and exc.filename else path
    return write_failed(named, code)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, no permission) into one clear WriteFailed."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        clear = as_write_failed(path, exc)
        if clear is None:
            raise
        raise clear from exc


def check_room(path: Path, needed: int) -> None:
    """Refuse to start a file that cannot fit: the free space and the process's file-size limit."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise write_failed(
            path, errno.EFBIG, f"needs about {needed / 1e6:.1f} MB, the file-size limit is {limit / 1e6:.1f} MB"
        )
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise write_failed(path, errno.ENOSPC, f"needs about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free")


@contextlib.contextmanager
def lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock for computing `final`, so two processes never write the same output.

    A second process waits here, then finds the finished output and reuses it. The lock is a POSIX
    record lock on `<final>.lock`: the kernel drops it when its process dies, and processes forked
    from the holder (decoding workers) never hold it, so a killed run leaves no lock behind. A block
    that fails removes the lock file (a waiter that then holds a removed file's lock takes the lock
    again on the current file), so failed attempts leave no `.lock` files behind.
    """
    lock_path = final.with_name(final.name + ".lock")
    with writing(lock_path):
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no POSIX locks on this platform: run unlocked
        yield
        return
    waited = False
    while True:
        with writing(lock_path):
            fh = open(lock_path, "a+")  # noqa: SIM115 - held for the whole block
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                fh.close()
                raise
            if not waited:
                log.warning("another tlfeat process is computing %s; waiting for it", final.name)
                waited = True
            fcntl.lockf(fh, fcntl.LOCK_EX)
        if _same_file(fh, lock_path):
            break
        fh.close()  # its holder failed and removed it: lock the file now in its place
    with fh:
        try:
            yield
        except BaseException:
            lock_path.unlink(missing_ok=True)  # while held: a waiter finds it gone and locks anew
            raise
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)


def _same_file(fh: Any, path: Path) -> bool:
    """Is the open file `fh` still the file at `path` (not removed nor replaced)?"""
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except OSError:
        return False


def set_aside(path: Path, suffix: str = ".damaged") -> Path:
    """Move a damaged file out of the way (never delete computed data); an earlier one is kept too.

    The new name is claimed with a hard link, which fails rather than overwrite a name another
    process has just taken.
    """
    n = 0
    with writing(path):
        while True:
            aside = path.with_name(path.name + suffix + (f".{n}" if n else ""))
            try:
                os.link(path, aside)
                break
            except FileExistsError:
                n += 1
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV) or aside.exists():
                    raise
                os.replace(path, aside)  # a filesystem without hard links
                return aside
        path.unlink()
    return aside


def inside(base: Path, relative: object) -> Path:
    """`base / relative`, resolved, when `relative` is a relative path that stays inside `base` once
    every link is followed; otherwise TlfeatError. For paths read from files tlfeat did not write
    itself (a record, compare.json), so none can reach a file elsewhere."""
    from tlfeat.errors import TlfeatError, printable

    if not isinstance(relative, str) or not relative or "\0" in relative or os.path.isabs(relative):
        raise TlfeatError(f"{printable(repr(relative))[:120]} is not a relative path inside {printable(str(base))}")
    root = Path(os.path.realpath(base))
    target = Path(os.path.realpath(root / relative))
    if target != root and root not in target.parents:
        raise TlfeatError(f"{printable(relative)[:120]} leads outside {printable(str(base))}")
    return target


# --------------------------------------------------------------------------- folders tlfeat owns

MARKER = ".tlfeat-report"  # in every output folder tlfeat made: compare/report, export, analyze


def owned(out: Path) -> bool:
    """Does `out` carry tlfeat's marker (a regular file, not a link)?"""
    marker = Path(out) / MARKER
    return marker.is_file() and not marker.is_symlink()


def read_marker(out: Path) -> dict[str, Any]:
    """The marker's JSON object (`{}` when missing, unreadable or not an object)."""
    import json

    try:
        data = json.loads((Path(out) / MARKER).read_text()) if owned(out) else {}
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(out: Path, data: dict[str, Any]) -> None:
    import json

    atomic_write(Path(out) / MARKER, json.dumps(data, indent=2))


def claim(out: Path, made_by: str = "tlfeat compare", option: str = "--out") -> None:
    """Make `out` a folder tlfeat may write into: a new or empty folder gets the marker; a folder that has
    one is tlfeat's already; any other folder is refused (nothing of the user's is touched)."""
    from tlfeat.errors import TlfeatError, printable

    out = Path(out)
    if owned(out):
        return
    if out.exists() and not out.is_dir():
        raise TlfeatError(f"{option} {printable(str(out))} is a file, not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise TlfeatError(
            f"{option} {printable(str(out))} is a folder tlfeat did not make (no {MARKER} in it) and is not empty; "
            f"choose a new or empty folder (a folder of an earlier tlfeat: create {MARKER} in it)"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, {"made_by": made_by, "plots": [], "files": []})


def take(out: Path, names: list[str], made_by: str, option: str = "--out") -> list[Path]:
    """Claim `out` (see `claim`) and the files `names` in it: a file already there that the marker does
    not list as tlfeat's is refused, so no file of the user's is ever replaced. The names are listed
    before they are written (a run killed in between leaves a listed name and no file: harmless)."""
    from tlfeat.errors import TlfeatError, printable

    out = Path(out)
    claim(out, made_by, option)
    marker = read_marker(out)
    listed = marker.get("files")
    ours = {n for n in listed if isinstance(n, str)} if isinstance(listed, list) else set()
    theirs = [n for n in names if n not in ours and os.path.lexists(out / n)]
    if theirs:
        raise TlfeatError(
            f"{option} {printable(str(out))} already holds {printable(theirs[0])}, which tlfeat did not write; "
            "move it away or choose another folder (tlfeat never replaces a file of yours)"
        )
    if not set(names) <= ours:
        write_marker(out, {**marker, "files": sorted(ours | set(names))})
    return [out / n for n in names]
