"""The comparison report, rebuilt from saved records only: Markdown, self-contained HTML, PNG plots,
`rows.csv` (every run), `summary.csv` (every configuration) and `tables.tex` (booktabs).

Everything in it is computed from the JSON records under `<out>/results/`, so `tlfeat report`
gives the same output as the `compare` run that made them, without recomputing anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tlfeat import fsio
from tlfeat.errors import TlfeatError
from tlfeat.report import curves, export, findings, plots, render
from tlfeat.report.rows import best_of, configs, penultimate, rows
from tlfeat.report.sections import recommendation, sections

__all__ = ["build", "recommendation", "rows"]

log = logging.getLogger(__name__)


def _json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    """A JSON object from `path`; `default` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else default
    except (OSError, ValueError):
        return default
    return data if isinstance(data, dict) else default


def make_plots(out: Path, items: list[dict[str, Any]]) -> dict[str, Path]:
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):  # plots of configurations no longer in the results
        old.unlink()
    palette = plots.Palette(sorted({r["method"] for r in items}), sorted({r["model"] for r in items}))
    made: dict[str, Path] = {}
    if (p := plots.accuracy_vs_time(items, palette, folder / "accuracy_vs_time.png")) is not None:
        made["Accuracy against time"] = p
    if (p := plots.learning_curves(items, palette, folder / "learning_curves.png")) is not None:
        made["Learning curves of the fine-tuning runs"] = p
    for dataset in sorted({r["dataset"] for r in penultimate(items)}):
        cfgs = configs([r for r in penultimate(items) if r["dataset"] == dataset])
        best = best_of(cfgs)
        slug = "".join(ch if ch.isalnum() else "-" for ch in dataset)
        made[f"Confusion matrix, {dataset}: {best.label()}"] = plots.confusion(best, folder / f"confusion_{slug}.png")
    for title, path in plots.run_histories(items, folder).items():
        made[f"Loss and accuracy per epoch, {title}"] = path
    return made


def probe_plots(
    out: Path, items: list[dict[str, Any]], shot_items: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Path]:
    """k-shot curves (one per dataset) and the layer-wise probe, for the findings' sections."""
    everything = items + shot_items
    palette = plots.Palette(sorted({r["method"] for r in everything}), sorted({r["model"] for r in everything}))
    made = {f"shots:{d}": p for d, p in curves.shot_curves(shot_items, items, palette, out / "plots").items()}
    asked = [str(layer) for layer in (meta.get("config") or {}).get("layers") or []]
    if (p := curves.layer_depth(items, asked, palette, out / "plots" / "layer_depth.png")) is not None:
        made["layers"] = p
    return made


def build(out: Path) -> Path:
    """Write report.md, report.html, rows.csv, summary.csv, tables.tex and plots/ under `out`; returns report.md."""
    out = Path(out)
    if not (out / "results").is_dir() and not (out / "compare.json").is_file():
        raise TlfeatError(f"{out} holds no results; run `tlfeat compare ... --out {out}` first")
    left_out: list[str] = []
    items = rows(out, left_out)
    meta = _json(out / "compare.json", {})
    failures = _json(out / "failures.json", {"failures": None}).get("failures", {})
    if (out / "failures.json").is_file() and not isinstance(failures, dict):
        left_out.append("failures.json is unreadable or malformed: failed cells, if any, are not listed here")
        log.warning("%s is unreadable or malformed; failed cells, if any, are not listed", out / "failures.json")
    if not isinstance(failures, dict):
        failures = {}
    failures = {str(k): str(v) for k, v in failures.items()}
    items, shot_items = [r for r in items if r["shots"] is None], [r for r in items if r["shots"] is not None]
    made = make_plots(out, items)
    extra = findings.blocks(
        items, shot_items, probe_plots(out, items, shot_items, meta), findings.copy_analyses(out, out / "plots")
    )
    blocks = sections(items, failures, meta, made, left_out, extra)
    fsio.atomic_write(out / "report.md", render.markdown(blocks))
    fsio.atomic_write(out / "report.html", render.page(blocks, out.name))
    fsio.atomic_write(out / "rows.csv", render.csv_text(items))
    fsio.atomic_write(out / "summary.csv", export.summary_csv(items))
    fsio.atomic_write(out / "tables.tex", export.latex(items))
    return out / "report.md"
