"""The comparison report, rebuilt from saved records only: Markdown, self-contained HTML, PNG plots,
`rows.csv` (every run), `summary.csv` (every configuration) and `tables.tex` (booktabs).

Everything in it is computed from the JSON records under `<out>/results/`, so `tlfeat report`
gives the same output as the `compare` run that made them, without recomputing anything.

tlfeat writes a report only into a folder it made: `compare` leaves a marker (`.tlfeat-report`)
in the folder it creates (or finds empty), with the plots it wrote; `report` refuses a folder
without one, and removes, of the plots no longer made, only those its marker lists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tlfeat import fsio
from tlfeat.errors import TlfeatError, printable
from tlfeat.report import curves, export, findings, plots, render
from tlfeat.report.rows import best_of, configs, penultimate, rows, split_shots
from tlfeat.report.sections import recommendation, sections

__all__ = ["MARKER", "build", "claim", "recommendation", "rows", "split_shots"]

MARKER = fsio.MARKER
claim = fsio.claim  # compare's report folder: made by tlfeat, or new or empty

log = logging.getLogger(__name__)


def _json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    """A JSON object from `path`; `default` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else default
    except (OSError, ValueError, RecursionError):
        return default
    return data if isinstance(data, dict) else default


_ours = fsio.owned


def _made_plots(out: Path) -> list[str]:
    """The plot files the last build wrote (the only ones it may remove)."""
    listed = _json(out / MARKER, {}).get("plots")
    return (
        [p for p in listed if isinstance(p, str) and p.endswith(".png") and "/" not in p]
        if isinstance(listed, list)
        else []
    )


def make_plots(out: Path, items: list[dict[str, Any]], names: plots.Names) -> dict[str, Path]:
    folder = plots_folder(out)
    palette = plots.Palette(sorted({r["method"] for r in items}), sorted({r["model"] for r in items}))
    made: dict[str, Path] = {}
    if (p := plots.accuracy_vs_time(items, palette, folder / names("accuracy_vs_time"))) is not None:
        only = len(penultimate(items)) < len(items)  # colour and marker name method and model, not the layer
        made["Accuracy against time" + (" (penultimate layer only)" if only else "")] = p
    if (p := plots.learning_curves(items, palette, folder / names("learning_curves"))) is not None:
        made["Learning curves of the fine-tuning runs"] = p
    for dataset in sorted({r["dataset"] for r in items}):  # the recommendation's best: every layer's included
        cfgs = configs([r for r in items if r["dataset"] == dataset])
        best = best_of(cfgs)
        path = plots.confusion(best, folder / names("confusion", dataset))
        made[f"Confusion matrix, {dataset}: {best.label()}"] = path
    for title, path in plots.run_histories(items, folder, names).items():
        made[f"Loss and accuracy per epoch, {title}"] = path
    return made


def plots_folder(out: Path) -> Path:
    folder = out / "plots"
    if folder.is_symlink():  # its plots would land (and old ones be removed) in a folder of someone else's
        raise TlfeatError(f"{printable(str(folder))} is a link; remove it, and tlfeat makes a plots folder of its own")
    folder.mkdir(exist_ok=True)
    return folder


def probe_plots(
    out: Path, items: list[dict[str, Any]], shot_items: list[dict[str, Any]], meta: dict[str, Any], names: plots.Names
) -> dict[str, Path]:
    """k-shot curves (one per dataset) and the layer-wise probe, for the findings' sections."""
    everything = items + shot_items
    palette = plots.Palette(sorted({r["method"] for r in everything}), sorted({r["model"] for r in everything}))
    folder = plots_folder(out)
    made = {f"shots:{d}": p for d, p in curves.shot_curves(shot_items, items, palette, folder, names).items()}
    asked = [str(layer) for layer in (meta.get("config") or {}).get("layers") or []]
    if (p := curves.layer_depth(items, asked, palette, folder / names("layer_depth"))) is not None:
        made["layers"] = p
    return made


def _remove_unmade(out: Path, written: set[str]) -> None:
    """Plots of configurations no longer in the results: of those, only files the marker lists as tlfeat's."""
    for old in _made_plots(out):
        if old not in written:
            (out / "plots" / old).unlink(missing_ok=True)


def build(out: Path) -> Path:
    """Write report.md, report.html, rows.csv, summary.csv, tables.tex and plots/ under `out`; returns report.md."""
    out = Path(out)
    if not str(out) or not out.is_dir():
        raise TlfeatError(
            f"{printable(str(out)) or 'an empty name'} is no folder; give the --out folder of a `tlfeat compare`"
        )
    if not (out / "results").is_dir() and not (out / "compare.json").is_file():
        raise TlfeatError(
            f"{printable(str(out))} holds no results; run `tlfeat compare ... --out {printable(str(out))}` first"
        )
    if not _ours(out):
        raise TlfeatError(
            f"{printable(str(out))} was not made by `tlfeat compare` (no {MARKER} in it), so tlfeat writes nothing there; "
            f"if it is a report folder of an earlier tlfeat, create {MARKER} in it and run again"
        )
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
    if not items and not failures:  # an empty report would replace the one there: keep it, say why
        why = "; ".join(printable(p) for p in left_out[:2]) or "none is saved"
        raise TlfeatError(
            f"no run of the report in {printable(str(out))} could be read ({why}{'; ...' if len(left_out) > 2 else ''}); "
            "nothing in it was changed. If its results moved, run `tlfeat report` from the project folder or set "
            "TLFEAT_RESULTS_DIR to the folder holding fits/ and finetunes/"
        )
    items, shot_items = split_shots(items)
    names = plots.Names()
    made = make_plots(out, items, names)
    probes = probe_plots(out, items, shot_items, meta, names)
    analyses = findings.copy_analyses(out, out / "plots", names)
    extra = findings.blocks(items, shot_items, probes, analyses)
    blocks = sections(items, failures, meta, made, left_out, extra)
    written = {p.name for p in [*made.values(), *probes.values(), *(a["_png"] for a in analyses)]}
    _remove_unmade(out, written)
    fsio.atomic_write(out / "report.md", render.markdown(blocks))
    fsio.atomic_write(out / "report.html", render.page(blocks, out.resolve().name))
    fsio.atomic_write(out / "rows.csv", render.csv_text(items + shot_items))
    fsio.atomic_write(out / "summary.csv", export.summary_csv(items, shot_items))
    fsio.atomic_write(out / "tables.tex", export.latex(items))
    marker = {**_json(out / MARKER, {}), "plots": sorted(written)}
    fsio.atomic_write(out / MARKER, json.dumps(marker, indent=2))
    return out / "report.md"
