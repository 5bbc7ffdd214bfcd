"""Multi-stage transfer, `compare --methods chain:DATASET:STRATEGY`: the model's starting weights
(pretrained, or random for MODEL:untrained) fine-tuned on an intermediate dataset first, then on the
target, with the same strategy and options at both stages.

Stage 1 does not depend on the target, so its run (keyed like any fine-tune) is made once and reused
by every target and repeat with the same seed. Stage 2 starts from stage 1's `best.pt` (a new head
for the target's classes). Both stages are ordinary fine-tuning runs, saved under
`<results>/chain-stages/` (outside the folders a report lists, so they do not appear as runs of
their own); the chain's record is stage 2's, named `chain:...`, with both stages' times in
`details.stages` and their sum as its training time, and stage 1's starting weights as its own
(`weights_id`, `pretrained`): stage 2 starts from a file, but the chain starts where stage 1 did.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tlfeat import datasets, finetune, fsio
from tlfeat.records import CHAINS, RunRecord, load_record

if TYPE_CHECKING:
    from tlfeat.compare import Cell
    from tlfeat.config import CompareConfig, FinetuneConfig

STAGES = "chain-stages"


def first_stage(cfg: CompareConfig, cell: Cell) -> FinetuneConfig:
    from tlfeat.compare import finetune_config

    method = cell.parsed
    assert method.chain is not None
    return replace(finetune_config(cfg, cell), data=method.chain, results_dir=Path(cfg.runs_dir) / STAGES)


def second_stage(cfg: CompareConfig, cell: Cell, start: Path) -> FinetuneConfig:
    from tlfeat.compare import finetune_config

    # From stage 1's weights, also for MODEL:untrained (whose stage 1 started from random weights).
    return replace(
        finetune_config(cfg, cell), untrained=False, weights_file=start, results_dir=Path(cfg.runs_dir) / STAGES
    )


def record_path(cfg: CompareConfig, cell: Cell, first: Path, second: Path) -> Path:
    """The chain's record: named by its target, method and seed, keyed by both stages' run folders."""
    key = hashlib.sha256(f"{first.name}\0{second.name}".encode()).hexdigest()[:16]
    slug = datasets.dataset_slug(datasets.canonical(cell.data))
    name = f"{cell.backbone}__{slug}__{cell.parsed.slug}__seed{cell.seed}__{key}"
    return Path(cfg.runs_dir) / CHAINS / name / "record.json"


def planned(cfg: CompareConfig, cell: Cell) -> str:
    """What a chain cell will do, without training anything."""
    first, _ = finetune.run_dir(first_stage(cfg, cell))
    if not (first / "record.json").is_file():
        return "chain: 2 stages"
    second, _ = finetune.run_dir(second_stage(cfg, cell, first / "best.pt"))
    if not (second / "record.json").is_file():
        return "chain: stage 2"
    return "reuse" if record_path(cfg, cell, first, second).is_file() else "chain: record"


def run(cfg: CompareConfig, cell: Cell) -> RunRecord:
    """Both stages (stage 1 reused where it exists), then the chain's record."""
    stage1 = finetune.finetune_one(first_stage(cfg, cell))
    stage2 = finetune.finetune_one(second_stage(cfg, cell, stage1.path.parent / "best.pt"))
    path = record_path(cfg, cell, stage1.path.parent, stage2.path.parent)
    saved = load_record(path)
    if saved is not None and _start(saved) == _start(stage1.record):
        return saved  # (a record written before the chain carried its start is made again, below)
    record = RunRecord.from_dict(json.loads(stage2.record.to_json()))
    record.method = str(cell.parsed)
    record.weights_id, record.pretrained = _start(stage1.record)
    record.details["stage2_weights_id"] = stage2.record.weights_id
    record.timings.train_seconds = stage1.record.timings.train_seconds + stage2.record.timings.train_seconds
    record.timings.finish()
    record.details["stages"] = [
        _stage(stage1.record, stage1.path, "intermediate", stage1.reused),
        _stage(stage2.record, stage2.path, "target", stage2.reused),
    ]
    plot = stage2.path.parent / "history.png"
    if plot.is_file():  # the report shows each fine-tuning run's curves: the chain's are stage 2's
        with fsio.atomic_path(path.parent / "history.png") as tmp:
            shutil.copyfile(plot, tmp)
    record.save(path)
    return record


def _start(r: RunRecord) -> tuple[str, bool]:
    """The weights a run started from."""
    return r.weights_id, r.pretrained


def _stage(r: RunRecord, path: Path, role: str, reused: bool) -> dict[str, object]:
    return {
        "role": role,
        "dataset": r.dataset,
        "n_train": r.n_train,
        "epochs": len(r.details.get("history") or []),
        "best_epoch": r.details.get("best_epoch"),
        "train_seconds": r.timings.train_seconds,
        "test_accuracy": r.metrics.get("accuracy"),
        "record": str(path),
        "reused": reused,
    }
