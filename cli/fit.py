"""`tlfeat fit`: classifiers on cached features, with test metrics and a models x datasets table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tlfeat.config import TABLE_METRICS, ExtractConfig, FitConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import echo_result, from_config, given, json_option, markdown_table, table

FIELDS = (
    "clf", "model", "data", "layer", "weights_id", "image_size", "limit", "test_limit", "subset_seed", "C", "kernel",
    "epochs", "lr", "k", "temperature", "protocol", "shots", "shot_draw", "seed", "cv_folds", "route", "memory_gb",
    "refit", "cache_dir", "results_dir",
)  # fmt: skip


def _hyper(r: Any) -> str:
    """The hyperparameter a run was fitted with: C, the protocol's choice, or kNN's k (with DINO's ks)."""
    if "protocol" in r.details:
        p = r.details["protocol"]
        return f"{p['name']} protocol, " + (f"C={p['C']:.3g}" if "C" in p else f"lr={p['lr']:g}")
    knn = r.details.get("knn")
    if knn:
        by_k = ", ".join(f"k={k}: {a:.4f}" for k, a in knn["accuracy_by_k"].items())
        capped = f" (--k {knn['k_asked']} capped at the {r.n_train} training images)" if "k_asked" in knn else ""
        return f"k={knn['k']}{capped}, T={knn['temperature']:g} ({by_k})"
    return f"C={r.params['C']:g}"


def _searched(r: Any) -> str:
    """What a run's search chose: DINOv2's protocol a learning rate, the others C."""
    return "lr" if (r.details.get("protocol") or {}).get("name") == "dinov2" else "C"


@click.command("fit")
@from_config(FitConfig, *FIELDS, short={"model": "-m", "data": "-d"})
@click.option(
    "--metric",
    type=click.Choice(TABLE_METRICS),
    default="accuracy",
    show_default=True,
    help="Metric shown in the table.",
)
@click.option(
    "--allow-stale", is_flag=True, help="Fit features whose images changed since extraction (normally refused)."
)
@from_config(ExtractConfig, "data_dir")
@json_option
@user_errors()
def command(metric: str, allow_stale: bool, data_dir: Path | None, as_json: bool, **options: Any) -> None:
    """Train a classifier on every selected pair of cached train/test features and report test metrics."""
    cfg = FitConfig(**given(options))  # bad arguments are refused before scikit-learn is imported
    from tlfeat.datasets import display_names
    from tlfeat.fitting import fit
    from tlfeat.fitting import table as make_table
    from tlfeat.records import variants

    skipped: list[str] = []
    results = fit(cfg, allow_stale=allow_stale, data_dir=data_dir, skipped=skipped)
    labels = variants([res.record for res in results])  # what sets a line apart from the others
    names = display_names(res.record.dataset for res in results)  # two folders named "data" are two
    for res in results:
        r = res.record
        m, t = r.metrics, r.timings
        auc = "-" if m.get("roc_auc") is None else f"{m['roc_auc']:.4f}"
        low, high = m.get("accuracy_ci95", (float("nan"), float("nan")))
        how = (
            "reused"
            if res.reused
            else f"fit {t.train_seconds:.2f}s (+{_searched(r)} search {t.search_seconds:.1f}s), predict {t.predict_seconds:.2f}s"
        )
        untrained = "" if r.pretrained else " [UNTRAINED backbone]"
        variant = f" [{labels[id(r)]}]" if labels[id(r)] else ""
        line = (
            f"{r.method} {r.model}/{names[r.dataset]} ({r.layer}, {r.image_size} px, n_train {r.n_train}, "
            f"n_test {r.n_test}){untrained}{variant}: "
            f"accuracy {m['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), balanced {m['balanced_accuracy']:.4f}, ROC AUC {auc}, "
            f"{_hyper(r)}; {how}  -> {res.path.parent}"
        )
        echo_result(line, m, as_json)
        cv = r.details.get("cv") or {}
        if cv.get("on_edge"):
            click.echo(
                f"  warning: C = {r.params['C']:g} is on the edge of the searched grid; try --C beyond it", err=True
            )
    for line in skipped:
        click.echo(f"skipped: {line}", err=True)
    if len(results) > 1 or as_json:
        rows, cols, cells = make_table([r.record for r in results], metric)
        body = [
            [row] + ["-" if cells.get((row, c)) is None else f"{cells[(row, c)]:.4f}" for c in cols] for row in rows
        ]
        header = [f"{metric} (model \\ dataset)", *cols]
        click.echo(table(body, header), err=as_json)
        out = Path(cfg.results_dir) / "tables" / f"fit-{cfg.method}-{metric}.md"
        from tlfeat import fsio

        fsio.atomic_write(out, markdown_table(body, header) + "\n")
    if as_json:
        click.echo("[" + ",\n".join(r.record.to_json() for r in results) + "]")
