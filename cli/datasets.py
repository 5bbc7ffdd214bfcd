"""`tlfeat datasets`: named datasets and where each is read from."""

from __future__ import annotations

from typing import Any

import click

from tlfeat.config import ExtractConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import from_config, table


@click.command("datasets")
@from_config(ExtractConfig, "data_dir")
@user_errors()
def command(**options: Any) -> None:
    """List named datasets and where each is read from. Folders and shards work too."""
    from tlfeat import config, datasets

    root = options["data_dir"] or config.default_data_dir()
    rows = [(d.name, d.description, d.where(root)) for d in datasets.named_datasets().values()]
    click.echo(table(rows, ["name", "what", "read from"]))
    click.echo(
        "\nAny folder works too: root/train/<class>/*, root/val|test/<class>/*, or root/<class>/* "
        "(split 80/20, stratified, fixed seed).\nShards: 'shards/{00000..00127}.tar' (WebDataset, label in "
        "KEY.cls) or *.parquet, optionally train=PATTERN,test=PATTERN.\nA path that exists is always read as "
        "that folder, even one named like a dataset above (./mnist); write named:mnist for the named one."
    )
