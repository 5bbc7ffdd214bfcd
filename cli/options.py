"""Command-line options made from the configs' field declarations, so each option is written once.

`from_config(ExtractConfig, "model", "data", ...)` adds one click option per named field, with the
field's help text and the right kind (flag, number, path, list); values the user did not give are
left out, so the config's own defaults (and environment variables, read in `tlfeat.config`) apply.
Bounds are checked by the config, never here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tlfeat.constraints import Choice, option_name

# Fields given as comma-separated lists on the command line.
LISTS = {"models", "datas", "methods", "layers", "shots", "analyses"}
# Fields that may be given several times (--split train --split test).
MULTIPLE = {"splits"}


def _kind(annotation: str) -> Any:
    text = annotation.replace(" ", "")
    if text.startswith("bool"):
        return bool
    if "Path" in text:
        return click.Path(path_type=Path)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def _option(config: type, field: dataclasses.Field[Any], short: str | None = None) -> Callable[[Any], Any]:
    meta = field.metadata
    names = [option_name(field)] + ([short] if short else [])
    help_text = meta.get("help", "")
    check = meta.get("check")
    if isinstance(check, Choice) and "one of" not in help_text:
        help_text += f" [{'|'.join(check.choices)}]"
    if (
        field.default is not dataclasses.MISSING
        and field.default is not None
        and type(field.default) is not bool
        and field.default != ()
    ):
        help_text += f" [default: {field.default}]"
    kind = _kind(str(field.type))
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    if kind is bool:
        flag = meta.get("flag")
        if flag:  # a default-on setting turned off: --no-update sets update=False
            return click.option(flag, field.name, flag_value=False, default=None, help=help_text)
        return click.option(*names, field.name, is_flag=True, help=help_text)
    if field.name in MULTIPLE:
        return click.option(*names, field.name, multiple=True, help=help_text)
    if field.name in LISTS and str(field.type).startswith("tuple"):  # fit's --shots is one number
        return click.option(*names, field.name, type=str, required=required, help=help_text + " (comma-separated)")
    return click.option(*names, field.name, type=kind, required=required, help=help_text)


def from_config(config: type, *names: str, short: dict[str, str] | None = None) -> Callable[[Any], Any]:
    """Add the options of `names` (fields of `config`), in that order."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    missing = [n for n in names if n not in fields]
    if missing:
        raise ValueError(f"{config.__name__} has no field(s) {missing}")
    short = short or {}

    def decorate(fn: Any) -> Any:
        for name in reversed(names):
            fn = _option(config, fields[name], short.get(name))(fn)
        return fn

    return decorate


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave (None and empty repeats mean "not given": the config's default applies)."""
    return {k: v for k, v in values.items() if v is not None and v != ()}


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (messages go to stderr).")


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:  # status lines ("exporting ...", "fetching ...") are hidden with the bars
        logging.getLogger("tlfeat.status").setLevel(logging.WARNING)
    return value


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, callback=_quiet, expose_value=True, help="No progress bars, no status lines."
)


def table(rows: list[list[Any]] | list[tuple[Any, ...]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def echo_result(line: str, metrics: dict[str, Any], as_json: bool) -> None:
    """One run's summary line (stderr under --json), and a warning when the run is no better than chance."""
    click.echo(line, err=as_json)
    if metrics.get("near_chance"):
        click.echo(f"  warning: {metrics['near_chance']}", err=True)
