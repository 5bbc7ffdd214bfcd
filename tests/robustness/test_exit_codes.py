"""A bug exits 70 with `internal error: ...`; only the user's mistakes exit 2.

No hook in tlfeat injects the bug: a child process replaces one library function with one that
raises, then runs the command line as `tlfeat` does.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from tlfeat_cli.main import INTERNAL_ERROR, cli

from ..conftest import make_tree
from .helpers import FAST, env

# argv: EXCEPTION tlfeat-args...; `extraction.plan` raises EXCEPTION (a Python expression).
BUGGY_CHILD = textwrap.dedent(
    """
    import errno, sys
    from tlfeat import extraction
    def plan(cfg):
        raise eval(sys.argv[1])
    extraction.plan = plan
    from tlfeat_cli.main import cli
    cli(sys.argv[2:], prog_name="tlfeat")
    """
)


def _run_buggy(exception: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BUGGY_CHILD, exception, *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )


def test_a_bug_exits_70_with_one_line_and_the_traceback_on_demand(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=1, size=16)
    args = ["extract", "--data", tree, *FAST, "--cache-dir", tmp_path / "cache"]
    proc = _run_buggy("KeyError('planted bug')", *args)
    assert proc.returncode == INTERNAL_ERROR == 70, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == [
        "internal error: KeyError: 'planted bug' (rerun with -vv for the traceback)"
    ], proc.stderr
    verbose = _run_buggy("KeyError('planted bug')", "-vv", *args)
    assert "Traceback" in verbose.stderr and "planted bug" in verbose.stderr and verbose.returncode != 0


def test_an_os_error_that_is_a_bug_exits_70(tmp_path: Path) -> None:
    """Not every OSError is the user's: a bad file descriptor is tlfeat's own fault."""
    tree = make_tree(tmp_path / "tree", per_class=1, size=16)
    proc = _run_buggy("OSError(errno.EBADF, 'Bad file descriptor')", "extract", "--data", tree, *FAST)
    assert proc.returncode == 70 and "internal error: OSError: [Errno 9] Bad file descriptor" in proc.stderr


@pytest.mark.parametrize(
    ("where", "code", "exit_code"),
    [
        ("data", errno.ENOENT, 2),  # a file under the folder the user named is gone: their mistake
        ("cache", errno.EISDIR, 2),  # a folder where tlfeat was told to write a file
        ("cache", errno.EACCES, 2),  # a failed write: one line that says so
        ("elsewhere", errno.ENOENT, 70),  # a path tlfeat made up itself: a bug
        ("data", errno.EBADF, 70),  # a user's path, but not a path error: a bug
        ("data", errno.EINVAL, 70),
    ],
)
def test_which_os_errors_are_the_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, code: int, exit_code: int
) -> None:
    from tlfeat import extraction

    places = {"data": tmp_path / "tree", "cache": tmp_path / "cache", "elsewhere": Path("/tlfeat-internal")}
    culprit = places[where] / "some" / "file.npz"

    def plan(cfg: object) -> None:
        raise OSError(code, "planted", str(culprit))

    monkeypatch.setattr(extraction, "plan", plan)
    args = ["extract", "--model", "resnet18", "--data", str(places["data"]), "--cache-dir", str(places["cache"])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == exit_code, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: " if exit_code == 2 else "internal error: ") and str(culprit) in line
