"""Tables for a paper: `summary.csv` (one row per configuration, full precision) and LaTeX
(booktabs), numbers rounded for reading."""

from __future__ import annotations

from typing import Any

from tlfeat.report.render import csv_table, tex
from tlfeat.report.rows import best_in_column, configs, group, mean_sd, model_by_dataset, penultimate


def summary_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in sorted(configs(items), key=lambda c: (c.dataset, c.parsed.rank, c.model, c.method, c.variant)):
        acc = [r["accuracy"] for r in c.runs]
        mean, sd = mean_sd(acc)
        low, high = c.ci95
        aucs = [r["roc_auc"] for r in c.runs if r["roc_auc"] is not None]
        out.append(
            {
                "dataset": c.dataset,
                "dataset_id": c.runs[0]["dataset_id"],
                "model": c.model,
                "method": c.method,
                "variant": c.variant,
                "layer": c.runs[0]["layer"],
                "n_runs": len(c.runs),
                "n_train": c.runs[0]["n_train"],
                "n_test": c.n_test,
                "accuracy_mean": mean,
                "accuracy_sd": sd,
                "accuracy_ci95_low": low,
                "accuracy_ci95_high": high,
                "roc_auc_mean": mean_sd(aucs)[0] if aucs else "",
                "macro_f1_mean": mean_sd([r["macro_f1"] for r in c.runs])[0],
                "extract_seconds": c.seconds("extract_seconds"),
                "search_seconds": c.seconds("search_seconds"),
                "train_seconds": c.seconds("train_seconds"),
                "total_seconds": c.seconds("total_seconds"),
                "near_chance": c.near_chance,
            }
        )
    return out


def shot_summary_rows(shot_items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per k-shot configuration (dataset, model, method, k): its draws are the runs, the interval
    is the 95% t interval over the draws (clipped to [0, 1]), as in the report's k-shot table."""
    from tlfeat.report.curves import t_interval

    by_k = [{**r, "variant": f"{r['shots']}-shot"} for r in shot_items]
    out = []
    for row in summary_rows(by_k):
        draws = [
            r
            for r in by_k
            if (r["dataset"], r["model"], r["method"], r["variant"])
            == (row["dataset"], row["model"], row["method"], row["variant"])
        ]
        _, low, high = t_interval([r["accuracy"] for r in draws])
        out.append({**row, "shots": draws[0]["shots"], "accuracy_ci95_low": low, "accuracy_ci95_high": high})
    return out


def summary_csv(items: list[dict[str, Any]], shot_items: list[dict[str, Any]] | None = None) -> str:
    """Every configuration on the whole training set (`shots` empty), then every k-shot one (n_runs: its draws)."""
    rows_ = [{**r, "shots": ""} for r in summary_rows(penultimate(items) or items)]
    rows_ += shot_summary_rows(shot_items or [])
    return csv_table(list(rows_[0]), rows_) if rows_ else ""


def latex(items: list[dict[str, Any]]) -> str:
    """One booktabs table per method: models x datasets, accuracy in percent, mean ± sd, best in bold."""
    parts = ["% tlfeat comparison tables; needs \\usepackage{booktabs}", ""]
    by_method = sorted(group(penultimate(items), "method").items(), key=lambda kv: (kv[1][0]["method_rank"], kv[0]))
    for (method,), runs in by_method:
        models, cols, cells = model_by_dataset(runs, "accuracy", scale=100.0)
        parts += [
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{Test accuracy (\\%) of {tex(method)} (mean $\\pm$ sd over repeats).}}",
            "\\begin{tabular}{l" + "r" * len(cols) + "}",
            "\\toprule",
            "Model & " + " & ".join(tex(d) for d in cols) + " \\\\",
            "\\midrule",
        ]
        for m in models:
            line = [tex(m)]
            for d in cols:
                if (m, d) not in cells:
                    line.append("--")
                    continue
                mean, sd = mean_sd(cells[(m, d)])
                text = f"{mean:.2f}" + (f" $\\pm$ {sd:.2f}" if len(cells[(m, d)]) > 1 else "")
                line.append(f"\\textbf{{{text}}}" if mean == best_in_column(cells, models, d) else text)
            parts.append(" & ".join(line) + " \\\\")
        parts += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(parts)
