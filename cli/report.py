"""`tlfeat report`: rebuild a comparison report from its saved results, recomputing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tlfeat_cli.main import user_errors
from tlfeat_cli.options import json_option


@click.command("report")
@click.argument("folder", type=str)
@json_option
@user_errors()
def command(folder: str, as_json: bool) -> None:
    """Rebuild a comparison report from its saved results, recomputing nothing.

    FOLDER is the --out folder of a `tlfeat compare` (it holds a .tlfeat-report marker); tlfeat writes
    into no other folder.
    """
    from tlfeat.errors import TlfeatError
    from tlfeat.report import build

    if not folder.strip():
        raise TlfeatError("report needs a folder: the --out folder of a `tlfeat compare`")
    build(Path(folder))
    summary(Path(folder), as_json)


def summary(folder: Path, as_json: bool) -> None:
    import logging

    from tlfeat.errors import printable
    from tlfeat.report import recommendation, rows, split_shots
    from tlfeat.report.render import plain

    logging.disable(logging.WARNING)  # the report was just built from these records: its warnings are said
    try:
        items = rows(folder)
    finally:
        logging.disable(logging.NOTSET)
    if as_json:
        click.echo(
            json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in items], indent=2, default=str)
        )
    for line in recommendation(split_shots(items)[0]):  # what report.md recommends: k-shot runs aside
        click.echo(plain(line), err=as_json)
    click.echo(
        f"report: {printable(str(folder / 'report.html'))} (also report.md, rows.csv, summary.csv, tables.tex, plots/)",
        err=as_json,
    )
