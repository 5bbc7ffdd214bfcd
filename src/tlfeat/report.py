"""The comparison report, rebuilt from saved records only (Markdown, self-contained HTML, CSV, PNG).

Everything in it is computed from the JSON records under `<out>/results/`, so `tlfeat report`
gives the same output as the `compare` run that made them, without recomputing anything.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.errors import TlfeatError


def rows(out: Path) -> list[dict[str, Any]]:
    """One row per saved run, sorted: dataset, model, method, layer, seed."""
    from tlfeat.fitting import load_records

    out_rows = []
    for r in load_records(Path(out) / "results"):
        t = r["timings"]
        if r["kind"] == "finetune":
            total = sum(h["epoch_seconds"] for h in r["history"]) + t["predict_seconds"]
            extract = 0.0
        else:
            extract = t["extract_seconds"]
            total = extract + t["train_seconds"] + t["predict_seconds"]
        binary = r["n_classes"] == 2
        m = r["metrics"]
        untrained = not r["pretrained"] and r["method"] != "scratch"
        out_rows.append(
            {
                "dataset": Path(r["dataset"]).name,
                "model": r["model"] + (" (UNTRAINED)" if untrained else ""),
                "method": r["method"],
                "layer": r.get("layer", "-"),
                "seed": r.get("seed", r.get("config", {}).get("seed", 0)),
                "metric_name": "roc_auc" if binary else "accuracy",
                "metric": m["roc_auc"] if binary else m["accuracy"],
                "accuracy": m["accuracy"],
                "balanced_accuracy": m["balanced_accuracy"],
                "roc_auc": m["roc_auc"],
                "train_seconds": t["train_seconds"],
                "extract_seconds": extract,
                "total_seconds": total,
                "weights_id": r["weights_id"],
                "pretrained": r["pretrained"],
                "n_train": r["n_train"],
                "n_test": r["n_test"],
                "n_skipped": sum((r.get("n_skipped") or {}).values()),
                "image_size": r.get("image_size"),
                "record": str(Path(r["_path"]).resolve().relative_to(Path(out).resolve())),
                "_record": r,
            }
        )
    out_rows.sort(key=lambda x: (x["dataset"], x["model"], x["method"], str(x["layer"]), x["seed"]))
    return out_rows


def _group(items: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[tuple(item[k] for k in keys)].append(item)
    return groups


def _stat(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _ms(values: list[float], digits: int = 4) -> str:
    mean, std = _stat(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _penultimate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in items if r["layer"] in ("penultimate", "-")]


def recommendation(items: list[dict[str, Any]]) -> list[str]:
    """Sentences computed from the table: the most accurate configuration per dataset, and the
    cheapest one within one point of it."""
    lines = []
    for (dataset,), group in sorted(_group(_penultimate(items), "dataset").items()):
        configs = []
        for (model, method), runs in _group(group, "model", "method").items():
            configs.append(
                {
                    "model": model,
                    "method": method,
                    "metric": _stat([r["metric"] for r in runs])[0],
                    "total": _stat([r["total_seconds"] for r in runs])[0],
                    "n": len(runs),
                    "metric_name": runs[0]["metric_name"],
                    "pretrained": runs[0]["pretrained"],
                }
            )
        best = max(configs, key=lambda c: c["metric"])
        name = best["metric_name"].replace("roc_auc", "ROC AUC")
        text = (
            f"**{dataset}**: the most accurate is {_cfg(best)} ({name} {best['metric']:.4f}, "
            f"{best['total']:.0f} s in all)"
        )
        close = [c for c in configs if c["metric"] >= best["metric"] - 0.01 and c["total"] < best["total"]]
        if close:
            cheap = min(close, key=lambda c: c["total"])
            gap = (best["metric"] - cheap["metric"]) * 100
            closeness = "as accurate" if gap < 0.05 else f"within {gap:.1f} points of it"
            text += f"; {_cfg(cheap)} is {closeness} {_time_ratio(best['total'], cheap['total'])}."
        else:
            frozen = [c for c in configs if not c["method"].startswith(("finetune", "scratch"))]
            if frozen and best not in frozen:
                f = max(frozen, key=lambda c: c["metric"])
                text += (
                    f"; the best frozen-feature route, {_cfg(f)}, is {(best['metric'] - f['metric']) * 100:.1f} "
                    f"points lower and takes {f['total']:.0f} s."
                )
            else:
                text += "; nothing cheaper comes within one point of it."
        scratch = [c for c in configs if c["method"] == "scratch"]
        if scratch:
            s = max(scratch, key=lambda c: c["metric"])
            text += f" Without transfer (scratch) the best is {s['metric']:.4f}."
        lines.append(text)
    return lines


def _time_ratio(slow: float, fast: float) -> str:
    ratio = slow / max(fast, 1e-9)
    if ratio >= 1.5:
        return (
            f"at 1/{ratio:.0f} of the time ({fast:.0f} s)" if ratio >= 2 else f"in {fast:.0f} s instead of {slow:.0f} s"
        )
    return f"in about the same time ({fast:.0f} s)"


def _cfg(c: dict[str, Any]) -> str:
    method = c["method"]
    if method.startswith("finetune:"):
        return f"{c['model']} fine-tuned ({method.split(':', 1)[1]})"
    if method == "scratch":
        return f"{c['model']} trained from scratch"
    return f"frozen {c['model']} + {method}"


def build(out: Path) -> Path:
    """Write report.md, report.html, rows.csv and plots/ under `out`; returns report.md."""
    out = Path(out)
    if not (out / "results").is_dir():
        raise TlfeatError(f"{out} holds no results; run `tlfeat compare ... --out {out}` first")
    items = rows(out)
    meta = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else {}
    failures = (
        json.loads((out / "failures.json").read_text()).get("failures", {}) if (out / "failures.json").is_file() else {}
    )
    plots = _plots(out, items)
    sections = _sections(items, failures, meta, plots)
    (out / "report.md").write_text(_markdown(sections))
    (out / "report.html").write_text(_html(sections, out))
    _csv(out / "rows.csv", items)
    return out / "report.md"


# --------------------------------------------------------------------------- sections


def _sections(
    items: list[dict[str, Any]], failures: dict[str, str], meta: dict[str, Any], plots: dict[str, Path]
) -> list[tuple[str, Any]]:
    """A neutral list of (kind, payload) blocks that both renderers turn into their format."""
    s: list[tuple[str, Any]] = [("h1", "tlfeat comparison report")]
    if not items:
        s.append(("p", "No completed runs yet."))
    else:
        s.append(("h2", "Recommendation"))
        s += [("li", line) for line in recommendation(items)]
    skipped = {(r["model"], r["dataset"]): r["n_skipped"] for r in items if r["n_skipped"]}
    if skipped:
        s.append(("h2", "Skipped images"))
        s.append(
            ("p", "These runs used features extracted with `--on-error skip`; `tlfeat ls --skipped` names the files.")
        )
        s += [
            ("li", f"{model} on {dataset}: {n} unreadable image(s) skipped") for (model, dataset), n in skipped.items()
        ]
    if failures:
        s.append(("h2", f"Failed cells ({len(failures)})"))
        s.append(("p", "Run the same `tlfeat compare` command again to fill these in."))
        s += [("li", f"FAILED {label}: `{error}`") for label, error in failures.items()]
    main = _penultimate(items)
    metric_names = sorted({r["metric_name"] for r in main})
    for (method,), group in sorted(_group(main, "method").items()):
        datasets_ = sorted({r["dataset"] for r in group})
        models = sorted({r["model"] for r in group})
        cells = {k: [r["metric"] for r in v] for k, v in _group(group, "model", "dataset").items()}
        best = {d: max((_stat(cells[(m, d)])[0] for m in models if (m, d) in cells), default=None) for d in datasets_}
        table = [
            [m]
            + [
                ("**" if (m, d) in cells and _stat(cells[(m, d)])[0] == best[d] and len(models) > 1 else "")
                + (_ms(cells[(m, d)]) if (m, d) in cells else "—")
                for d in datasets_
            ]
            for m in models
        ]
        table = [[c if not c.startswith("**") else c + "**" for c in row] for row in table]
        s.append(
            ("h2", f"{method}: models × datasets ({'/'.join(metric_names)}, mean ± sd over repeats; best in bold)")
        )
        s.append(("table", (["model"] + datasets_, table)))
    for (dataset,), group in sorted(_group(main, "dataset").items()):
        s.append(("h2", f"{dataset}: method × accuracy × time"))
        ref = _best_frozen(group)
        if ref is not None:
            s.append(
                (
                    "p",
                    f"The last two columns compare each fine-tuning run with the most accurate frozen-feature route, "
                    f"{_cfg(ref)} ({ref['accuracy']:.4f}, {ref['total']:.1f} s per run): its total time divided by "
                    "the frozen route's, and how many accuracy points the frozen route is ahead.",
                )
            )
        table = []
        for (model, method), runs in sorted(_group(group, "model", "method").items(), key=_method_order):
            acc = _stat([r["accuracy"] for r in runs])[0]
            total = _stat([r["total_seconds"] for r in runs])[0]
            speed = gap = "—"
            if ref is not None and method.startswith(("finetune", "scratch")):
                speed = f"{total / max(ref['total'], 1e-9):.1f}"
                gap = f"{(ref['accuracy'] - acc) * 100:+.1f}"
            table.append(
                [
                    method,
                    model,
                    _ms([r["accuracy"] for r in runs]),
                    _ms([r["train_seconds"] for r in runs], 1),
                    _ms([r["extract_seconds"] for r in runs], 1),
                    _ms([r["total_seconds"] for r in runs], 1),
                    str(len(runs)),
                    speed,
                    gap,
                ]
            )
        s.append(
            (
                "table",
                (
                    [
                        "method",
                        "model",
                        "accuracy",
                        "train s",
                        "extract s",
                        "total s",
                        "runs",
                        "time ÷ frozen route",
                        "frozen route ahead by (points)",
                    ],
                    table,
                ),
            )
        )
    layer_rows = [r for r in items if r["layer"] not in ("-",)]
    if len({r["layer"] for r in layer_rows}) > 1:
        s.append(("h2", "Accuracy per feature layer"))
        table = [
            [dataset, model, method, layer, _ms([r["accuracy"] for r in runs])]
            for (dataset, model, method, layer), runs in sorted(
                _group(layer_rows, "dataset", "model", "method", "layer").items()
            )
        ]
        s.append(("table", (["dataset", "model", "method", "layer", "accuracy"], table)))
    s.append(("h2", "Plots"))
    for title, path in plots.items():
        s.append(("img", (title, path)))
    s.append(("h2", "Every run"))
    s.append(
        (
            "table",
            (
                [
                    "dataset",
                    "model",
                    "method",
                    "layer",
                    "seed",
                    "accuracy",
                    "ROC AUC",
                    "train s",
                    "total s",
                    "weights",
                    "record",
                ],
                [
                    [
                        r["dataset"],
                        r["model"],
                        r["method"],
                        r["layer"],
                        str(r["seed"]),
                        f"{r['accuracy']:.4f}",
                        "-" if r["roc_auc"] is None else f"{r['roc_auc']:.4f}",
                        f"{r['train_seconds']:.1f}",
                        f"{r['total_seconds']:.1f}",
                        r["weights_id"] + ("" if r["pretrained"] else " (untrained)"),
                        str(Path(r["record"]).parent.name),
                    ]
                    for r in items
                ],
            ),
        )
    )
    s.append(("h2", "How these numbers were made"))
    if meta.get("command"):
        s.append(("code", meta["command"]))
    if meta.get("config"):
        s.append(("code", json.dumps(meta["config"], indent=2)))
    if meta.get("environment"):
        env = meta["environment"]
        s.append(("p", ", ".join(f"{k}: {v}" for k, v in env.items())))
    s.append(("p", "Each row's full config, provenance and timings are in its record.json (column `record`)."))
    return s


def _best_frozen(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    frozen = [r for r in group if not r["method"].startswith(("finetune", "scratch"))]
    if not frozen:
        return None
    (model, method), runs = max(
        _group(frozen, "model", "method").items(), key=lambda kv: _stat([r["accuracy"] for r in kv[1]])[0]
    )
    return {
        "model": model,
        "method": method,
        "accuracy": _stat([r["accuracy"] for r in runs])[0],
        "total": _stat([r["total_seconds"] for r in runs])[0],
    }


def _method_order(item: tuple[tuple[str, str], list[dict[str, Any]]]) -> tuple[int, str, str]:
    (model, method), _ = item
    rank = 2 if method == "scratch" else 1 if method.startswith("finetune") else 0
    return rank, model, method


# --------------------------------------------------------------------------- plots


def _plots(out: Path, items: list[dict[str, Any]]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    made: dict[str, Path] = {}
    main = _penultimate(items)
    datasets_ = sorted({r["dataset"] for r in main})
    if main:
        methods = sorted({r["method"] for r in main})
        models = sorted({r["model"] for r in main})
        markers = dict(zip(models, "osD^v<>Xph*", strict=False))
        palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # no grey: models use it
        colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
        fig, axes = plt.subplots(
            1, len(datasets_), figsize=(5.5 * len(datasets_) + 2.5, 4.5), squeeze=False, constrained_layout=True
        )
        for ax, dataset in zip(axes[0], datasets_, strict=True):
            for method in methods:
                for model in models:
                    pts = [r for r in main if (r["dataset"], r["method"], r["model"]) == (dataset, method, model)]
                    if pts:
                        ax.scatter(
                            [r["total_seconds"] for r in pts],
                            [r["accuracy"] for r in pts],
                            s=45,
                            alpha=0.8,
                            color=colors[method],
                            marker=markers[model],
                            edgecolors="black",
                            linewidths=0.4,
                        )
            ax.set_xscale("log")
            ax.set_xlim(*_log_limits([r["total_seconds"] for r in main if r["dataset"] == dataset]))
            plain = matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:g}" if _round_tick(v) else "")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.set(xlabel="total time per run, s (log scale)", ylabel="test accuracy", title=dataset)
            ax.grid(alpha=0.3, which="both")
        handles = [matplotlib.lines.Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in methods]
        handles += [
            matplotlib.lines.Line2D(
                [], [], color="black", marker=markers[m], markerfacecolor="none", linestyle="", label=m
            )
            for m in models
        ]
        fig.legend(
            handles=handles,
            loc="outside right upper",
            fontsize=8,
            title="colour: method, marker: model",
            title_fontsize=8,
        )
        fig.suptitle("Accuracy vs time, one point per run")
        made["Accuracy vs total time"] = _save(fig, folder / "accuracy_vs_time.png")
    tuned = [r for r in items if r["_record"]["kind"] == "finetune"]
    if tuned:
        tuned_sets = sorted({r["dataset"] for r in tuned})
        fig, axes = plt.subplots(
            1, len(tuned_sets), figsize=(5.5 * len(tuned_sets) + 2.5, 4.5), squeeze=False, constrained_layout=True
        )
        for ax, dataset in zip(axes[0], tuned_sets, strict=True):
            groups = _group([r for r in tuned if r["dataset"] == dataset], "model", "method")
            for i, ((model, method), runs) in enumerate(sorted(groups.items())):
                curves = [[e["val_accuracy"] for e in r["_record"]["history"]] for r in runs]
                n = min(len(c) for c in curves)
                arr = np.array([c[:n] for c in curves])
                epochs = np.arange(1, n + 1)
                color = plt.get_cmap("tab10")(i % 10)
                ax.plot(epochs, arr.mean(0), "o-", color=color, label=f"{method} {model}")
                if len(runs) > 1:
                    ax.fill_between(epochs, arr.min(0), arr.max(0), color=color, alpha=0.15)
            ax.set(xlabel="epoch", ylabel="validation accuracy", title=dataset, ylim=(0, 1.02))
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
        fig.suptitle("Fine-tuning learning curves\n(mean over repeats, band: min to max)")
        made["Learning curves of the fine-tuning runs"] = _save(fig, folder / "learning_curves.png")
    if items:
        best = max(main or items, key=lambda r: r["accuracy"])
        cm = np.asarray(best["_record"]["metrics"]["confusion_matrix"])
        names = best["_record"]["class_names"]
        size = max(4.5, 0.45 * len(names) + 2)
        fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
        ax.set(
            xlabel="predicted",
            ylabel="true",
            title=f"Best run: {best['method']} {best['model']}/{best['dataset']}\naccuracy {best['accuracy']:.4f}",
        )
        made["Confusion matrix of the best run"] = _save(fig, folder / "confusion_best.png")
    layer_rows = [r for r in items if r["layer"] != "-"]
    if len({r["layer"] for r in layer_rows}) > 1:
        fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
        for (dataset, model, method), runs in sorted(_group(layer_rows, "dataset", "model", "method").items()):
            by_layer = _group(runs, "layer")
            order = sorted(by_layer, key=lambda k: (k[0] == "penultimate", k[0]))
            ax.errorbar(
                [k[0] for k in order],
                [_stat([r["accuracy"] for r in by_layer[k]])[0] for k in order],
                yerr=[_stat([r["accuracy"] for r in by_layer[k]])[1] for k in order],
                marker="o",
                capsize=3,
                label=f"{model} + {method} on {dataset}",
            )
        ax.set(xlabel="feature layer (early → penultimate)", ylabel="test accuracy", title="Accuracy per layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        made["Accuracy per feature layer"] = _save(fig, folder / "accuracy_per_layer.png")
    return made


_TICK_MANTISSAS = (1, 2, 3, 5)  # labelled on log time axes: dense enough to read, never crowded


def _round_tick(v: float) -> bool:
    if v <= 0:
        return False
    mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
    return any(abs(mantissa - m) < 1e-6 for m in _TICK_MANTISSAS)


def _log_limits(values: list[float]) -> tuple[float, float]:
    """Log-axis limits widened to labelled ticks (1, 2, 3, 5 x 10^k), so both ends of the data can be read."""
    lo, hi = max(min(values), 1e-3) / 1.1, max(max(values), 1e-3) * 1.1
    ticks = [
        m * 10.0**k
        for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
        for m in _TICK_MANTISSAS
    ]
    return max(t for t in ticks if t <= lo), min(t for t in ticks if t >= hi)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- renderers


def _markdown(sections: list[tuple[str, Any]]) -> str:
    lines: list[str] = []
    for kind, payload in sections:
        if kind == "h1":
            lines += [f"# {payload}", ""]
        elif kind == "h2":
            lines += ["", f"## {payload}", ""]
        elif kind == "p":
            lines += [payload, ""]
        elif kind == "li":
            lines.append(f"- {payload}")
        elif kind == "code":
            lines += ["```", payload, "```", ""]
        elif kind == "img":
            title, path = payload
            lines += [f"![{title}](plots/{path.name})", ""]
        elif kind == "table":
            header, body = payload
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
            lines.append("")
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    out = html.escape(text)
    parts = out.split("**")
    out = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(sections: list[tuple[str, Any]], out: Path) -> str:
    body: list[str] = []
    in_list = False
    for kind, payload in sections:
        if kind != "li" and in_list:
            body.append("</ul>")
            in_list = False
        if kind == "h1":
            body.append(f"<h1>{_inline(payload)}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{_inline(payload)}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline(payload)}</p>")
        elif kind == "li":
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{_inline(payload)}</li>")
        elif kind == "code":
            body.append(f"<pre>{html.escape(payload)}</pre>")
        elif kind == "img":
            title, path = payload
            data = base64.b64encode(path.read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(title)}</figcaption></figure>"
            )
        elif kind == "table":
            header, rows_ = payload
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in rows_)
            body.append(f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table></div>")
    if in_list:
        body.append("</ul>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;white-space:nowrap}th{background:#f2f2f2}"
        "tbody tr:nth-child(even){background:#fafafa}img{max-width:100%;border:1px solid #ddd}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}h2{margin-top:1.6em;"
        "border-bottom:1px solid #eee}.wide{overflow-x:auto}figure{margin:1em 0}figcaption{color:#555;font-size:13px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>tlfeat report: {html.escape(out.name)}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _csv(path: Path, items: list[dict[str, Any]]) -> None:
    fields = [k for k in (items[0] if items else {}) if not k.startswith("_")]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in items:
            writer.writerow(
                {k: ("" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else r[k]) for k in fields}
            )
