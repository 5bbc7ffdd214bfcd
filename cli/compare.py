"""`tlfeat compare`: which model and which transfer method win on your data, at what cost."""

from __future__ import annotations

import json
from typing import Any

import click

from tlfeat.config import CompareConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import from_config, given, json_option, quiet_option

FIELDS = (
    "models", "datas", "methods", "repeats", "resample", "layers", "shots", "shot_draws", "analyses", "analysis_images",
    "epochs", "scratch_epochs", "lr", "batch_size",
    "optimizer", "augment", "C", "image_size", "limit", "test_limit", "label_field", "seed", "on_error", "workers", "out",
    "replace", "results_dir", "cache_dir", "data_dir",
)  # fmt: skip


@click.command("compare")
@from_config(CompareConfig, *FIELDS)
@quiet_option
@json_option
@user_errors()
def command(quiet: bool, as_json: bool, **options: Any) -> None:
    """Which model and which transfer method win on your data, at what cost: one command.

    \b
    tlfeat compare --models mobilenet_v2,resnet50 --data mnist --methods logreg,svm,finetune:head,scratch \\
                   --limit 1000 --repeats 3 --resample --out reports/run1
    """
    from tlfeat.compare import command_line, compare
    from tlfeat.errors import TlfeatError
    from tlfeat_cli.report import summary

    for required in ("models", "datas"):
        if not options.get(required):
            raise TlfeatError(
                f"--{'data' if required == 'datas' else required} is required (see `tlfeat compare --help`)"
            )
    if options.get("shot_draws") is not None and not options.get("shots"):
        raise TlfeatError("--shot-draws needs --shots N,N,... (the k-shot curves whose draws it counts)")
    cfg = CompareConfig(**given(options), progress=not quiet, command=command_line())
    folder = compare(cfg, echo=lambda line: click.echo(line, err=as_json))
    summary(folder, as_json)
    failed = json.loads((folder / "failures.json").read_text()).get("failures") or {}
    if failed:  # the report is written; the exit status still says that not every cell ran
        raise SystemExit(1)
