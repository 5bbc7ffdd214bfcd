"""`tlfeat results`: saved results (fits and fine-tunes), filtered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tlfeat.config import FitConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import from_config, json_option, table


@click.command("results")
@click.option("--model", "-m", default=None, help="Only this model.")
@click.option("--data", "-d", default=None, help="Only this dataset (name or folder name).")
@click.option("--clf", "--method", "method", default=None, help="Only this classifier / method.")
@from_config(FitConfig, "layer", "weights_id", "image_size", "limit", "test_limit", "results_dir")
@json_option
@user_errors()
def command(model: str | None, data: str | None, method: str | None, as_json: bool, **options: Any) -> None:
    """List saved results (fits and fine-tunes), filtered; malformed records are skipped with a warning."""
    from tlfeat import backbones, config
    from tlfeat.records import Method, load_records

    results_dir = options.pop("results_dir") or config.default_results_dir()
    wanted = str(Method.parse(method)) if method else None
    records = [
        r
        for r in load_records(results_dir)
        if (not model or backbones.selects(model, r.model, r.weights_id))
        and (wanted is None or r.method == wanted)
        and (not data or data in (r.dataset, Path(r.dataset).name))
        and all(v is None or str(getattr(r, k)) == str(v) for k, v in options.items())
    ]
    if as_json:
        click.echo("[" + ",\n".join(r.to_json() for r in records) + "]")
        return
    if not records:
        click.echo(f"no results in {results_dir} match; run `tlfeat fit` first")
        return
    from tlfeat.datasets import display_names

    names = display_names(r.dataset for r in records)  # two folders named "data" are two datasets
    rows = [
        (
            r.method,
            r.model,
            names[r.dataset],
            r.layer,
            r.image_size or "-",
            r.weights_id or "-",
            r.limit or "-",
            r.n_train,
            r.n_test,
            f"{r.metrics['accuracy']:.4f}",
            "-" if r.metrics.get("roc_auc") is None else f"{r.metrics['roc_auc']:.4f}",
            f"{r.timings.train_seconds:.2f}",
            f"{r.timings.total_seconds:.2f}",
            str(r.created)[:19],
            Path(r.path).parent.name if r.path else "",
        )
        for r in records
    ]
    header = [
        "method",
        "model",
        "dataset",
        "layer",
        "size",
        "weights",
        "limit",
        "n_train",
        "n_test",
        "accuracy",
        "roc_auc",
        "train_s",
        "total_s",
        "created",
        "run",
    ]
    click.echo(table(rows, header))
