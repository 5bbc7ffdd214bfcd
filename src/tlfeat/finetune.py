"""The comparison path: the same backbone trained end to end on images, with a new head.

Protocol: a stratified 15% of the training split is held out for validation (the dataset's own
`val` split when it has both val and test); the weights of the best validation epoch are kept and
evaluated once on the test split, with the same metrics and record format as `tlfeat fit`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import __version__, allocator, backbones, cache, datasets, metrics, strategies
from tlfeat.errors import TlfeatError
from tlfeat.extraction import make_transform, preprocessing
from tlfeat.fitting import default_results_dir
from tlfeat.weights import build_with_weights, load_state_dict, resolve

log = logging.getLogger(__name__)

VAL_FRACTION = 0.15
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class FinetuneConfig:
    model: str
    data: str
    strategy: str = "full"
    epochs: int = 25
    lr: float | None = None  # None: 1e-3 for Adam, 1e-3 for SGD with momentum 0.9
    optimizer: str = "adam"
    step_size: int = 7  # learning rate divided by 10 every step_size epochs
    gamma: float = 0.1
    batch_size: int = 32
    image_size: int | None = None
    limit: int | None = None
    seed: int = 0
    weights_id: str | None = None
    weights_file: Path | None = None  # e.g. a best.pt of an earlier fine-tune (multi-stage transfer)
    untrained: bool = False  # random backbone weights (what `scratch` always uses)
    workers: int | None = None
    device: str = "cpu"
    data_dir: Path | None = None
    results_dir: Path | None = None
    resume: bool = False
    keep_last: bool = False  # keep last.pt (optimizer state, ~3x the model) once the run is complete
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1e-3


@dataclass
class FinetuneResult:
    record: dict[str, Any]
    path: Path
    reused: bool = False


class _Images:
    def __init__(self, split: datasets.ImageSplit, transform: Any) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.transform(self.split.image(i)), int(self.split.labels[i])


def train_transform(prep: dict[str, Any]):  # type: ignore[no-untyped-def]
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(
                prep["crop_size"], interpolation=T.InterpolationMode(prep["interpolation"]), antialias=True
            ),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
            T.ConvertImageDtype(__import__("torch").float32),
            T.Normalize(prep["mean"], prep["std"]),
        ]
    )


def _splits(cfg: FinetuneConfig) -> tuple[datasets.ImageSplit, datasets.ImageSplit, datasets.ImageSplit, str]:
    available = datasets.splits(cfg.data)
    if "train" not in available or "test" not in available:
        raise TlfeatError(f"{cfg.data} needs train and test splits; it has {', '.join(available)}")
    train = datasets.load_split(cfg.data, "train", cfg.data_dir, cfg.limit)
    test = datasets.load_split(cfg.data, "test", cfg.data_dir, cfg.limit)
    if len(np.unique(train.labels)) < 2:
        raise TlfeatError(f"{cfg.data} has one class only in its training split; fine-tuning needs 2 or more")
    if "val" in available:
        return train, datasets.load_split(cfg.data, "val", cfg.data_dir, cfg.limit), test, "the dataset's val split"
    fit_idx, val_idx = datasets.stratified_split(train.labels, VAL_FRACTION, seed=datasets.SPLIT_SEED)
    if len(val_idx) == 0:
        raise TlfeatError(f"{cfg.data}: too few training images to hold out a validation set")
    how = f"stratified {VAL_FRACTION:.0%} of train (seed {datasets.SPLIT_SEED})"
    return train.subset(fit_idx), train.subset(val_idx), test, how


def config_key(cfg: FinetuneConfig, weights_id: str) -> str:
    fields = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(cfg).items()
        if k not in ("workers", "device", "results_dir", "resume", "keep_last", "progress", "data_dir", "weights_file")
    }
    fields["data"] = datasets.canonical(cfg.data)
    fields["weights"] = weights_id
    fields["strategy"] = str(strategies.parse(cfg.strategy))
    return cache.cache_key(fields)


def run_dir(cfg: FinetuneConfig) -> tuple[Path, str]:
    strategy = strategies.parse(cfg.strategy)
    weights_id = _weights_id(cfg, strategy)
    key = config_key(cfg, weights_id)
    root = Path(cfg.results_dir) if cfg.results_dir else default_results_dir()
    method = "scratch" if strategy.kind == "scratch" else f"finetune-{str(strategy).replace(':', '')}"
    slug = datasets.dataset_slug(datasets.canonical(cfg.data))
    return root / "finetunes" / f"{cfg.model}__{slug}__{method}__seed{cfg.seed}__{key}", weights_id


def _weights_id(cfg: FinetuneConfig, strategy: strategies.Strategy) -> str:
    if strategy.kind == "scratch" or cfg.untrained:
        return f"untrained:seed{cfg.seed}"
    if cfg.weights_file is not None:
        return resolve(cfg.model, cfg.weights_id, cfg.weights_file).weights_id
    return backbones.weights_entry(cfg.model, cfg.weights_id).name


def validate(cfg: FinetuneConfig) -> None:
    backbones.check_model(cfg.model)
    strategy = strategies.parse(cfg.strategy)
    if cfg.optimizer not in OPTIMIZERS:
        raise TlfeatError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.step_size < 1:
        raise TlfeatError("--epochs, --batch-size and --step-size must be at least 1")
    if cfg.learning_rate <= 0:
        raise TlfeatError(f"--lr must be positive, got {cfg.lr}")
    if cfg.limit is not None and cfg.limit <= 0:
        raise TlfeatError(f"--limit must be a positive number of images, got {cfg.limit}")
    if strategy.kind == "freeze":
        n = len(strategies.blocks(backbones.build(cfg.model, device="meta"), cfg.model))
        if strategy.k > n:
            raise TlfeatError(
                f"freeze:{strategy.k} is more than the {n} blocks of {cfg.model}; use freeze:0 to freeze:{n}"
            )
    datasets.canonical(cfg.data)


def finetune(cfg: FinetuneConfig, repeats: int = 1) -> list[FinetuneResult]:
    """Run `repeats` seeds (cfg.seed, cfg.seed + 1, ...) of one configuration."""
    validate(cfg)
    if repeats < 1:
        raise TlfeatError(f"--repeats must be at least 1, got {repeats}")
    return [finetune_one(replace(cfg, seed=cfg.seed + r)) for r in range(repeats)]


def _build(cfg: FinetuneConfig, strategy: strategies.Strategy, n_classes: int):  # type: ignore[no-untyped-def]
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


def finetune_one(cfg: FinetuneConfig) -> FinetuneResult:
    validate(cfg)
    strategy = strategies.parse(cfg.strategy)
    out_dir, weights_id = run_dir(cfg)
    record_path = out_dir / "record.json"
    if record_path.is_file():
        return FinetuneResult(json.loads(record_path.read_text()), record_path, reused=True)
    with cache.lock(out_dir):  # a second process on the same run waits, then reuses its record
        if record_path.is_file():
            return FinetuneResult(json.loads(record_path.read_text()), record_path, reused=True)
        return _train(cfg, strategy, out_dir, weights_id, record_path)


def _train(
    cfg: FinetuneConfig, strategy: strategies.Strategy, out_dir: Path, weights_id: str, record_path: Path
) -> FinetuneResult:
    import torch
    from torch.utils.data import DataLoader

    from tlfeat.extraction import default_workers

    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.is_file() and not cfg.resume:
        raise TlfeatError(
            f"{out_dir} holds an unfinished run of this configuration; add --resume to continue it "
            "(or delete the folder to start over)"
        )

    train, val, test, val_how = _splits(cfg)
    n_classes = len(train.class_names)
    allocator.pin_malloc_thresholds()  # a MobileNetV2 training step on CPU: 56-62 -> 81-83 img/s
    torch.manual_seed(cfg.seed)
    model, resolved = _build(cfg, strategy, n_classes)
    groups = strategies.apply(model, cfg.model, strategy, cfg.learning_rate)
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.learning_rate)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    param_group_lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    history: list[dict[str, Any]] = []
    start_epoch, best_acc, train_seconds = 0, -1.0, 0.0
    if cfg.resume and last_path.is_file():
        state = load_state_dict_checkpoint(last_path, cfg.model)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, best_acc = int(state["epoch"]) + 1, float(state["best_acc"])
        history = json.loads(state["history"])
        train_seconds = float(state["train_seconds"])
        log.info("resuming %s at epoch %d", out_dir.name, start_epoch + 1)

    prep = preprocessing(cfg.model, cfg.weights_id, cfg.image_size)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + start_epoch)
    train_loader = DataLoader(
        _Images(train, train_transform(prep)),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        generator=gen,
        drop_last=len(train) > cfg.batch_size,
    )
    eval_tf = make_transform(prep)
    model = model.to(cfg.device, memory_format=torch.channels_last)
    out_dir.mkdir(parents=True, exist_ok=True)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        strategies.freeze_batchnorm_stats(model)
        lrs = [g["lr"] for g in optimizer.param_groups]
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress(cfg, len(train), f"epoch {epoch + 1}/{cfg.epochs}")
        for x, y in train_loader:
            x = x.to(cfg.device).contiguous(memory_format=torch.channels_last)
            y = y.to(cfg.device)
            optimizer.zero_grad()
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        bar.close()
        scheduler.step()
        epoch_train_seconds = time.perf_counter() - t0
        train_seconds += epoch_train_seconds
        val_eval = evaluate(model, val, eval_tf, cfg, workers)
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_eval["loss"],
            "val_accuracy": val_eval["metrics"]["accuracy"],
            "val_roc_auc": val_eval["metrics"]["roc_auc"],
            "lr": lrs,
            "train_seconds": epoch_train_seconds,
            "epoch_seconds": time.perf_counter() - t0,
        }
        history.append(entry)
        log.info("epoch %d: %s", epoch + 1, entry)
        if entry["val_accuracy"] > best_acc:
            best_acc = entry["val_accuracy"]
            _save(
                best_path,
                {
                    "model": _cpu_state(model),
                    "model_name": cfg.model,
                    "epoch": epoch + 1,
                    "class_names": list(train.class_names),
                    "val_accuracy": best_acc,
                },
            )
        _save(
            last_path,
            {
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "epoch": epoch,
                "best_acc": best_acc,
                "history": json.dumps(history),
                "train_seconds": train_seconds,
                "model_name": cfg.model,
            },
        )
        _write_json(out_dir / "history.json", history)
        plot_history(history, out_dir / "history.png", title=f"{cfg.model} {strategy} on {Path(train.dataset).name}")

    best = load_state_dict_checkpoint(best_path, cfg.model)
    model.load_state_dict(best["model"])
    t0 = time.perf_counter()
    test_eval = evaluate(model, test, eval_tf, cfg, workers)
    predict_seconds = time.perf_counter() - t0
    import torchvision

    record = {
        "kind": "finetune",
        "key": out_dir.name.rsplit("__", 1)[-1],
        "method": "scratch" if strategy.kind == "scratch" else f"finetune:{strategy}",
        "strategy": str(strategy),
        "model": cfg.model,
        "dataset": train.dataset,
        "layer": "-",
        "weights_id": weights_id,
        "weights_source": resolved.source,
        "pretrained": resolved.pretrained,
        "image_size": prep["crop_size"],
        "limit": cfg.limit,
        "seed": cfg.seed,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "validation": val_how,
        "n_classes": n_classes,
        "class_names": list(train.class_names),
        "trainable_params": trainable,
        "total_params": total,
        "param_group_lrs": param_group_lrs,
        "n_blocks": len(strategies.blocks(model, cfg.model)),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "params": {
            "optimizer": cfg.optimizer,
            "lr": cfg.learning_rate,
            "epochs": cfg.epochs,
            "step_size": cfg.step_size,
            "gamma": cfg.gamma,
            "batch_size": cfg.batch_size,
        },
        "best_epoch": int(best["epoch"]),
        "metrics": test_eval["metrics"],
        "test_loss": test_eval["loss"],
        "history": history,
        "timings": {
            "train_seconds": train_seconds,
            "fit_seconds": train_seconds,
            "extract_seconds": 0.0,
            "predict_seconds": predict_seconds,
            "cv_seconds": 0.0,
        },
        "checkpoints": {"best": best_path.name, "last": last_path.name if cfg.keep_last else None},
        "plot": "history.png",
        "versions": {
            "tlfeat": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "device": cfg.device,
        "threads": torch.get_num_threads(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(record_path, record)
    if not cfg.keep_last:  # only resuming needs it, and a complete run is reused, never resumed
        last_path.unlink()
    return FinetuneResult(record, record_path)


def evaluate(
    model: Any, split: datasets.ImageSplit, transform: Any, cfg: FinetuneConfig, workers: int
) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Images(split, transform), batch_size=max(cfg.batch_size, 64), num_workers=workers if len(split) > 64 else 0
    )
    model.eval()
    logits_all, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            logits_all.append(model(x.to(cfg.device).contiguous(memory_format=torch.channels_last)).float().cpu())
            labels.append(y)
    logits, y_true = torch.cat(logits_all), torch.cat(labels)
    loss = float(torch.nn.functional.cross_entropy(logits, y_true))
    proba = torch.softmax(logits, 1).numpy()
    return {"loss": loss, "metrics": metrics.evaluate(y_true.numpy(), proba.argmax(1), proba, list(split.class_names))}


def load_state_dict_checkpoint(path: Path, model_name: str) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same message
        raise TlfeatError(f"{path} is not a readable checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise TlfeatError(f"{path} is not a tlfeat checkpoint")
    if state.get("model_name") != model_name:
        raise TlfeatError(f"{path} is a checkpoint of {state.get('model_name')!r}, not {model_name!r}")
    return state


def _cpu_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save(path: Path, obj: dict[str, Any]) -> None:
    """Write a checkpoint atomically: the previous one survives a crash mid-write."""
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _progress(cfg: FinetuneConfig, total: int, desc: str):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not cfg.progress, dynamic_ncols=True, leave=False)


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss curves and metric curves per epoch, as one PNG with two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "s-", label="validation accuracy")
    aucs = [h["val_roc_auc"] for h in history]
    if all(a is not None for a in aucs):
        ax_acc.plot(epochs, aucs, "^--", label="validation ROC AUC")
    ax_acc.set(xlabel="epoch", ylabel="metric", title="accuracy / ROC AUC", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _spread(values: np.ndarray) -> float:
    """Sample standard deviation; 0 for a single run."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(results: list[FinetuneResult]) -> dict[str, Any]:
    """Mean and spread (sample std) of accuracy and train time over repeated runs."""
    acc = np.array([r.record["metrics"]["accuracy"] for r in results])
    secs = np.array([r.record["timings"]["train_seconds"] for r in results])
    return {
        "runs": len(results),
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": _spread(acc),
        "train_seconds_mean": float(secs.mean()),
        "train_seconds_std": _spread(secs),
        "seeds": [r.record["seed"] for r in results],
    }


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "finetune_one", "load_state_dict", "summarize"]
