"""`tlfeat export`: a cached feature set as npy, Parquet or CSV, with ids and labels."""

from __future__ import annotations

from typing import Any

import click

from tlfeat.config import ExportConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import from_config, given

FIELDS = (
    "model", "data", "format", "out", "splits", "layer", "weights_id", "image_size", "limit", "test_limit",
    "subset_seed", "block_rows", "cache_dir",
)  # fmt: skip


@click.command("export")
@from_config(ExportConfig, *FIELDS, short={"model": "-m", "data": "-d"})
@user_errors()
def command(**options: Any) -> None:
    """Write cached features with their ids and labels for tools that don't read HDF5 (R, Julia, a spreadsheet).

    \b
    tlfeat export --model mobilenet_v2 --data digits --format parquet --out exports/digits
    Streams from the cache a block at a time: sets larger than memory export in flat memory.
    """
    from tlfeat.feature_export import export

    for path in export(ExportConfig(**given(options))):
        click.echo(str(path))
