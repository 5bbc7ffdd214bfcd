"""`tlfeat finetune`: the backbone trained end to end with a new head, for comparison."""

from __future__ import annotations

import json
from typing import Any

import click

from tlfeat.config import REPEATS, FinetuneConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import echo_result, from_config, given, json_option, quiet_option

FIELDS = (
    "model", "data", "strategy", "epochs", "lr", "optimizer", "schedule", "step_size", "warmup_epochs", "weight_decay",
    "batch_size", "augment", "precise_bn", "image_size", "limit", "test_limit", "subset_seed", "label_field", "seed", "weights_id",
    "weights_file", "untrained", "precision", "augment_on", "resume", "keep_last", "workers", "device", "data_dir", "results_dir",
)  # fmt: skip


@click.command("finetune")
@from_config(FinetuneConfig, *FIELDS, short={"model": "-m", "data": "-d", "strategy": "-s"})
@click.option(
    "--repeats", type=int, default=1, show_default=True, help="Runs with seeds seed..seed+N-1; mean and spread."
)
@quiet_option
@json_option
@user_errors("the last completed epoch is saved; run the same command with --resume to continue")
def command(repeats: int, quiet: bool, as_json: bool, **options: Any) -> None:
    """Train the backbone end to end with a new head, for comparison with frozen features."""
    from tlfeat.errors import TlfeatError

    if not REPEATS.ok(repeats):
        raise TlfeatError(f"--repeats must be {REPEATS.describe()}, got {repeats}")
    cfg = FinetuneConfig(**given(options), progress=not quiet)  # refused here before torch is imported
    from tlfeat.finetune import finetune, summarize

    results = finetune(cfg, repeats=repeats)
    for res in results:
        r = res.record
        m = r.metrics
        auc = "-" if m.get("roc_auc") is None else f"{m['roc_auc']:.4f}"
        how = "reused" if res.reused else f"trained {r.timings.train_seconds:.1f}s"
        line = (
            f"{r.method} {r.model}/{r.dataset.rsplit('/', 1)[-1]} seed {r.seed}: test accuracy {m['accuracy']:.4f} "
            f"(n_test {r.n_test}), ROC AUC {auc} (best epoch {r.details['best_epoch']}/{r.params['epochs']}, "
            f"{r.details['trainable_params']:,}/{r.details['total_params']:,} params trained); {how}  -> {res.path.parent}"
        )
        echo_result(line, m, as_json)
    summary = summarize(results)
    if len(results) > 1:
        click.echo(
            f"{len(results)} runs: accuracy {summary['accuracy_mean']:.4f} +- {summary['accuracy_std']:.4f}, "
            f"train time {summary['train_seconds_mean']:.1f} +- {summary['train_seconds_std']:.1f} s",
            err=as_json,
        )
    if as_json:
        records = [r.record.to_json() for r in results]
        click.echo(
            records[0]
            if len(records) == 1
            else '{"runs": [' + ",\n".join(records) + f'], "summary": {json.dumps(summary)}}}'
        )
