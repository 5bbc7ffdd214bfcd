"""Fine-tuning strategies as small pure functions over a model's named parameters.

A model is split into its blocks in forward order (stem, stages..., pre-head layers) plus the head.
`freeze:k` freezes the first k blocks; `discriminative` gives earlier blocks smaller learning rates;
`head` trains only a new head; `full` and `scratch` train everything. Each is checkable without
training: look at `requires_grad` and at the optimizer's parameter groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlfeat import backbones
from tlfeat.errors import TlfeatError

if TYPE_CHECKING:
    from torch import nn

STRATEGIES = ("full", "head", "freeze:K", "discriminative[:RATIO]", "scratch")
DEFAULT_DISCRIMINATIVE_RATIO = 0.01  # the first block learns at 1/100 of the head's rate


@dataclass(frozen=True)
class Strategy:
    kind: str  # full, head, freeze, discriminative, scratch
    k: int = 0  # freeze: number of leading blocks frozen
    ratio: float = DEFAULT_DISCRIMINATIVE_RATIO  # discriminative: first block lr / head lr

    @property
    def pretrained(self) -> bool:
        return self.kind != "scratch"

    def __str__(self) -> str:
        if self.kind == "freeze":
            return f"freeze:{self.k}"
        if self.kind == "discriminative" and self.ratio != DEFAULT_DISCRIMINATIVE_RATIO:
            return f"discriminative:{self.ratio:g}"
        return self.kind


def parse(text: str) -> Strategy:
    value = text.strip().lower()
    if value in ("full", "head", "scratch", "discriminative"):
        return Strategy(value)
    if m := re.fullmatch(r"freeze:(\d+)", value):
        return Strategy("freeze", k=int(m.group(1)))
    if m := re.fullmatch(r"discriminative:([0-9.eE+-]+)", value):
        try:
            ratio = float(m.group(1))
        except ValueError:
            ratio = -1.0
        if not 0 < ratio <= 1:
            raise TlfeatError(f"discriminative ratio must be in (0, 1], got {m.group(1)}")
        return Strategy("discriminative", ratio=ratio)
    raise TlfeatError(f"unknown strategy {text!r}; valid: {', '.join(STRATEGIES)} (e.g. freeze:2, discriminative:0.1)")


def blocks(model: nn.Module, name: str) -> list[list[str]]:
    """The model's blocks before the head, in forward order, each a list of module (or parameter) names.

    The source says what a block is: torchvision's layout rules, timm's `group_matcher`, the layers
    of a Hugging Face or open_clip transformer. Only blocks with parameters count.
    """
    return backbones.resolve(name).blocks(model)


def _block_of(param_name: str, block_list: list[list[str]]) -> int | None:
    for i, names in enumerate(block_list):
        if any(param_name == n or param_name.startswith(n + ".") for n in names):
            return i
    return None


def check_blocks(name: str, strategy: Strategy) -> None:
    """`freeze:k` within the blocks of `name`, before anything runs (the architecture built on the meta
    device: no weights, no memory)."""
    if strategy.kind == "freeze" and strategy.k > 0:
        bb = backbones.resolve(name)
        _check_k(name, strategy.k, len(bb.blocks(bb.build(device="meta"))))


def _check_k(name: str, k: int, n: int) -> None:
    if not 0 <= k <= n:
        raise TlfeatError(f"freeze:{k} is more than the {n} blocks of {name}; use freeze:0 to freeze:{n}")


def apply(model: nn.Module, name: str, strategy: Strategy, lr: float) -> list[dict]:
    """Set `requires_grad` for `strategy` and return the optimizer's parameter groups.

    Each group has `params`, `lr` and a `name` ("head", "block3"...). Frozen parameters are in no group.
    """
    block_list = blocks(model, name)
    n = len(block_list)
    if strategy.kind == "freeze":
        _check_k(name, strategy.k, n)
    groups: dict[str, dict] = {}
    for pname, param in model.named_parameters():
        i = _block_of(pname, block_list)
        trainable = True
        if strategy.kind == "head":
            trainable = i is None
        elif strategy.kind == "freeze":
            trainable = i is None or i >= strategy.k
        param.requires_grad_(trainable)
        if not trainable:
            continue
        group_lr = lr
        if strategy.kind == "discriminative" and i is not None:
            # Geometric ramp: block 0 at lr * ratio, rising by a constant factor to the head's lr.
            group_lr = lr * strategy.ratio ** ((n - i) / n)
        key = "head" if i is None else f"block{i}"
        groups.setdefault(key, {"name": key, "lr": group_lr, "params": []})["params"].append(param)
    order = [f"block{i}" for i in range(n)] + ["head"]
    return [groups[k] for k in order if k in groups]


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode (call after `model.train()`)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


def replace_head(model: nn.Module, name: str, n_classes: int, seed: int = 0) -> None:
    """A new final layer with `n_classes` outputs, weights ~ N(0, 0.01), bias 0 (where the source's
    head is; a model without one, such as a CLIP image tower, gets one)."""
    backbones.resolve(name).replace_head(model, n_classes, seed)
