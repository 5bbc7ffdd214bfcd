"""Comparison runs: models x datasets x methods x repeats, reusing every saved result.

`compare` plans the matrix (what runs, what is reused), runs what is missing (a failed cell is
recorded and the rest go on), and writes the report. `report` rebuilds the report from the saved
records alone: no feature, fit or fine-tune is recomputed. A repeat varies the seed, and with
`--resample` also the `--limit` subset of training images. `--shots` adds k-shot cells (frozen
methods on N images per class, several draws), `chain:DATASET:STRATEGY` two-stage fine-tunes
(`chain`), `--analyses` representation analyses of the cached features (`analysis.study`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tlfeat import backbones, cache, catalog, concat, datasets, fsio
from tlfeat.config import CompareConfig, ExtractConfig, FinetuneConfig, FitConfig
from tlfeat.errors import TlfeatError, first_line, printable
from tlfeat.records import Method, RunRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    model: str  # "resnet18", "timm:resnet18" or either with ":untrained"
    data: str
    method: str
    seed: int
    subset_seed: int = 0
    layer: str | None = None
    shots: int | None = None  # k-shot: training images per class
    draw: int = 0  # which draw of the k-shot images
    shown: str = ""  # the dataset as tables show it (distinct for distinct datasets)

    @property
    def backbone(self) -> str:
        return backbones.split_variant(self.model)[0]

    @property
    def untrained(self) -> bool:
        return backbones.split_variant(self.model)[1]

    @property
    def parsed(self) -> Method:
        return Method.parse(self.method)

    def label(self) -> str:
        layer = f" [{self.layer}]" if self.layer else ""
        subset = f", subset {self.subset_seed}" if self.subset_seed else ""
        shots = f", {self.shots}-shot draw {self.draw}" if self.shots is not None else ""
        shown = self.shown or datasets.short_name(self.data)
        return f"{self.method} {self.model}/{shown}{layer} seed {self.seed}{subset}{shots}"


def check(cfg: CompareConfig) -> None:
    """Every unknown name in every list, reported at once, before anything runs."""
    from tlfeat import extraction

    problems: list[str] = []
    for model in cfg.models:
        name, _ = backbones.split_variant(model)
        try:
            backbones.check_model(name)
        except TlfeatError as exc:
            problems.append(_suffix_problem(name) or str(exc).split(" Run ")[0])
    for data in cfg.datas:
        try:
            dataset = datasets.canonical(data)
        except TlfeatError as exc:
            problems.append(str(exc))
            continue
        for option, folder in (("--out", cfg.out), ("--results-dir", cfg.runs_dir), ("--cache-dir", cfg.cache_dir)):
            try:
                extraction.refuse_inside(dataset, Path(folder), option)
            except TlfeatError as exc:
                problems.append(str(exc))
    for method in cfg.methods:
        try:
            parsed = Method.parse(method)
            if parsed.chain is not None:
                datasets.canonical(parsed.chain)
        except TlfeatError as exc:
            problems.append(str(exc))
    names = list(dict.fromkeys(backbones.split_variant(m)[0] for m in cfg.models))
    for layer in cfg.layers:  # a layer only some models have is swept for those (`skipped_layers`)
        missing = [_layer_problem(name, layer) for name in names]
        if missing and all(missing):
            problems += [str(m) for m in missing]
    if not problems:
        problems += _too_many_frozen_blocks(cfg)
    if not cfg.models or not cfg.datas or not cfg.methods:
        problems.append("--models, --data and --methods each need at least one name")
    problems = list(dict.fromkeys(problems))  # resnet18 and resnet18:untrained share their problems
    if problems:
        raise TlfeatError(f"{len(problems)} problem(s), nothing was run: " + " | ".join(problems))


@functools.cache
def _layer_problem(name: str, layer: str) -> str | None:
    """Why model `name` cannot give `layer` (one layer or parts joined by +), or None."""
    parts = [p for p in layer.split("+") if p != backbones.PENULTIMATE]
    try:
        if parts:
            backbones.check_layers(name, parts)
    except TlfeatError as exc:
        return str(exc).split(" Run ")[0]
    return None


def model_layers(cfg: CompareConfig, model: str) -> list[str]:
    """The layers of `--layers` that `model` has (the others are swept for the models that have them)."""
    name = backbones.split_variant(model)[0]
    return [layer for layer in cfg.layers if _layer_problem(name, layer) is None]


def skipped_layers(cfg: CompareConfig) -> list[str]:
    """One line per model that lacks layers of `--layers` that other models have."""
    lines = []
    for name in dict.fromkeys(backbones.split_variant(m)[0] for m in cfg.models):
        lacks = [layer for layer in cfg.layers if _layer_problem(name, layer) is not None]
        if lacks:
            lines.append(f"note: {name} has no layer {', '.join(lacks)}: swept for the other models only")
    return lines


def _suffix_problem(name: str) -> str | None:
    """`resnet18:frozen`: a known model with a suffix other than `:untrained`."""
    head, sep, suffix = name.rpartition(":")
    if not sep or not head:
        return None
    try:
        backbones.check_model(head)
    except TlfeatError:
        return None
    return f"model spec {name!r}: the only suffix is ':{backbones.base.UNTRAINED}', not ':{suffix}'"


def _too_many_frozen_blocks(cfg: CompareConfig) -> list[str]:
    """`finetune:freeze:k` with k above a model's number of blocks."""
    from tlfeat import strategies

    problems = []
    frozen = [
        m.strategy for m in map(Method.parse, cfg.methods) if m.strategy is not None and m.strategy.kind == "freeze"
    ]
    for name in dict.fromkeys(backbones.split_variant(model)[0] for model in cfg.models):
        for strategy in frozen:
            try:
                strategies.check_blocks(name, strategy)
            except TlfeatError as exc:
                problems.append(str(exc))
    return problems


def cells(cfg: CompareConfig) -> list[Cell]:
    shown = datasets.display_names(datasets.canonical(d) for d in cfg.datas)
    out = []
    for data in cfg.datas:
        shown_as = shown[datasets.canonical(data)]
        scratch_done: set[str] = set()
        for model in cfg.models:
            for method in dict.fromkeys(map(Method.parse, cfg.methods)):  # logreg,logreg is one method
                name = model
                if method.is_scratch:  # random weights anyway: MODEL and MODEL:untrained are one run
                    name = backbones.split_variant(model)[0]
                    if name in scratch_done:
                        continue
                    scratch_done.add(name)
                out += [
                    Cell(name, data, str(method), cfg.seed + r, _subset(cfg, r), shown=shown_as)
                    for r in range(cfg.repeats)
                ]
            frozen = [m for m in cfg.methods if Method.parse(m).is_frozen]
            for layer in model_layers(cfg, model):
                if layer == backbones.PENULTIMATE or not frozen:
                    continue
                for r in range(cfg.repeats):
                    first = str(Method.parse(frozen[0]))
                    out.append(Cell(model, data, first, cfg.seed + r, _subset(cfg, r), layer, shown=shown_as))
            out += shot_cells(cfg, model, data, shown_as)
    return out


def shot_cells(cfg: CompareConfig, model: str, data: str, shown: str = "") -> list[Cell]:
    """k-shot cells: each frozen classifier (protocols aside: they carve a validation split) on N images
    per class, `--shot-draws` draws each; the whole training set is the method's ordinary cell."""
    methods = [m for m in dict.fromkeys(map(Method.parse, cfg.methods)) if m.is_frozen and m.protocol is None]
    return [
        Cell(model, data, str(m), cfg.seed, _subset(cfg, 0), shots=n, draw=d, shown=shown)
        for n in cfg.shots
        for m in methods
        for d in range(cfg.shot_draws)
    ]


def _subset(cfg: CompareConfig, repeat: int) -> int:
    return cfg.seed + repeat if cfg.resample and cfg.limit is not None else 0


def extract_config(cfg: CompareConfig, cell: Cell) -> ExtractConfig:
    """One pass over the images gives every layer of the sweep: the cell asks for all of them."""
    sweep = [layer for layer in model_layers(cfg, cell.model) if layer != backbones.PENULTIMATE]
    layers = ",".join([backbones.PENULTIMATE, *sweep]) if sweep else None
    return ExtractConfig(
        model=cell.backbone,
        untrained=cell.untrained,
        data=cell.data,
        splits=("train", "test"),
        layer=layers,
        image_size=cfg.image_size,
        limit=cfg.limit,
        test_limit=cfg.test_limit,
        subset_seed=cell.subset_seed,
        label_field=cfg.label_field,
        workers=cfg.workers,
        cache_dir=cfg.cache_dir,
        data_dir=cfg.data_dir,
        progress=cfg.progress,
        on_error=cfg.on_error,
    )


def fit_config(cfg: CompareConfig, cell: Cell) -> FitConfig:
    method = cell.parsed
    spec = method.spec
    return FitConfig(
        clf=method.clf,
        kernel=method.kernel,
        protocol=method.protocol,
        C=cfg.C if spec is not None and spec.has_C and method.protocol is None else None,
        shots=cell.shots,
        shot_draw=cell.draw,
        model=cell.backbone,
        data=cell.data,
        layer=backbones.layer_name(cell.layer),
        seed=cell.seed,
        cache_dir=cfg.cache_dir,
        results_dir=cfg.runs_dir,
    )


def finetune_config(cfg: CompareConfig, cell: Cell) -> FinetuneConfig:
    scratch = cell.parsed.is_scratch
    return FinetuneConfig(
        model=cell.backbone,
        untrained=cell.untrained,
        data=cell.data,
        strategy=str(cell.parsed.strategy) if cell.parsed.strategy else "full",
        epochs=cfg.scratch_epochs if scratch else cfg.epochs,
        lr=None if scratch else cfg.lr,
        optimizer=None if scratch else cfg.optimizer,
        batch_size=cfg.batch_size,
        augment=cfg.augment,
        image_size=cfg.image_size,
        limit=cfg.limit,
        test_limit=cfg.test_limit,
        subset_seed=cell.subset_seed,
        label_field=cfg.label_field,
        seed=cell.seed,
        workers=cfg.workers,
        data_dir=cfg.data_dir,
        results_dir=cfg.runs_dir,
        progress=cfg.progress,
    )


def _cell_targets(cfg: CompareConfig, cell: Cell) -> list[Any]:
    """The cache files a frozen cell fits on: its layer's, or each part's of a concatenation a+b."""
    from tlfeat import extraction

    parts = backbones.layer_name(cell.layer).split("+")
    return [t for t in extraction.plan(extract_config(cfg, cell)) if backbones.layer_name(t.layer) in parts]


def planned(cfg: CompareConfig, cell: Cell) -> str:
    """'reuse' when this cell's result is saved, else what will run (nothing is loaded to find out)."""
    from tlfeat import chain, finetune, fitting

    if cell.parsed.is_chain:
        return chain.planned(cfg, cell)
    if cell.parsed.is_finetune:
        folder, _ = finetune.run_dir(finetune_config(cfg, cell))
        return "reuse" if (folder / "record.json").is_file() else "fine-tune"
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for target in _cell_targets(cfg, cell):
        try:
            found.setdefault(target.split, {})[backbones.layer_name(target.layer)] = cache.check(
                target.path, verify=False
            )
        except (TlfeatError, OSError):
            return "extract + fit"
        if _stale(target.path, target.path.stat().st_mtime_ns, cfg.data_dir):
            return "update + fit"
    layer = backbones.layer_name(cell.layer)
    attrs = {
        split: by_layer[layer]
        if layer in by_layer
        else concat.combined_attrs(layer, [by_layer[p] for p in layer.split("+")])
        for split, by_layer in found.items()
    }
    path = fitting.record_path(
        fit_config(cfg, cell), attrs["train"], str(attrs["train"].get("sha256")), str(attrs["test"].get("sha256"))
    )
    return "reuse" if path.is_file() else "fit"


@functools.lru_cache(maxsize=256)
def _stale(path: Path, mtime_ns: int, data_dir: Path | None) -> bool:
    """Have the images behind this cache file changed (cells sharing a file list its images once)?"""
    from tlfeat import freshness

    entry = catalog.Entry(path, cache.read_attrs(path), "ok")
    return freshness.status(entry, data_dir).state == "stale"


def run_cell(cfg: CompareConfig, cell: Cell) -> RunRecord:
    from tlfeat import chain, extraction, finetune, fitting

    if cell.parsed.is_chain:
        return chain.run(cfg, cell)
    if cell.parsed.is_finetune:
        return finetune.finetune_one(finetune_config(cfg, cell)).record
    layer = backbones.layer_name(cell.layer)
    extracted = extraction.extract(extract_config(cfg, cell))
    pairs = []
    for part in layer.split("+"):
        found = [fs for fs in extracted if str(fs.meta.get("layer")) == part]
        train, test = (next(fs for fs in found if fs.split == s) for s in ("train", "test"))
        assert train.path is not None and test.path is not None
        pairs.append(
            fitting.Pair(catalog.Entry(train.path, train.meta, "ok"), catalog.Entry(test.path, test.meta, "ok"))
        )
    pair = pairs[0] if len(pairs) == 1 else fitting.concatenated(layer, pairs)
    return fitting.fit_pair(fit_config(cfg, cell), pair).record


def compare(cfg: CompareConfig, echo: Any = print) -> Path:
    """Run the comparison (only what is missing), then write the report; returns the report folder."""
    from tqdm.auto import tqdm

    from tlfeat.report import build, claim

    check(cfg)
    for line in skipped_layers(cfg):
        echo(line)
    out = Path(cfg.out)
    claim(out)
    same_comparison(cfg, out)
    runs_dir = Path(os.path.realpath(cfg.runs_dir))
    plan = [(cell, planned(cfg, cell)) for cell in cells(cfg)]
    counts: dict[str, int] = {}
    for _, what in plan:
        counts[what] = counts.get(what, 0) + 1
    echo(f"plan: {len(plan)} cells: " + ", ".join(f"{n} {w}" for w, n in sorted(counts.items())))
    for cell, what in plan:
        echo(f"  {what:>13}  {cell.label()}")
    meta: dict[str, Any] = {
        "config": _jsonable(asdict(cfg)),
        "command": cfg.command,
        "environment": environment(),
        "started": _now(),
        "results_dir": str(runs_dir),  # the records below (relative to this folder) lie in it or in this folder
        "results_dir_relative": os.path.relpath(runs_dir, os.path.realpath(out)),  # a project moved as a whole
        "records": [],  # the runs done so far: a comparison stopped midway still has a report of those
    }
    fsio.atomic_write(out / "compare.json", json.dumps(meta, indent=2))
    failures: dict[str, str] = {}
    done: list[str] = []
    bar = tqdm(
        total=len(plan),
        desc="compare",
        unit="cell",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not cfg.progress,
        position=0,
    )
    for cell, what in plan:
        bar.set_postfix_str(cell.label()[:60])
        t0 = time.perf_counter()
        try:
            record = run_cell(cfg, cell)
            if record.path is not None:
                done.append(os.path.relpath(os.path.realpath(record.path), os.path.realpath(out)))
                fsio.atomic_write(out / "compare.json", json.dumps({**meta, "records": done}, indent=2))
        except Exception as exc:  # one failed cell (a missing weights file, a bug) never stops the others
            failures[cell.label()] = f"{type(exc).__name__}: {first_line(exc)}"
            log.warning("cell failed: %s: %s", cell.label(), exc)
        log.info("%s (%s) in %.1fs", cell.label(), what, time.perf_counter() - t0)
        bar.update(1)
    bar.close()
    if cfg.analyses:
        failures.update(_analyses(cfg, out, echo))
    fsio.atomic_write(
        out / "failures.json", json.dumps({"failures": failures, "cells": [asdict(c) for c, _ in plan]}, indent=2)
    )
    meta["records"], meta["finished"] = done, _now()
    fsio.atomic_write(out / "compare.json", json.dumps(meta, indent=2))
    build(out)
    if failures:
        echo(
            f"{len(failures)} cell(s) failed (shown in the report): fix what each error says, then run the same "
            "command again to fill them in:"
        )
        for label, error in failures.items():
            echo(f"  FAILED {label}: {error}")
    return out


def _analyses(cfg: CompareConfig, out: Path, echo: Any) -> dict[str, str]:
    """Run the representation analyses the report shows; a failed one is listed, never fatal."""
    from tlfeat.analysis import study

    failures: dict[str, str] = {}
    for name, error in study.for_compare(cfg, out).items():
        failures[f"analysis {name}"] = error
        log.warning("analysis %s failed: %s", name, error)
    if failures:
        echo(f"{len(failures)} analysis/analyses failed (listed in the report)")
    return failures


def environment() -> dict[str, Any]:
    """The machine and library versions, read without importing torch."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    from tlfeat import __version__

    return {
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "torchvision", "onnxruntime", "scikit-learn", "numpy")},
        "tlfeat": __version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# What a rerun into the same --out may add to (the report then covers the earlier cells and the new);
# any other difference makes it another comparison, whose report would silently replace the one there.
GROWS = ("models", "datas", "methods", "layers", "shots")


def same_comparison(cfg: CompareConfig, out: Path) -> None:
    """Refuse to replace the report in `out` with that of a different comparison, unless --replace."""
    from tlfeat import constraints

    try:
        earlier = json.loads((out / "compare.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # no comparison there yet, or none that can be read: nothing to keep
    if cfg.replace or not isinstance(earlier, dict):
        return
    now = _jsonable(asdict(cfg))
    for f in fields(cfg):
        if constraints.role(f) != "key" or f.name not in earlier or earlier[f.name] == now[f.name]:
            continue
        before, after = earlier[f.name], now[f.name]
        if f.name in GROWS and isinstance(before, list) and set(map(str, before)) <= set(map(str, after)):
            continue
        shown = {name: printable(json.dumps(v))[:80] for name, v in (("there", before), ("here", after))}
        raise TlfeatError(
            f"--out {printable(str(out))} holds the report of another comparison ({constraints.option_name(f)} "
            f"{shown['there']} there, {shown['here']} here); choose another --out, or add --replace to replace "
            "that report (its runs stay in the result store)"
        )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["tlfeat", *sys.argv[1:]])


__all__ = ["Cell", "CompareConfig", "check", "compare", "planned", "run_cell"]
