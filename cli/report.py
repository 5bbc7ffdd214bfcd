"""`tlfeat report`: rebuild a comparison report from its saved results, recomputing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tlfeat_cli.main import user_errors
from tlfeat_cli.options import json_option


@click.command("report")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@json_option
@user_errors()
def command(folder: Path, as_json: bool) -> None:
    """Rebuild a comparison report from its saved results, recomputing nothing."""
    from tlfeat.report import build

    build(folder)
    summary(folder, as_json)


def summary(folder: Path, as_json: bool) -> None:
    import logging

    from tlfeat.report import recommendation, rows

    logging.disable(logging.WARNING)  # the report was just built from these records: its warnings are said
    try:
        items = rows(folder)
    finally:
        logging.disable(logging.NOTSET)
    if as_json:
        click.echo(
            json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in items], indent=2, default=str)
        )
    for line in recommendation(items):
        click.echo(line.replace("**", ""), err=as_json)
    click.echo(
        f"report: {folder / 'report.html'} (also report.md, rows.csv, summary.csv, tables.tex, plots/)", err=as_json
    )
