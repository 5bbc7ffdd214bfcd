"""`tlfeat`: the command group and the one place errors become a line on stderr.

Each command lives in its own module (extract.py, fit.py, ...): it parses its options, builds a
config, calls one library function and prints a short summary. Heavy imports (numpy, h5py,
torch) happen inside the commands, so `tlfeat --help` is instant.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tlfeat.errors import TlfeatError, first_line

INTERNAL_ERROR = 70  # EX_SOFTWARE: not the user's fault; tests treat it as a failure
RESUME_HINT = "completed work is kept; run the same command again to resume"


def _one_line(exc: BaseException) -> str:
    """The user's line, also when a worker process re-raised it with its traceback inside."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split("Error: ", 1)[-1] if "Error: " in last else last
    return first_line(text, 1000) or type(exc).__name__


def user_errors(interrupted: str = RESUME_HINT) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn library errors into one line on stderr and exit code 2, never a traceback.

    Anything else is a bug in tlfeat: `internal error: ...` and exit code 70. That includes an
    OSError, unless it is a failed write (disk full, read-only, no permission) or a path the user
    named (an option's value, or a folder tlfeat was told to use) that is missing or of the wrong kind.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TlfeatError as exc:
                click.echo(f"error: {_one_line(exc)}", err=True)
                sys.exit(exc.exit_code)
            except KeyboardInterrupt:
                click.echo(f"interrupted: {interrupted}", err=True)
                sys.exit(130)
            except Exception as exc:
                if isinstance(exc, OSError):
                    _user_os_error(exc, kwargs)
                if logging.getLogger().isEnabledFor(logging.DEBUG):
                    raise
                click.echo(
                    f"internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with -vv for the traceback)",
                    err=True,
                )
                sys.exit(INTERNAL_ERROR)

        return wrapper

    return decorate


# errno values that say a path is missing or of the wrong kind: the user's mistake when it is their path
_PATH_ERRORS = {
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.ENXIO, errno.ENODEV,
}  # fmt: skip


def _user_os_error(exc: OSError, options: dict[str, Any]) -> None:
    """Exit 2 with one line when `exc` is a failed write or concerns a path the user named; else return."""
    from tlfeat.fsio import as_write_failed

    clear = as_write_failed(Path(exc.filename or "output"), exc)
    if clear is not None:  # disk full, read-only, no permission: one line that says so
        click.echo(f"error: {_one_line(clear)}", err=True)
        sys.exit(clear.exit_code)
    if exc.errno in _PATH_ERRORS and exc.filename and _named_by_user(str(exc.filename), options):
        click.echo(f"error: {exc.strerror or _one_line(exc)}: {exc.filename}", err=True)
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise exc
        sys.exit(2)


def _named_by_user(filename: str, options: dict[str, Any]) -> bool:
    """Is `filename` a path the command was given, or inside one (options, and the folders the
    configuration points at: cache, results, data, tlfeat's home, the torch hub cache)?"""
    from tlfeat import config

    given: list[Any] = [config.default_cache_dir(), config.default_results_dir(), config.default_data_dir()]
    given += [config.tlfeat_home(), config.torch_home()]
    for value in options.values():
        given += list(value) if isinstance(value, tuple | list) else [value]
    target = os.path.abspath(filename)
    for place in given:
        if isinstance(place, str | Path) and str(place):
            root = os.path.abspath(os.path.expanduser(str(place)))
            if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
                return True
    return False


class OneLineGroup(click.Group):
    """Usage mistakes (bad option values, unknown options) also come as one `error:` line."""

    def main(self, args: Any = None, prog_name: str | None = None, *a: Any, **kw: Any) -> Any:
        if kw.get("standalone_mode", True) is False:
            return super().main(args, prog_name, *a, **kw)
        kw["standalone_mode"] = False
        try:
            rv = super().main(args, prog_name, *a, **kw)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else (prog_name or "tlfeat")
            click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class LazyGroup(OneLineGroup):
    """Commands are imported only when named (or listed by --help): start-up stays small."""

    COMMANDS = {
        "models": "tlfeat_cli.models",
        "datasets": "tlfeat_cli.datasets",
        "extract": "tlfeat_cli.extract",
        "ls": "tlfeat_cli.ls",
        "fit": "tlfeat_cli.fit",
        "results": "tlfeat_cli.results",
        "finetune": "tlfeat_cli.finetune",
        "compare": "tlfeat_cli.compare",
        "report": "tlfeat_cli.report",
        "analyze": "tlfeat_cli.analyze",
        "export": "tlfeat_cli.export",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = self.COMMANDS.get(name)
        if module is None:
            return None
        import importlib

        return importlib.import_module(module).command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="Log what happens (-v info, -vv debug).")
@click.version_option(package_name="tlfeat")
def cli(verbose: int) -> None:
    """Transfer learning on images with frozen pretrained CNNs.

    \b
    tlfeat models                                      list backbones
    tlfeat extract --model mobilenet_v2 --data digits  cache features (works offline)
    tlfeat ls                                          list cached feature sets
    tlfeat fit --clf logreg                            classifiers on cached features
    tlfeat compare --models ... --data ... --methods   which transfer method wins, at what cost
    tlfeat analyze cka|rsa|embed|neighbours|layers     what the features and layers hold
    tlfeat export --model ... --data ... --format npy  cached features for other tools
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    status = logging.getLogger("tlfeat.status")  # what a wait is doing; a command's -q turns it off
    if not any(isinstance(h, StatusHandler) for h in status.handlers):
        status.addHandler(StatusHandler())
    status.propagate = False
    status.setLevel(logging.INFO)


class StatusHandler(logging.Handler):
    """Status lines on stderr as `tlfeat: ...`, above any progress bar (tqdm redraws it below)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(f"tlfeat: {record.getMessage()}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - a status line must never stop the work
            self.handleError(record)


def main() -> None:
    cli(prog_name="tlfeat")


if __name__ == "__main__":
    main()
