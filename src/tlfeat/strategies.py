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


def _split_features(name: str, features: nn.Module) -> list[list[str]]:
    """Blocks inside a `features` Sequential: conv stages between poolings (AlexNet/VGG), dense
    block + transition (DenseNet), else one block per child."""
    from torch import nn

    children = list(features.named_children())
    groups: list[list[str]] = [[]]
    if name.startswith(("vgg", "alexnet")):
        for child_name, child in children:
            groups[-1].append(f"features.{child_name}")
            if isinstance(child, nn.MaxPool2d):
                groups.append([])
    elif name.startswith("densenet"):
        for child_name, _ in children:
            if child_name.startswith("denseblock") and groups[-1]:
                groups.append([])
            groups[-1].append(f"features.{child_name}")
    else:
        groups = [[f"features.{child_name}"] for child_name, _ in children]
    return [g for g in groups if g]


def blocks(model: nn.Module, name: str) -> list[list[str]]:
    """The model's blocks before the head, in forward order, each a list of module names.

    Only blocks with parameters count. Leading single layers (a ResNet's conv1 and bn1) form one
    stem block; layers of the classifier before its head (VGG's fc6, fc7) form the last block.
    """
    head = backbones.family(name).head
    head_top = head.split(".")[0]
    out: list[list[str]] = []
    stem: list[str] = []
    for child_name, child in model.named_children():
        if child_name == head:
            continue
        if child_name == head_top:  # a classifier Sequential that contains the head
            pre = [f"{child_name}.{n}" for n, _ in child.named_children() if f"{child_name}.{n}" != head]
            out.append(pre)
            continue
        if child_name == "features" and len(list(child.children())) > 1:
            out.extend(_split_features(name, child))
            continue
        is_stage = len(list(child.children())) > 0
        if not is_stage and not out:
            stem.append(child_name)
            continue
        if stem:
            out.append(stem)
            stem = []
        out.append([child_name])
    if stem:
        out.insert(0, stem)
    return [b for b in out if _has_params(model, b)]


def _has_params(model: nn.Module, names: list[str]) -> bool:
    return any(True for n in names for _ in model.get_submodule(n).parameters())


def _block_of(param_name: str, block_list: list[list[str]]) -> int | None:
    for i, names in enumerate(block_list):
        if any(param_name == n or param_name.startswith(n + ".") for n in names):
            return i
    return None


def check_blocks(name: str, strategy: Strategy) -> None:
    """`freeze:k` within the blocks of `name`, before anything runs (the architecture built on the meta
    device: no weights, no memory)."""
    if strategy.kind == "freeze" and strategy.k > 0:
        _check_k(name, strategy.k, len(blocks(backbones.build(name, device="meta"), name)))


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
    """A new final layer with `n_classes` outputs, weights ~ N(0, 0.01), bias 0."""
    import torch
    from torch import nn

    fam = backbones.family(name)
    parent, child = backbones.get_submodule_parent(model, fam.head)
    old = getattr(parent, child)
    gen = torch.Generator().manual_seed(seed)
    new: nn.Conv2d | nn.Linear
    if fam.conv_head:
        new = nn.Conv2d(old.in_channels, n_classes, kernel_size=1)
    else:
        new = nn.Linear(old.in_features, n_classes)
    assert new.bias is not None
    with torch.no_grad():
        new.weight.copy_(torch.randn(new.weight.shape, generator=gen) * 0.01)
        new.bias.zero_()
    setattr(parent, child, new)
