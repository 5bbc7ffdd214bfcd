"""The steps of a fine-tuning run, each small enough to read at once (skorch's fit_loop is the model).

`TrainState` is everything that is saved at an epoch's end and restored by `--resume`. The
optimizer, the learning-rate schedule (per step: linear warm-up, then step decay or cosine), one
epoch, the BatchNorm re-estimation and the evaluation are separate functions; `finetune._train`
only calls them in order.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import datasets, fsio, metrics
from tlfeat.config import FinetuneConfig
from tlfeat.errors import TlfeatError
from tlfeat.preprocess import Preprocessing


@dataclass
class TrainState:
    """Where a run stands after its last completed epoch."""

    epoch: int = 0  # epochs completed
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def improved(self, accuracy: float, loss: float) -> bool:
        """Better validation accuracy, or the same accuracy at a lower loss (so a run stuck at one
        accuracy still keeps its best-fitting epoch, not its first)."""
        return accuracy > self.best_accuracy or (accuracy == self.best_accuracy and loss < self.best_loss)

    def save(self, path: Path, model: Any, optimizer: Any, scheduler: Any, model_name: str) -> None:
        import torch

        payload = {
            "state": asdict(self),
            "model": cpu_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "model_name": model_name,
        }
        save_checkpoint(path, payload)

    @classmethod
    def load(cls, path: Path, model: Any, optimizer: Any, scheduler: Any, model_name: str) -> TrainState:
        import torch

        payload = load_checkpoint(path, model_name)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng"])
        return cls(**payload["state"])


def cpu_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically: the previous one survives a crash mid-write."""
    import torch

    with fsio.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, model_name: str) -> dict[str, Any]:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same message
        from tlfeat.weights import load_error

        raise TlfeatError(f"{path} is not a readable checkpoint ({load_error(exc)})") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise TlfeatError(f"{path} is not a tlfeat checkpoint")
    if payload.get("model_name") != model_name:
        raise TlfeatError(f"{path} is a checkpoint of {payload.get('model_name')!r}, not {model_name!r}")
    return payload


# --------------------------------------------------------------------------- data


class Images:
    """A map-style torch Dataset over an ImageSplit: (transformed tensor, label)."""

    def __init__(self, split: datasets.ImageSplit, transform: Any) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.split.image(i)), int(self.split.labels[i])


def resolve_augment(cfg: FinetuneConfig, dataset: str) -> str:
    """auto: no flips for digits (a mirrored 3 is not a 3), mild crops for small centred images."""
    if cfg.augment != "auto":
        return cfg.augment
    if dataset in datasets.NO_FLIP:
        return "crop"
    if dataset in datasets.SMALL_CENTRED:
        return "flip"
    return "standard"


class EvalTransform:
    """The weights' resize and centre crop (numpy, as extraction does), then a normalised tensor."""

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep
        self.mean = np.asarray(prep.mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(prep.std, np.float32).reshape(-1, 1, 1)

    def __call__(self, img: Any) -> Any:
        import torch

        arr = self.prep.resize_crop(img).astype(np.float32) / np.float32(255.0)
        return torch.from_numpy((arr - self.mean) / self.std)


def train_transform(prep: Preprocessing, augment: str) -> Any:
    """The training augmentation: none, flip, crop (mild random resized crop) or standard (the
    ImageNet recipe: random resized crop at 8-100% of the area, and a horizontal flip)."""
    import torch
    from torchvision import transforms as T

    if augment == "none":
        return EvalTransform(prep)
    mode = T.InterpolationMode(prep.interpolation)
    steps: list[Any] = []
    if augment in ("crop", "standard"):
        scale = (0.08, 1.0) if augment == "standard" else (0.5, 1.0)
        steps.append(T.RandomResizedCrop(prep.crop_size, scale=scale, interpolation=mode, antialias=True))
    else:
        steps += [T.Resize(prep.resize_size, interpolation=mode, antialias=True), T.CenterCrop(prep.crop_size)]
    if augment in ("flip", "standard"):
        steps.append(T.RandomHorizontalFlip())
    steps += [T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Normalize(prep.mean, prep.std)]
    return T.Compose(steps)


def loader(
    split: datasets.ImageSplit,
    transform: Any,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    seed: int = 0,
    pin: bool = False,
) -> Any:
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    dataset: Any = Images(split, transform)  # map-style: __len__ and __getitem__, all DataLoader needs
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers if len(split) > batch_size else 0,
        generator=generator,
        drop_last=shuffle and len(split) > batch_size,
        worker_init_fn=_worker_init,
        pin_memory=pin,
    )


# --------------------------------------------------------------------------- augmentation on the device


class Pixels:
    """A loader transform for `--augment-on device`: the image resized (short side) and centre-cropped
    to `size` x `size`, as a uint8 tensor. The crop size gives the evaluation input (the pixels of
    EvalTransform); the resize size gives the canvas training crops are drawn from on the device."""

    def __init__(self, prep: Preprocessing, size: int) -> None:
        self.prep = replace(prep, crop_size=size)

    def __call__(self, img: Any) -> Any:
        import torch

        return torch.from_numpy(self.prep.resize_crop(img))


class OnDevice:
    """Batches of uint8 images from a loader, made the network's input on the device: for training a
    random resized crop of each canvas (one batched `roi_align`) and a random flip, as `augment` says,
    drawn from a generator seeded per epoch; then normalised. Evaluation batches are only normalised."""

    def __init__(self, batches: Any, prep: Preprocessing, augment: str, device: str, seed: int | None) -> None:
        import torch

        self.batches, self.dataset = batches, batches.dataset
        self.prep, self.augment, self.seed = prep, augment, seed
        self.device = torch.device(device)
        self.mean = torch.tensor(prep.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(prep.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        import torch

        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        for x, y in self.batches:
            x = x.to(self.device, non_blocking=True)
            if generator is not None:
                x = self.train_crops(x, generator)
            yield x.float().div_(255.0).sub_(self.mean).div_(self.std), y.to(self.device, non_blocking=True)

    def train_crops(self, x: Any, generator: Any) -> Any:
        """uint8 canvases (n, 3, R, R) -> float (n, 3, crop, crop), 0-255: crops and flips of `augment`."""
        import torch
        from torchvision.ops import roi_align

        n, size, crop = len(x), x.shape[-1], self.prep.crop_size
        if self.augment in ("crop", "standard"):
            scale = (0.08, 1.0) if self.augment == "standard" else (0.5, 1.0)
            boxes = random_boxes(n, size, scale, generator).to(self.device)
            rois = torch.cat([torch.arange(n, device=self.device, dtype=boxes.dtype)[:, None], boxes], 1)
            out = roi_align(x.float(), rois, output_size=crop, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        else:
            top = int(round((size - crop) / 2.0))
            out = x[..., top : top + crop, top : top + crop].float()
        if self.augment in ("flip", "standard"):
            flip = (torch.rand(n, generator=generator) < 0.5).to(self.device)[:, None, None, None]
            out = torch.where(flip, out.flip(-1), out)
        return out


def random_boxes(n: int, size: int, scale: tuple[float, float], generator: Any, attempts: int = 10) -> Any:
    """RandomResizedCrop's boxes (x1, y1, x2, y2) in a size x size canvas, drawn for n images at once:
    area in `scale`, aspect ratio log-uniform in [3/4, 4/3], the first of `attempts` that fits (else the
    whole canvas)."""
    import torch

    area = size * size * torch.empty(n, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(fits.any(1), fits.float().argmax(1), 0)
    pick = torch.arange(n)
    w = torch.where(fits.any(1), w[pick, first], float(size))
    h = torch.where(fits.any(1), h[pick, first], float(size))
    left = (torch.rand(n, generator=generator) * (size - w + 1)).floor()
    top = (torch.rand(n, generator=generator) * (size - h + 1)).floor()
    return torch.stack([left, top, left + w, top + h], 1)


def autocast(device: str, precision: str) -> Any:
    """bf16 autocast of the forward pass and the loss where `--precision bf16` asks for it (a key field)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers die with the training process (never linger after a kill)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- optimisation


def optimizer(cfg: FinetuneConfig, groups: list[dict[str, Any]]) -> Any:
    import torch

    decay = float(cfg.weight_decay or 0.0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.learning_rate, weight_decay=decay)
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9, nesterov=True, weight_decay=decay)


def schedule(cfg: FinetuneConfig, opt: Any, steps_per_epoch: int) -> Any:
    """Per-step multiplier of each group's learning rate: linear warm-up, then step decay or cosine."""
    import torch

    epochs = int(cfg.epochs or 1)
    warmup = int(cfg.warmup_epochs or 0) * steps_per_epoch
    total = max(epochs * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def run_epoch(
    model: Any, batches: Any, opt: Any, sched: Any, device: str, bar: Any, precision: str = "fp32"
) -> dict[str, float]:
    """One pass over the training images; returns mean loss and accuracy."""
    import torch

    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in batches:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise TlfeatError("the training loss became infinite or NaN; lower --lr")
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.update(len(y))
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def precise_bn(model: Any, batches: Any, n_batches: int, device: str, precision: str = "fp32") -> None:
    """Re-estimate every trainable BatchNorm's running statistics from `n_batches` of training images.

    The running averages kept during training lag behind weights that move fast (a network trained
    from scratch); evaluated with them, such a network can predict one class for everything. A
    plain average over a few batches with the final weights matches the weights evaluated.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not norms or n_batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    with torch.no_grad(), autocast(device, precision):
        for k, (x, _) in enumerate(batches):
            if k >= n_batches:
                break
            model(x.to(device).contiguous(memory_format=torch.channels_last))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def evaluate(
    model: Any, split: datasets.ImageSplit, batches: Any, device: str, precision: str = "fp32"
) -> dict[str, Any]:
    """Loss and metrics of `model` on one split (eval mode)."""
    import torch

    model.eval()
    logits_all, labels = [], []
    with torch.inference_mode(), autocast(device, precision):
        for x, y in batches:
            logits_all.append(model(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu())
            labels.append(y.cpu())
    logits, y_true = torch.cat(logits_all), torch.cat(labels)
    loss = float(torch.nn.functional.cross_entropy(logits, y_true))
    proba = torch.softmax(logits, 1).numpy()
    result = metrics.evaluate(y_true.numpy(), proba.argmax(1), proba, list(split.class_names), list(split.ids))
    return {"loss": loss, "metrics": result}


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
