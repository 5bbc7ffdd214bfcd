"""The torch side every source shares: pooling what a layer returns, the extractor module, heads, blocks.

Imported only where a network is built (it imports torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def pool_map(out: Any) -> Any:
    """Global average pooling of a feature map or token sequence: (n, c, h, w) and (n, tokens, c) -> (n, c)."""
    if out.ndim == 4:
        out = out.mean(dim=(2, 3))
    elif out.ndim == 3:
        out = out.mean(dim=1)
    return out.flatten(1)


def pool_tokens(tokens: Any, prefix: int, pool: str) -> Any:
    """(n, tokens, c) with `prefix` leading tokens (CLS first, then any register tokens) -> (n, d).

    `cls`: the first token; `mean`: the mean of the patch tokens (CLS and registers left out);
    `cls+mean`: both, concatenated (d = 2c).
    """
    cls = tokens[:, 0]
    mean = tokens[:, prefix:].mean(dim=1)
    if pool == "cls":
        return cls
    if pool == "mean":
        return mean
    return torch.cat([cls, mean], dim=1)


class Extractor(nn.Module):
    """`model` cut by `forward_fn(model, x) -> [one (n, d) tensor per layer]`.

    One layer gives a tensor, several a tuple. The model is a submodule, so the state dict (sent to
    Ray replicas) and the ONNX export carry its weights.
    """

    def __init__(self, model: nn.Module, forward_fn: Callable[[nn.Module, Any], Sequence[Any]]) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, x: Any) -> Any:
        if torch.onnx.is_in_onnx_export():  # attention's fused fast path has no ONNX form; the plain one does
            fast = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                feats = tuple(f.flatten(1) for f in self.forward_fn(self.model, x))
            finally:
                torch.backends.mha.set_fastpath_enabled(fast)
        else:
            feats = tuple(f.flatten(1) for f in self.forward_fn(self.model, x))
        return feats[0] if len(feats) == 1 else feats


def hooked(model: nn.Module, names: list[str], run: Callable[[Any], Any], x: Any) -> list[Any]:
    """The outputs of the named submodules during `run(x)` (tuples: their first element)."""
    found: dict[str, Any] = {}
    handles = []
    for name in dict.fromkeys(names):

        def keep(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            found[name] = out[0] if isinstance(out, tuple) else out

        handles.append(model.get_submodule(name).register_forward_hook(keep))
    try:
        run(x)
    finally:
        for h in handles:
            h.remove()
    return [found[n] for n in names]


def parent_of(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, child = dotted.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def new_linear_head(model: nn.Module, head: str, n_classes: int, seed: int = 0) -> None:
    """A new final layer with `n_classes` outputs, weights ~ N(0, 0.01), bias 0 (a 1x1 conv stays a conv)."""
    parent, child = parent_of(model, head)
    old = getattr(parent, child)
    gen = torch.Generator().manual_seed(seed)
    new: nn.Conv2d | nn.Linear
    if isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, n_classes, kernel_size=1)
    else:
        new = nn.Linear(in_features(old), n_classes)
    assert new.bias is not None
    with torch.no_grad():
        new.weight.copy_(torch.randn(new.weight.shape, generator=gen) * 0.01)
        new.bias.zero_()
    setattr(parent, child, new)


def in_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    if isinstance(layer, nn.Conv2d):
        return int(layer.in_channels)
    raise TypeError(f"cannot tell the input size of a {type(layer).__name__} head")


def has_params(model: nn.Module, names: list[str]) -> bool:
    return any(True for n in names for _ in model.get_submodule(n).parameters())


STACKS = ("blocks", "stages", "layers", "layer", "resblocks", "features")


def _has_stack(module: nn.Module) -> bool:
    return any(name.rsplit(".", 1)[-1] in STACKS for name, _ in module.named_modules() if name)


def top_level_blocks(model: nn.Module, head: str) -> list[list[str]]:
    """Blocks of any module in forward order, the head left out: leading single layers form a stem;
    each child of a stack (a container named `blocks`, `stages`, `layers`, `layer`, `resblocks`,
    `features`: timm's, Hugging Face's and open_clip's layouts) is a block; any other child is one.
    Parameters held directly by a container (a ViT's class token, position embedding) join the first
    block, which runs them."""
    out: list[list[str]] = []
    stem: list[str] = []

    def flush() -> None:
        if stem:
            out.append(list(stem))
            stem.clear()

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == head:
                continue
            if head.startswith(full + ".") or (name not in STACKS and _has_stack(child)):
                visit(child, full + ".")
                continue
            if name in STACKS and len(list(child.children())) > 1:
                flush()
                out.extend([f"{full}.{sub}"] for sub, _ in child.named_children())
                continue
            if not list(child.children()) and not out:
                stem.append(full)
                continue
            flush()
            out.append([full])

    visit(model, "")
    flush()
    blocks = [b for b in out if has_params(model, b)]
    direct = [n for n, _ in model.named_parameters() if not any(n.startswith(m + ".") for b in blocks for m in b)]
    loose = [n for n in direct if not (n == head or n.startswith(head + "."))]
    if blocks and loose:
        blocks[0] = loose + blocks[0]
    return blocks


class Headed(nn.Module):
    """A tower that gives features (`base`, run by `features_fn`) and a classification head on them
    (`head`: none until fine-tuning puts one there). Hugging Face and open_clip models are built so."""

    def __init__(
        self, base: nn.Module, dim: int, features_fn: Callable[[nn.Module, Any], Any], prefix_tokens: int | None = None
    ) -> None:
        super().__init__()
        self.base = base
        self.head: nn.Module = nn.Identity()
        self.dim = dim
        self.features_fn = features_fn
        self.prefix_tokens = prefix_tokens

    def forward(self, x: Any) -> Any:
        return self.head(self.features_fn(self.base, x))


def set_linear_head(model: nn.Module, n_classes: int, seed: int = 0) -> None:
    """A `Headed` model's new head: `n_classes` outputs on its `dim` features, weights ~ N(0, 0.01)."""
    head = nn.Linear(int(model.dim), n_classes)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    model.head = head
