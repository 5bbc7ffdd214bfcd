"""The comparison path: the same backbone trained end to end on images, with a new head.

Protocol: a stratified 15% of the training split is held out for validation (the dataset's own
`val` split when it has both val and test); the weights of the best validation epoch are kept and
evaluated once on the whole test split (or `--test-limit` of it), with the same metrics and record
format as `tlfeat fit`. From-scratch runs (`scratch`) use their own recipe: momentum SGD with a
warm-up and a cosine decay, more epochs, and BatchNorm statistics re-estimated before evaluation.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import (
    __version__,
    allocator,
    backbones,
    cache,
    constraints,
    datasets,
    fsio,
    progress,
    strategies,
    training,
    weights,
)
from tlfeat.config import FinetuneConfig
from tlfeat.errors import TlfeatError
from tlfeat.records import FINETUNES, Method, RunRecord, Timings, load_now, load_record
from tlfeat.weights import build_with_weights, resolve

log = logging.getLogger(__name__)

VAL_FRACTION = 0.15


@dataclass
class FinetuneResult:
    record: RunRecord
    path: Path
    reused: bool = False


@dataclass
class Splits:
    train: datasets.ImageSplit
    val: datasets.ImageSplit
    test: datasets.ImageSplit
    how: str


def load_splits(cfg: FinetuneConfig) -> Splits:
    available = datasets.splits(cfg.data)
    if "train" not in available or "test" not in available:
        raise TlfeatError(f"{cfg.data} needs train and test splits; it has {', '.join(available)}")

    def load(split: str) -> datasets.ImageSplit:
        return datasets.load_split(
            cfg.data,
            split,
            cfg.data_dir,
            cfg.split_limit(split),
            subset_seed=cfg.subset_seed,
            label_field=cfg.label_field,
        )

    train, test = load("train"), load("test")
    if len(np.unique(train.labels)) < 2:
        raise TlfeatError(f"{cfg.data} has one class only in its training split; fine-tuning needs 2 or more")
    if "val" in available:
        return Splits(train, load("val"), test, "the dataset's val split")
    fit_idx, val_idx = datasets.stratified_split(train.labels, VAL_FRACTION, seed=datasets.SPLIT_SEED, ids=train.ids)
    if len(val_idx) == 0:
        raise TlfeatError(f"{cfg.data}: too few training images to hold out a validation set")
    how = f"stratified {VAL_FRACTION:.0%} of train (seed {datasets.SPLIT_SEED})"
    return Splits(train.subset(fit_idx), train.subset(val_idx), test, how)


# Key fields whose value here is what every run did before the field existed: left out of the key.
KEY_NEUTRAL = {"precision": "fp32", "augment_on": "cpu"}


def weights_id(cfg: FinetuneConfig) -> str:
    untrained = strategies.parse(cfg.strategy).kind == "scratch" or cfg.untrained
    return weights.weights_id(cfg.model, cfg.weights_id, cfg.weights_file, untrained, cfg.seed)


def config_key(cfg: FinetuneConfig, wid: str) -> str:
    """The run's key: every `key` field (recipe defaults resolved), the data and weights canonical, and
    the images as they are now (their listing's signature), so a changed dataset is trained on again."""
    fields = {name: getattr(cfg, name) for name in constraints.key_fields(cfg)}
    fields.update(data=datasets.canonical(cfg.data), weights_file=None, weights=wid, images=images_signature(cfg))
    fields["augment_on"] = cfg.resolved_augment_on()
    for name, value in KEY_NEUTRAL.items():  # runs made before these options keep their keys
        if fields[name] == value:
            del fields[name]
    return cache.cache_key({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})


def images_signature(cfg: FinetuneConfig) -> str:
    import hashlib

    splits = load_splits(cfg)
    digest = hashlib.sha256()
    for split in (splits.train, splits.val, splits.test):
        digest.update(split.signature().encode())
    return digest.hexdigest()


def run_dir(cfg: FinetuneConfig) -> tuple[Path, str]:
    """The run's folder (where compare looks for its record) and its weights id."""
    wid = weights_id(cfg)
    slug = datasets.dataset_slug(datasets.canonical(cfg.data))
    method = Method.finetune(cfg.strategy).slug
    name = backbones.slug(cfg.model)
    return Path(cfg.results_dir) / FINETUNES / f"{name}__{slug}__{method}__seed{cfg.seed}__{config_key(cfg, wid)}", wid


def validate(cfg: FinetuneConfig) -> None:
    backbones.resolve(cfg.model)
    strategies.check_blocks(cfg.model, strategies.parse(cfg.strategy))
    from tlfeat.extraction import refuse_inside

    refuse_inside(datasets.canonical(cfg.data), Path(cfg.results_dir), "--results-dir")  # its plots are PNGs


def finetune(cfg: FinetuneConfig, repeats: int = 1) -> list[FinetuneResult]:
    """Run `repeats` seeds (cfg.seed, cfg.seed + 1, ...) of one configuration."""
    validate(cfg)
    if repeats < 1:
        raise TlfeatError(f"--repeats must be at least 1, got {repeats}")
    return [finetune_one(replace(cfg, seed=cfg.seed + r)) for r in range(repeats)]


def finetune_one(cfg: FinetuneConfig) -> FinetuneResult:
    validate(cfg)
    out_dir, wid = run_dir(cfg)
    record_path = out_dir / "record.json"
    if (record := load_record(record_path)) is not None:
        return FinetuneResult(record, record_path, reused=True)
    with fsio.lock(out_dir):  # a second process on the same run waits, then reuses its record
        if (record := load_record(record_path)) is not None:
            return FinetuneResult(record, record_path, reused=True)
        fsio.sweep_temps(out_dir)
        return FinetuneResult(_train(cfg, out_dir, wid), record_path)


def _build(cfg: FinetuneConfig, strategy: strategies.Strategy, n_classes: int) -> tuple[Any, Any]:
    resolved = resolve(
        cfg.model,
        cfg.weights_id,
        cfg.weights_file,
        untrained=strategy.kind == "scratch" or cfg.untrained,
        seed=cfg.seed,
    )
    model = build_with_weights(cfg.model, resolved)
    strategies.replace_head(model, cfg.model, n_classes, seed=cfg.seed)
    return model, resolved


@dataclass
class Run:
    """Everything one fine-tuning run is set up with before its first epoch."""

    cfg: FinetuneConfig
    out_dir: Path
    wid: str
    strategy: strategies.Strategy
    splits: Splits
    model: Any
    resolved: Any
    opt: Any
    sched: Any
    prep: Any
    augment: str
    workers: int
    setup: dict[str, Any]
    load: tuple[Any, Any]

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.out_dir / "best.pt"

    def batches(self, split: datasets.ImageSplit, train_epoch: int | None = None) -> Any:
        """Training batches of one epoch (augmented, shuffled by seed and epoch), or evaluation batches.

        With `--augment-on device` the workers send uint8 images and the crops, flips and
        normalisation happen on the device (`training.OnDevice`).
        """
        cfg, seed = self.cfg, None if train_epoch is None else self.cfg.seed * 1000 + train_epoch
        size = max(cfg.batch_size, 64) if seed is None else cfg.batch_size
        if cfg.resolved_augment_on() == "device":
            pixels = training.Pixels(self.prep, self.prep.crop_size if seed is None else self.prep.resize_size)
            pin = cfg.device.startswith("cuda")
            batches = training.loader(split, pixels, size, self.workers, seed is not None, seed or 0, pin)
            return training.OnDevice(batches, self.prep, self.augment, cfg.device, seed)
        if seed is None:
            return training.loader(split, training.EvalTransform(self.prep), size, self.workers)
        transform = training.train_transform(self.prep, self.augment)
        return training.loader(split, transform, size, self.workers, shuffle=True, seed=seed)


def _prepare(cfg: FinetuneConfig, out_dir: Path, wid: str) -> Run:
    """Data, model with its new head, strategy, optimizer and schedule."""
    import torch

    from tlfeat.engine import default_workers
    from tlfeat.inference import check_device

    if (out_dir / "last.pt").is_file() and not cfg.resume:
        raise TlfeatError(
            f"{out_dir} holds an unfinished run of this configuration; add --resume to continue it (or delete the folder to start over)"
        )
    check_device(cfg.device)
    strategy = strategies.parse(cfg.strategy)
    splits = load_splits(cfg)
    load = load_now()
    allocator.pin_malloc_thresholds()  # a MobileNetV2 training step on CPU: 56-62 -> 81-83 img/s
    torch.manual_seed(cfg.seed)
    model, resolved = _build(cfg, strategy, len(splits.train.class_names))
    # On the device before the optimizer exists: a resumed optimizer's state then follows its parameters.
    model = model.to(cfg.device, memory_format=torch.channels_last)
    opt = training.optimizer(cfg, strategies.apply(model, cfg.model, strategy, cfg.learning_rate))
    steps = max(1, len(splits.train) // cfg.batch_size)
    setup = {
        "param_group_lrs": {g["name"]: g["lr"] for g in opt.param_groups},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "n_blocks": len(strategies.blocks(model, cfg.model)),
    }
    return Run(
        cfg, out_dir, wid, strategy, splits, model, resolved, opt, training.schedule(cfg, opt, steps),
        backbones.preprocessing(cfg.model, cfg.weights_id, cfg.image_size), training.resolve_augment(cfg, splits.train.dataset),
        cfg.workers if cfg.workers is not None else default_workers(cfg.device), setup, load,
    )  # fmt: skip


def _train(cfg: FinetuneConfig, out_dir: Path, wid: str) -> RunRecord:
    """Set up, train epoch by epoch (saving the state at each end), evaluate the best epoch on test."""

    run = _prepare(cfg, out_dir, wid)
    state = training.TrainState()
    if cfg.resume and run.last.is_file():
        state = training.TrainState.load(run.last, run.model, run.opt, run.sched, cfg.model)
    elif cfg.resume:
        stem = out_dir.name.rsplit("__", 1)[0]
        others = [p.parent.name for p in out_dir.parent.glob(f"{stem}__*/last.pt") if p.parent != out_dir]
        if others:
            log.warning(
                "--resume: nothing to resume for this configuration; the unfinished run %s was started on other "
                "images or options (they changed since), so this is a new run and that one is left as it is",
                others[0],
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    val_batches = run.batches(run.splits.val)
    for epoch in range(state.epoch, int(cfg.epochs or 1)):
        entry = _epoch(run, run.batches(run.splits.train, epoch), val_batches, epoch)
        _end_epoch(run, state, entry)
    run.model.load_state_dict(training.load_checkpoint(run.best, cfg.model)["model"])
    test_eval, predict_seconds = training.timed(
        training.evaluate, run.model, run.splits.test, run.batches(run.splits.test), cfg.device, cfg.precision
    )
    record = _record(run, state, test_eval, predict_seconds)
    record.save(out_dir / "record.json")
    if not cfg.keep_last:  # only resuming needs it, and a complete run is reused, never resumed
        run.last.unlink()
    return record


def _end_epoch(run: Run, state: training.TrainState, entry: dict[str, Any]) -> None:
    """Keep the best epoch's weights, save the state to resume from, rewrite the history and its plot."""
    cfg = run.cfg
    state.history.append(entry)
    state.train_seconds += entry["epoch_seconds"]
    state.epoch = entry["epoch"]
    if state.improved(entry["val_accuracy"], entry["val_loss"]):
        state.best_accuracy, state.best_loss, state.best_epoch = (
            entry["val_accuracy"],
            entry["val_loss"],
            entry["epoch"],
        )
        best = {"model": training.cpu_state(run.model), "model_name": cfg.model, "epoch": entry["epoch"]}
        best.update(class_names=list(run.splits.train.class_names), val_accuracy=state.best_accuracy)
        training.save_checkpoint(run.best, best)
    state.save(run.last, run.model, run.opt, run.sched, cfg.model)
    fsio.atomic_write(run.out_dir / "history.json", _json(state.history))
    title = f"{cfg.model} {Method.finetune(cfg.strategy)} on {datasets.short_name(run.splits.train.dataset)}"
    plot_history(state.history, run.out_dir / "history.png", title=title)


def _epoch(run: Run, train_batches: Any, val_batches: Any, epoch: int) -> dict[str, Any]:
    """Train one epoch, re-estimate BatchNorm statistics if the recipe says so, validate."""
    import time

    cfg, model = run.cfg, run.model
    t0 = time.perf_counter()
    lrs = [g["lr"] for g in run.opt.param_groups]
    model.train()
    strategies.freeze_batchnorm_stats(model)
    bar = progress.bar(cfg.progress, len(train_batches.dataset), f"epoch {epoch + 1}/{cfg.epochs}")
    try:
        scores = training.run_epoch(model, train_batches, run.opt, run.sched, cfg.device, bar, cfg.precision)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0
    training.precise_bn(model, train_batches, int(cfg.precise_bn or 0), cfg.device, cfg.precision)
    val_eval = training.evaluate(model, run.splits.val, val_batches, cfg.device, cfg.precision)
    entry = {
        "epoch": epoch + 1,
        **scores,
        "val_loss": val_eval["loss"],
        "val_accuracy": val_eval["metrics"]["accuracy"],
        "val_roc_auc": val_eval["metrics"]["roc_auc"],
        "lr": lrs,
        "train_seconds": train_seconds,
        "epoch_seconds": time.perf_counter() - t0,
    }
    log.info("epoch %d: %s", epoch + 1, entry)
    return entry


PARAMS = (
    "optimizer",
    "lr",
    "schedule",
    "epochs",
    "step_size",
    "gamma",
    "warmup_epochs",
    "weight_decay",
    "batch_size",
    "precise_bn",
    "precision",
)


def _record(run: Run, state: training.TrainState, test_eval: dict[str, Any], predict_seconds: float) -> RunRecord:
    import torch
    import torchvision

    cfg, splits = run.cfg, run.splits
    timings = Timings(
        train_seconds=state.train_seconds,
        predict_seconds=predict_seconds,
        load_start=run.load[0],
        load_end=load_now()[0],
        cpus=run.load[1],
    )
    versions = {
        "tlfeat": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }
    return RunRecord(
        kind="finetune",
        key=run.out_dir.name.rsplit("__", 1)[-1],
        method=str(Method.finetune(cfg.strategy)),
        model=cfg.model,
        dataset=splits.train.dataset,
        layer="-",
        weights_id=run.wid,
        pretrained=run.resolved.pretrained,
        image_size=run.prep.crop_size,
        limit=cfg.limit,
        test_limit=cfg.test_limit,
        subset_seed=cfg.subset_seed,
        seed=cfg.seed,
        n_train=len(splits.train),
        n_test=len(splits.test),
        n_classes=len(splits.train.class_names),
        class_names=list(splits.train.class_names),
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        params={k: getattr(cfg, k) for k in PARAMS} | {"augment": run.augment, "augment_on": cfg.resolved_augment_on()},
        metrics=test_eval["metrics"],
        timings=timings.finish(),
        provenance={
            "weights_source": run.resolved.source,
            "weights_sha256": run.resolved.sha256 or "",
            "versions": versions,
            "device": cfg.device,
            "threads": torch.get_num_threads(),
        },
        details={
            "strategy": str(run.strategy),
            "n_val": len(splits.val),
            "validation": splits.how,
            "best_epoch": state.best_epoch,
            "test_loss": test_eval["loss"],
            "history": state.history,
            "checkpoints": {"best": "best.pt", "last": "last.pt" if cfg.keep_last else None},
            "plot": "history.png",
            **run.setup,
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss curves and metric curves per epoch, as one PNG with two panels."""
    from tlfeat.analysis.plots import label, pyplot

    plt = pyplot()

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "s-", label="validation accuracy", zorder=3)
    aucs = [h["val_roc_auc"] for h in history]
    if all(a is not None for a in aucs):  # hollow: a point under it (both at 1.0) stays visible
        ax_acc.plot(epochs, aucs, "^--", markerfacecolor="none", label="validation ROC AUC", zorder=4)
    ax_acc.set(xlabel="epoch", ylabel="metric", title="accuracy / ROC AUC", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(epochs) <= 2:  # one or two epochs: ticks at those epochs, not at fractions between them
            ax.set_xticks(epochs)
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    fig.suptitle(label(title))
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def summarize(results: list[FinetuneResult]) -> dict[str, Any]:
    """Mean and spread (sample std) of accuracy and train time over repeated runs."""
    acc = np.array([r.record.metrics["accuracy"] for r in results])
    secs = np.array([r.record.timings.train_seconds for r in results])

    def spread(values: np.ndarray) -> float:
        return float(values.std(ddof=1)) if len(values) > 1 else 0.0

    return {
        "runs": len(results),
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": spread(acc),
        "train_seconds_mean": float(secs.mean()),
        "train_seconds_std": spread(secs),
        "seeds": [r.record.seed for r in results],
    }


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "finetune_one", "summarize"]
