"""The report's figures, one function each. A method has one colour in every figure (`Palette`);
legends sit outside the axes, so they never cover a point, a curve or a title."""

from __future__ import annotations

import math
import os
import stat
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import fsio
from tlfeat.analysis.plots import pyplot
from tlfeat.classifier_specs import SPECS
from tlfeat.errors import TlfeatError, printable
from tlfeat.records import Method
from tlfeat.report.rows import Config, configs, group, penultimate

# Colours of the methods people compare most, fixed, so a report always reads the same way (the
# frozen classifiers' from their specs).
_FIXED = {
    **{method: spec.colour for method, spec in SPECS.items()},
    "finetune:head": "#2ca02c",
    "finetune:full": "#d62728",
    "finetune:discriminative": "#9467bd",
    "scratch": "#111111",
}
_SPARE = ["#bcbd22", "#393b79", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94"]
MARKERS = "osD^v<>Xph*"


class Palette:
    """method -> colour, model -> marker, decided once per report."""

    def __init__(self, methods: list[str], models: list[str]) -> None:
        spare = iter(_SPARE * 4)
        self.colors = {m: _FIXED.get(m) or next(spare) for m in sorted(methods)}
        self.markers = dict(zip(sorted(models), MARKERS * 4, strict=False))

    def color(self, method: str) -> str:
        return self.colors.get(method, "#7f7f7f")

    def marker(self, model: str) -> str:
        return self.markers.get(model, "o")


_plt = pyplot  # names are data: a `$` in a dataset or class name is text, never the start of a formula


def _short(text: str, limit: int = 24) -> str:
    """A label short enough to leave room for the plot (the tables give names in full)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Names:
    """File names of one report's plots: readable, safe in any file system, never the same twice."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, kind: str, *parts: str) -> str:
        """`kind` (a fixed name such as "accuracy_vs_time"), then each part with every other character a "-"."""
        stem = "_".join(
            [kind, *("".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in p)[:60] for p in parts)]
        )
        name, n = f"{stem}.png", 1
        while name.lower() in self.used:
            n += 1
            name = f"{stem}-{n}.png"
        self.used.add(name.lower())
        return name


PNG = b"\x89PNG\r\n\x1a\n"
MAX_HISTORY_BYTES = 20 * 2**20  # a history plot is tens of kB; nothing larger is embedded


def _save(fig: Any, path: Path) -> Path:
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    return path


MODEL_KEY = "0.55"  # the grey of a legend's model entries: no method's colour, so never read as one


def _legend(fig: Any, handles: list[Any], title: str | None = None) -> None:
    # Centred on the right: clear of the figure's title, which spans the whole width.
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title=title, title_fontsize=8, frameon=False)


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


def accuracy_vs_time(items: list[dict[str, Any]], palette: Palette, path: Path) -> Path | None:
    """One panel per dataset: each configuration's mean accuracy (95% interval) against its time."""
    import matplotlib.lines
    import matplotlib.ticker

    plt = _plt()
    cfgs = configs(penultimate(items))
    sets = sorted({c.dataset for c in cfgs})
    if not sets:
        return None
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets) + 2.6, 4.4), squeeze=False, layout="constrained")
    for ax, dataset in zip(axes[0], sets, strict=True):
        here = [c for c in cfgs if c.dataset == dataset]
        for c in here:
            low, high = c.ci95
            color = palette.color(c.method)
            ax.errorbar(
                c.seconds("total_seconds"),
                c.accuracy,
                yerr=[[max(0.0, c.accuracy - low)], [max(0.0, high - c.accuracy)]],
                fmt="none",
                ecolor=color,
                alpha=0.6,
                capsize=2,
            )
            ax.scatter(
                c.seconds("total_seconds"),
                c.accuracy,
                s=48,
                color=color,
                marker=palette.marker(c.model),
                edgecolors="black",
                linewidths=0.4,
                zorder=3,
            )
        ax.set_xscale("log")
        ax.set_xlim(*_log_limits([c.seconds("total_seconds") for c in here]))
        plain = matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:g}" if _round_tick(v) else "")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set(xlabel="time per run, s (log scale)", ylabel="test accuracy", title=_short(dataset, 60))
        ax.grid(alpha=0.3, which="both")
    methods = sorted({c.method for c in cfgs}, key=lambda m: (Method.parse(m).rank, m))
    handles = [
        matplotlib.lines.Line2D([], [], color=palette.color(m), marker="o", linestyle="", label=m) for m in methods
    ]
    handles += [
        matplotlib.lines.Line2D(
            [], [], color=MODEL_KEY, marker=palette.marker(m), markerfacecolor="none", linestyle="", label=m
        )
        for m in sorted({c.model for c in cfgs})
    ]
    _legend(fig, handles, "colour: method, marker: model")
    fig.suptitle("Accuracy against time (bars: 95% interval over the test images)")
    return _save(fig, path)


def learning_curves(items: list[dict[str, Any]], palette: Palette, path: Path) -> Path | None:
    """Validation accuracy per epoch of the fine-tuning runs: mean over repeats, band min to max."""
    import matplotlib.lines
    import matplotlib.ticker

    plt = _plt()
    tuned = [r for r in items if r["_record"].kind == "finetune"]
    if not tuned:
        return None
    sets = sorted({r["dataset"] for r in tuned})
    styles = dict(zip(sorted({r["model"] for r in tuned}), ["-", "--", ":", "-."] * 4, strict=False))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets) + 2.6, 4.4), squeeze=False, layout="constrained")
    for ax, dataset in zip(axes[0], sets, strict=True):
        for (model, method), runs in sorted(
            group([r for r in tuned if r["dataset"] == dataset], "model", "method").items()
        ):
            curves = [[e["val_accuracy"] for e in r["_record"].details.get("history", [])] for r in runs]
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            arr = np.array([c[:n] for c in curves])
            epochs = np.arange(1, n + 1)
            color = palette.color(method)
            ax.plot(
                epochs, arr.mean(0), marker=palette.marker(model), markersize=4, linestyle=styles[model], color=color
            )
            if len(runs) > 1:
                ax.fill_between(epochs, arr.min(0), arr.max(0), color=color, alpha=0.15)
        ax.set(xlabel="epoch", ylabel="validation accuracy", title=_short(dataset, 60), ylim=(0, 1.02))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
        longest = max(
            (len(r["_record"].details.get("history", [])) for r in tuned if r["dataset"] == dataset), default=1
        )
        if longest <= 2:  # one or two epochs: ticks at those epochs only, not at fractions between them
            ax.set_xticks(range(1, longest + 1))
            ax.set_xlim(0.5, longest + 0.5)
        ax.grid(alpha=0.3)
    methods = sorted({r["method"] for r in tuned})
    handles = [matplotlib.lines.Line2D([], [], color=palette.color(m), label=m) for m in methods]
    handles += [
        matplotlib.lines.Line2D([], [], color=MODEL_KEY, linestyle=s, marker=palette.marker(m), label=m)
        for m, s in styles.items()
    ]
    _legend(fig, handles, "colour: method, line and marker: model")
    fig.suptitle("Fine-tuning: validation accuracy per epoch (mean over repeats, band: min to max)")
    return _save(fig, path)


def confusion(config: Config, path: Path) -> Path:
    """The confusion matrix of a configuration's first run."""
    plt = _plt()
    run = min(config.runs, key=lambda r: r["seed"])["_record"]
    cm = np.asarray(run.metrics["confusion_matrix"])
    names = [_short(printable(str(n))) for n in run.class_names]
    size = max(4.5, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title="\n".join(
            [
                *textwrap.wrap(f"{_short(config.dataset, 60)}: {config.label()}", int(size * 10) - 15),
                f"accuracy {run.metrics['accuracy']:.4f}",
            ]
        ),
    )
    return _save(fig, path)


def run_histories(items: list[dict[str, Any]], folder: Path, names: Names) -> dict[str, Path]:
    """The loss and metric curves each fine-tuning configuration saved (its first seed's run)."""
    out = {}
    for c in configs([r for r in items if r["_record"].kind == "finetune"]):
        run = min(c.runs, key=lambda r: r["seed"])["_record"]
        data = _history_png(run)
        if data is None:
            continue
        target = folder / names("history", c.dataset, c.model, c.method + (f" {c.variant}" if c.variant else ""))
        fsio.atomic_write(target, data)
        out[f"{c.dataset}: {c.label()} (seed {run.seed})"] = target
    return out


def _history_png(run: Any) -> bytes | None:
    """The bytes of a run's own history plot: a PNG file in its record's folder, else None."""
    if run.path is None:
        return None
    return png_inside(Path(run.path).parent, run.details.get("plot", "history.png"))


def png_inside(base: Path, relative: object) -> bytes | None:
    """The bytes of a PNG named in a file tlfeat did not write itself (a record, an index): a regular
    file of sensible size inside `base` (see `fsio.inside`), else None; nothing else is ever read."""
    try:
        source = fsio.inside(base, relative)
        if not stat.S_ISREG(os.stat(source).st_mode) or os.stat(source).st_size > MAX_HISTORY_BYTES:
            return None
        data = source.read_bytes()
    except (OSError, TlfeatError):
        return None
    return data if data.startswith(PNG) else None
