"""Figures of the analyses: similarity heat maps, embeddings, neighbour galleries, filters, activation maps.

`pyplot()` is how every figure of tlfeat (analyses, report, fine-tuning history) gets matplotlib: text
is drawn as given, never parsed as a formula (a class named `$x^2$` is those five characters), and
`label()` makes names read from the file system drawable (bytes that are not UTF-8 as `\\xe9`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import fsio
from tlfeat.errors import printable


def pyplot() -> Any:
    """matplotlib's pyplot, off screen, drawing every text as plain text (names are data)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def label(text: object) -> str:
    """Text from user data (a class, dataset or model name) as a figure can draw it."""
    return "\n".join(printable(line) for line in str(text).split("\n"))  # its own line breaks kept


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path


def heatmap(values: np.ndarray, labels: list[str], title: str, path: Path, scale: str = "CKA") -> Path:
    """A symmetric matrix with its values written in each cell (readable up to about 20 labels)."""
    plt = pyplot()
    n = len(labels)
    size = max(4.8, 0.55 * n + 2.8)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    finite = values[np.isfinite(values)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    image = ax.imshow(values, cmap="magma", vmin=low, vmax=1.0)
    ax.set_xticks(range(n), [label(t) for t in labels], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [label(t) for t in labels], fontsize=8)
    if n <= 20:
        for (i, j), v in np.ndenumerate(values):
            shade = (v - low) / max(1.0 - low, 1e-9)
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if shade > 0.6 else "white")
    fig.colorbar(image, ax=ax, shrink=0.8, label=scale)
    ax.set_title(label(title), fontsize=10)
    return save(fig, path)


def class_colours(n: int) -> list[Any]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv")
    return [cmap(i if n <= 20 else i / n) for i in range(n)]


def embeddings(
    panels: list[tuple[str, np.ndarray]], y: np.ndarray, class_names: list[str], title: str, path: Path
) -> Path:
    """One scatter panel per (title, 2-D points), points coloured by class, one legend for all."""
    import matplotlib.lines

    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.8, 4.0 * rows), squeeze=False, layout="constrained")
    colours = class_colours(len(class_names))
    for ax, (name, points) in zip(axes.ravel(), panels, strict=False):
        for c in range(len(class_names)):
            mask = y == c
            ax.scatter(points[mask, 0], points[mask, 1], s=10, color=colours[c], alpha=0.75, linewidths=0)
        ax.set_title(label(name), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    handles = [
        matplotlib.lines.Line2D([], [], color=colours[c], marker="o", linestyle="", label=label(class_names[c]))
        for c in range(len(class_names))
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, title="class")
    fig.suptitle(label(title))
    return save(fig, path)


def gallery(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Each row: the query image, then its neighbours; a neighbour of another class is framed red."""
    plt = pyplot()
    k = max(len(r["neighbours"]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.6 * (k + 1), 1.85 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        _tile(ax_row[0], row["image"], f"query\n{label(row['label'])}", "#1f4e9e", bold=True)
        for ax, n in zip(ax_row[1:], row["neighbours"], strict=False):
            colour = "#2ca02c" if n["same"] else "#d62728"
            _tile(ax, n["image"], f"{label(n['label'])}\ncos {n['similarity']:.2f}", colour)
        for ax in ax_row[1 + len(row["neighbours"]) :]:
            ax.axis("off")
    fig.suptitle(label(title), fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def _tile(ax: Any, image: np.ndarray, caption: str, frame: str, bold: bool = False) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(frame)
        spine.set_linewidth(3)
    ax.set_title(caption, fontsize=7, fontweight="bold" if bold else "normal", color=frame)


def filters(weights: np.ndarray, title: str, path: Path) -> Path:
    """First-layer filters (out, in, h, w) as a grid of small images, each scaled to its own range."""
    plt = pyplot()
    n = len(weights)
    cols = min(16, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.8 * cols + 0.4, 0.8 * rows + 0.8), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        w = weights[i]
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
        ax.imshow(w.transpose(1, 2, 0) if w.shape[0] == 3 else w[0], cmap=None if w.shape[0] == 3 else "gray")
    fig.suptitle(label(title), fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def activations(crop: np.ndarray, stages: list[dict[str, Any]], title: str, path: Path) -> Path:
    """The network's input crop, then per block its most active channels' maps (one row per block)."""
    plt = pyplot()
    cols = 1 + max(len(s["maps"]) for s in stages)
    fig, axes = plt.subplots(len(stages), cols, figsize=(1.5 * cols + 0.6, 1.55 * len(stages) + 0.6), squeeze=False)
    for ax_row, stage in zip(axes, stages, strict=True):
        ax_row[0].imshow(crop)
        ax_row[0].set_ylabel(
            f"{label(stage['name'])}\n{stage['shape']}", fontsize=7, rotation=0, ha="right", va="center"
        )
        ax_row[0].set_xticks([])
        ax_row[0].set_yticks([])
        for ax, (channel, amap) in zip(ax_row[1:], stage["maps"], strict=False):
            ax.imshow(amap, cmap="viridis")
            ax.set_title(f"ch {channel}", fontsize=6)
            ax.axis("off")
        for ax in ax_row[1 + len(stage["maps"]) :]:
            ax.axis("off")
    fig.suptitle(label(title), fontsize=10)
    fig.tight_layout()
    return save(fig, path)
