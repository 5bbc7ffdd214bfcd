"""The report's curves of the probes: k-shot accuracy per dataset, and accuracy against layer depth."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import stats
from tlfeat.backbones.base import PENULTIMATE
from tlfeat.report.plots import MODEL_KEY, Names, Palette, _legend, _plt, _save
from tlfeat.report.rows import group, mean_sd

LINESTYLES = ["-", "--", ":", "-."]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean over draws (the point itself when one draw),
    clipped to [0, 1], where accuracies live (two draws give t = 12.7: wider than the range)."""
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, mean, mean
    from scipy.stats import t

    half = float(t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def shot_points(shot_items: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, list[float]]]:
    """(dataset, model, method) -> shots per class -> the accuracies of its draws."""
    out: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for r in shot_items:
        out.setdefault((r["dataset"], r["model"], r["method"]), {}).setdefault(int(r["shots"]), []).append(
            r["accuracy"]
        )
    return out


def whole_set(main: list[dict[str, Any]], dataset: str, model: str, method: str) -> dict[str, Any] | None:
    """The configuration trained on every training image: mean accuracy, Wilson interval, images per class."""
    runs = [
        r
        for r in main
        if (r["dataset"], r["model"], r["method"]) == (dataset, model, method) and r["layer"] in (PENULTIMATE, "-")
    ]
    if not runs:
        return None
    acc = mean_sd([r["accuracy"] for r in runs])[0]
    n_test = int(runs[0]["n_test"])
    low, high = stats.wilson(int(round(acc * n_test)), n_test)
    per_class = runs[0]["n_train"] / max(1, len(runs[0]["_record"].class_names))
    return {"accuracy": acc, "low": low, "high": high, "per_class": per_class}


def shot_curves(
    shot_items: list[dict[str, Any]], main: list[dict[str, Any]], palette: Palette, folder: Path, names: Names
) -> dict[str, Path]:
    """One plot per dataset: accuracy against training images per class, a line per model x method."""
    import matplotlib.lines

    plt = _plt()
    points = shot_points(shot_items)
    made = {}
    for dataset in sorted({k[0] for k in points}):
        keys = sorted(k for k in points if k[0] == dataset)
        models = sorted({k[1] for k in keys})
        styles: dict[str, Any] = dict(zip(models, LINESTYLES * 4, strict=False))
        shots = sorted({n for k in keys for n in points[k]})
        x_all = shots[-1] * 4  # the whole training set, a step right of the last k
        fig, ax = plt.subplots(figsize=(8.6, 4.8), layout="constrained")
        labels_all = []
        for key in keys:
            _, model, method = key
            ns = sorted(points[key])
            stats_ = [t_interval(points[key][n]) for n in ns]
            colour = palette.color(method)
            xs, ys = list(ns), [s[0] for s in stats_]
            lows, highs = [s[1] for s in stats_], [s[2] for s in stats_]
            whole = whole_set(main, dataset, model, method)
            if whole is not None:
                xs.append(x_all)
                ys.append(whole["accuracy"])
                lows.append(whole["low"])
                highs.append(whole["high"])
                labels_all.append(whole["per_class"])
            ax.plot(xs, ys, marker=palette.marker(model), linestyle=styles[model], color=colour)
            ax.fill_between(xs, lows, highs, color=colour, alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ticks = [*shots, x_all]
        per_class = f"all\n(~{round(float(np.mean(labels_all)))}/class)" if labels_all else "all"
        ax.set_xticks(ticks, [str(n) for n in shots] + [per_class])
        ax.minorticks_off()
        ax.set(xlabel="training images per class", ylabel="test accuracy", ylim=(0, 1.02), title=dataset)
        ax.grid(alpha=0.3)
        methods = sorted({k[2] for k in keys})
        handles = [matplotlib.lines.Line2D([], [], color=palette.color(m), label=m) for m in methods]
        handles += [
            matplotlib.lines.Line2D([], [], color=MODEL_KEY, linestyle=styles[m], marker=palette.marker(m), label=m)
            for m in models
        ]
        _legend(fig, handles, "colour: method, line: model")
        draws = max(len(v) for k in keys for v in points[k].values())
        fig.suptitle(
            f"k-shot: mean of {draws} draws per point (band: 95% t interval); 'all': every training image (Wilson)",
            fontsize=10,
        )
        made[dataset] = _save(fig, folder / names("shots", dataset))
    return made


def _natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def layer_order(layers: list[str], asked: list[str]) -> list[str]:
    """Layers in the order `compare --layers` listed them (the user's depth order), the penultimate layer
    after those of the network, concatenations last; others by name, numbers compared as numbers."""

    def key(layer: str) -> tuple[int, int, list[Any]]:
        if "+" in layer:
            return (3, 0, _natural(layer))
        if layer == PENULTIMATE:
            return (2, 0, [])
        if layer in asked:
            return (0, asked.index(layer), [])
        return (1, 0, _natural(layer))

    return sorted(layers, key=key)


def layer_depth(main: list[dict[str, Any]], asked: list[str], palette: Palette, path: Path) -> Path | None:
    """Layer-wise probe: one panel per dataset, accuracy per layer in depth order, a line per model x method
    (mean over repeats, bars: sd); concatenated layers as separate hollow points right of a dashed line."""
    import matplotlib.lines

    layered = [r for r in main if r["layer"] != "-"]
    if len({r["layer"] for r in layered}) < 2:
        return None
    plt = _plt()
    sets = sorted({r["dataset"] for r in layered})
    order = layer_order(sorted({r["layer"] for r in layered}), asked)
    width = max(5.5, 0.9 * len(order) + 2)
    fig, axes = plt.subplots(1, len(sets), figsize=(width * len(sets) + 2.6, 4.6), squeeze=False, layout="constrained")
    models = sorted({r["model"] for r in layered})
    styles: dict[str, Any] = dict(zip(models, LINESTYLES * 4, strict=False))
    drawn: set[str] = set()
    for ax, dataset in zip(axes[0], sets, strict=True):
        for (model, method), runs in sorted(
            group([r for r in layered if r["dataset"] == dataset], "model", "method").items()
        ):
            by_layer = group(runs, "layer")
            present = [layer for layer in order if (layer,) in by_layer]
            if len(present) < 2:
                continue
            drawn.add(method)
            colour = palette.color(method)
            for kind in ("single", "concat"):
                here = [layer for layer in present if ("+" in layer) == (kind == "concat")]
                ms = [mean_sd([r["accuracy"] for r in by_layer[(layer,)]]) for layer in here]
                ax.errorbar(
                    [order.index(layer) for layer in here], [m[0] for m in ms], yerr=[m[1] for m in ms],
                    marker=palette.marker(model), linestyle=styles[model] if kind == "single" else "none",
                    color=colour, markerfacecolor=colour if kind == "single" else "white", capsize=3,
                )  # fmt: skip
        concat = [i for i, layer in enumerate(order) if "+" in layer]
        if concat:
            ax.axvline(concat[0] - 0.5, color="0.6", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
        ax.set(xlabel="feature layer (shallow → deep; then concatenations)", ylabel="test accuracy", title=dataset)
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    handles = [matplotlib.lines.Line2D([], [], color=palette.color(m), label=m) for m in sorted(drawn)]
    handles += [
        matplotlib.lines.Line2D([], [], color=MODEL_KEY, linestyle=styles[m], marker=palette.marker(m), label=m)
        for m in models
    ]
    _legend(fig, handles, "colour: method, line: model")
    fig.suptitle("Layer-wise probe: accuracy against depth (bars: sd over repeats)")
    return _save(fig, path)
