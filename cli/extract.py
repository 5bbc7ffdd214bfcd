"""`tlfeat extract`: run a frozen CNN over a dataset once and cache its features."""

from __future__ import annotations

from typing import Any

import click

from tlfeat.backbones.base import PENULTIMATE
from tlfeat.config import ExtractConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import from_config, given, quiet_option

FIELDS = (
    "model", "data", "splits", "layer", "pool", "weights_id", "weights_file", "untrained", "seed", "image_size", "limit",
    "test_limit", "subset_seed", "label_field", "fast_decode", "precision", "backend", "device", "decode", "batch_size",
    "workers",
    "on_error", "update", "verify_content", "engine", "address", "num_workers", "gpus_per_worker", "cache_dir", "data_dir",
)  # fmt: skip


@click.command("extract")
@from_config(ExtractConfig, *FIELDS, short={"model": "-m", "data": "-d"})
@quiet_option
@user_errors()
def command(quiet: bool, **options: Any) -> None:
    """Run a frozen pretrained CNN over a dataset once and cache its features to HDF5.

    A second identical run reuses the file. If the images changed since (added, removed or replaced
    files), only the changed ones are computed and the file is updated (--no-update refuses instead).
    """
    from tlfeat.errors import printable
    from tlfeat.extraction import extract

    cfg = ExtractConfig(**given(options), progress=not quiet)
    results = extract(cfg, echo=lambda line: click.echo(line, err=True))
    for fs in results:
        m = fs.meta
        if fs.reused:
            how = "cached, no work done"
        elif fs.changes is not None:
            how = f"updated ({fs.changes.summary()}): {m['computed_rows']} computed, {m['carried_rows']} carried over"
        else:
            how = f"computed in {m['extract_seconds']:.1f}s, {m['images_per_second']:.0f} img/s"
        layer = "" if m.get("layer") == PENULTIMATE else f" [{m.get('layer')}]"
        click.echo(
            f"{m['split']:>5}{layer}: {fs.X.shape[0]} x {fs.X.shape[1]}  {how} [{m.get('backend')}]  -> {fs.path}"
        )
        if m["skipped"]:
            click.echo(f"       skipped {len(m['skipped'])} unreadable image(s), listed by `tlfeat ls --skipped`:")
            for item in m["skipped"][:5]:
                click.echo(f"         {printable(item['error'])}")
    if results and not results[-1].meta.get("pretrained", True):
        click.echo(
            f"note: UNTRAINED weights ({results[-1].meta['weights_id']}): a no-transfer baseline, not ImageNet features"
        )
