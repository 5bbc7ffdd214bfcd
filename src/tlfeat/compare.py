"""Comparison runs: models x datasets x methods x repeats, reusing every saved result.

`compare` plans the matrix (what runs, what is reused), runs what is missing (a failed cell is
recorded and the rest go on), and writes the report. `report` rebuilds the report from the saved
records alone: no feature, fit or fine-tune is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tlfeat import backbones, cache, classifiers, datasets, strategies
from tlfeat.config import ExtractConfig
from tlfeat.errors import TlfeatError

log = logging.getLogger(__name__)

FROZEN = ("logreg", "svm", "svm-rbf", "linear")


@dataclass(frozen=True)
class CompareConfig:
    models: tuple[str, ...]
    datas: tuple[str, ...]
    methods: tuple[str, ...] = ("logreg", "finetune:full")
    repeats: int = 1
    out: Path = Path("reports/run")
    layers: tuple[str, ...] = ()  # a --layers sweep: extra feature layers for the frozen methods
    epochs: int = 25
    image_size: int | None = None
    limit: int | None = None
    cache_dir: Path | None = None
    data_dir: Path | None = None
    workers: int | None = None
    seed: int = 0
    on_error: str = "fail"  # unreadable images while extracting: "fail" or "skip" (recorded, counted in the report)
    command: str = field(default="", compare=False)


@dataclass(frozen=True)
class Cell:
    model: str
    data: str
    method: str
    seed: int
    layer: str | None = None

    @property
    def backbone(self) -> str:
        return self.model.split(":", 1)[0]

    @property
    def untrained(self) -> bool:
        return self.model.endswith(":untrained")

    def label(self) -> str:
        layer = f" [{self.layer}]" if self.layer else ""
        return f"{self.method} {self.model}/{Path(self.data).name}{layer} seed {self.seed}"


def check(cfg: CompareConfig) -> None:
    """Every unknown name in every list, reported at once, before anything runs."""
    problems: list[str] = []
    for model in cfg.models:
        name, _, suffix = model.partition(":")
        if suffix not in ("", "untrained"):
            problems.append(f"model spec {model!r}: the only suffix is ':untrained'")
        try:
            backbones.check_model(name)
        except TlfeatError as exc:
            problems.append(str(exc).split(" Run ")[0])
    for data in cfg.datas:
        try:
            datasets.canonical(data)
        except TlfeatError as exc:
            problems.append(str(exc))
    for method in cfg.methods:
        try:
            parse_method(method)
        except TlfeatError as exc:
            problems.append(str(exc))
    for layer in cfg.layers:
        for model in cfg.models:
            try:
                if layer != "penultimate":
                    backbones.feature_dim(model.split(":", 1)[0], layer)
            except TlfeatError as exc:
                problems.append(str(exc).split(" Run ")[0])
    if cfg.repeats < 1:
        problems.append(f"--repeats must be at least 1, got {cfg.repeats}")
    if cfg.limit is not None and cfg.limit <= 0:
        problems.append(f"--limit must be positive, got {cfg.limit}")
    if not cfg.models or not cfg.datas or not cfg.methods:
        problems.append("--models, --data and --methods each need at least one name")
    if problems:
        raise TlfeatError(f"{len(problems)} problem(s), nothing was run: " + " | ".join(problems))


def parse_method(method: str) -> tuple[str, str]:
    """('frozen', clf) or ('finetune', strategy)."""
    if method in FROZEN:
        return "frozen", method
    if method == "scratch":
        return "finetune", "scratch"
    if method.startswith("finetune:"):
        return "finetune", str(strategies.parse(method.split(":", 1)[1]))
    valid = ", ".join(
        FROZEN + ("finetune:full", "finetune:head", "finetune:freeze:K", "finetune:discriminative", "scratch")
    )
    raise TlfeatError(f"unknown method {method!r}; valid: {valid}")


def cells(cfg: CompareConfig) -> list[Cell]:
    out = []
    for data in cfg.datas:
        for model in cfg.models:
            for method in cfg.methods:
                for r in range(cfg.repeats):
                    out.append(Cell(model, data, method, cfg.seed + r))
            frozen = [m for m in cfg.methods if parse_method(m)[0] == "frozen"]
            for layer in cfg.layers:
                if layer == "penultimate" or not frozen:
                    continue
                for r in range(cfg.repeats):
                    out.append(Cell(model, data, frozen[0], cfg.seed + r, layer))
    return out


def _extract_cfg(cfg: CompareConfig, cell: Cell) -> ExtractConfig:
    return ExtractConfig(
        model=cell.backbone,
        untrained=cell.untrained,
        data=cell.data,
        layer=cell.layer,
        image_size=cfg.image_size,
        limit=cfg.limit,
        workers=cfg.workers,
        cache_dir=cfg.cache_dir,
        data_dir=cfg.data_dir,
        progress=False,
        on_error=cfg.on_error,
    )


def _fit_cfg(cfg: CompareConfig, cell: Cell):  # type: ignore[no-untyped-def]
    from tlfeat.fitting import FitConfig

    clf, kernel = (cell.method.split("-") + ["linear"])[:2]
    return FitConfig(
        clf=clf,
        kernel=kernel,
        model=cell.backbone,
        data=cell.data,
        layer=cell.layer or "penultimate",
        seed=cell.seed,
        cache_dir=cfg.cache_dir,
        results_dir=cfg.out / "results",
    )


def _finetune_cfg(cfg: CompareConfig, cell: Cell):  # type: ignore[no-untyped-def]
    from tlfeat.finetune import FinetuneConfig

    return FinetuneConfig(
        model=cell.backbone,
        untrained=cell.untrained,
        data=cell.data,
        strategy=parse_method(cell.method)[1],
        epochs=cfg.epochs,
        image_size=cfg.image_size,
        limit=cfg.limit,
        seed=cell.seed,
        workers=cfg.workers,
        data_dir=cfg.data_dir,
        results_dir=cfg.out / "results",
        progress=False,
    )


def planned(cfg: CompareConfig, cell: Cell) -> str:
    """'reuse' when this cell's result is saved, else what will run."""
    from tlfeat import extraction, finetune, fitting

    if parse_method(cell.method)[0] == "finetune":
        folder, _ = finetune.run_dir(_finetune_cfg(cfg, cell))
        return "reuse" if (folder / "record.json").is_file() else "fine-tune"
    ecfg = replace(_extract_cfg(cfg, cell), splits=("train", "test"))
    found = [
        next((c for c, _ in extraction.candidates(ecfg, path, fields) if c.is_file()), None)
        for _, path, fields in extraction.plan(ecfg)
    ]
    if None in found:
        return "extract + fit"
    train, test = (cache.read(path) for path in found if path is not None)
    fcfg = _fit_cfg(cfg, cell)
    key = fitting.config_key(fcfg, train, test)
    hits = list((cfg.out / "results" / "fits").glob(f"*__{key}/record.json"))
    return "reuse" if hits else "fit"


def run_cell(cfg: CompareConfig, cell: Cell) -> dict[str, Any]:
    from tlfeat import extraction, finetune, fitting

    if parse_method(cell.method)[0] == "finetune":
        return finetune.finetune_one(_finetune_cfg(cfg, cell)).record
    ecfg = replace(_extract_cfg(cfg, cell), splits=("train", "test"))
    train, test = extraction.extract(ecfg)
    return fitting.fit_pair(_fit_cfg(cfg, cell), train, test).record


def compare(cfg: CompareConfig, echo: Any = print) -> Path:
    """Run the comparison (only what is missing), then write the report; returns the report folder."""
    from tqdm.auto import tqdm

    check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = cells(cfg)
    plan = [(cell, planned(cfg, cell)) for cell in todo]
    counts: dict[str, int] = {}
    for _, what in plan:
        counts[what] = counts.get(what, 0) + 1
    echo(f"plan: {len(plan)} cells: " + ", ".join(f"{n} {w}" for w, n in sorted(counts.items())))
    for cell, what in plan:
        echo(f"  {what:>13}  {cell.label()}")
    _write_json(
        out / "compare.json",
        {"config": _jsonable(asdict(cfg)), "command": cfg.command, "environment": environment(), "started": _now()},
    )
    failures: dict[str, str] = {}
    bar = tqdm(total=len(plan), desc="compare", unit="cell", dynamic_ncols=True, file=sys.stderr)
    for cell, what in plan:
        bar.set_postfix_str(cell.label()[:60])
        t0 = time.perf_counter()
        try:
            run_cell(cfg, cell)
        except (TlfeatError, RuntimeError, ValueError, OSError) as exc:
            failures[cell.label()] = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            )
            log.warning("cell failed: %s: %s", cell.label(), exc)
        log.info("%s (%s) in %.1fs", cell.label(), what, time.perf_counter() - t0)
        bar.update(1)
    bar.close()
    _write_json(out / "failures.json", {"failures": failures, "cells": [asdict(c) for c in todo]})
    from tlfeat.report import build

    build(out)
    if failures:
        echo(f"{len(failures)} cell(s) failed (shown in the report; run the same command again to fill them in):")
        for label, error in failures.items():
            echo(f"  FAILED {label}: {error}")
    return out


def environment() -> dict[str, Any]:
    import numpy as np
    import sklearn
    import torch
    import torchvision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "tlfeat": _version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def _version() -> str:
    from tlfeat import __version__

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["tlfeat", *sys.argv[1:]])


__all__ = ["CompareConfig", "check", "classifiers", "compare", "parse_method"]
