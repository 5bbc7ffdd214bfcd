"""The model registry (every torchvision classifier) and how to cut a model at its feature layers.

Names, weights entries and preprocessing come from torchvision's weights enums (through
`modelinfo`, which needs no torch). The penultimate features are the input of each family's
final classification layer. Earlier layers are cut with torchvision's own
`create_feature_extractor`, which prunes the graph after the last layer asked for, so the
rest of the network is neither run nor exported, and several layers come from one forward pass.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache
from typing import TYPE_CHECKING, Any

from tlfeat import modelinfo
from tlfeat.errors import TlfeatError, did_you_mean
from tlfeat.modelinfo import STUDIED, Family
from tlfeat.preprocess import Preprocessing

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

PENULTIMATE = "penultimate"
__all__ = ["PENULTIMATE", "STUDIED", "Family", "available_models", "build", "check_model", "feature_extractor"]


def available_models() -> tuple[str, ...]:
    """Every torchvision classification model name, studied ones first."""
    names = set(modelinfo.models())
    return tuple(n for n in STUDIED if n in names) + tuple(sorted(names - set(STUDIED)))


def check_model(name: str) -> None:
    models = available_models()
    if name not in models:
        raise TlfeatError(
            f"unknown model {name!r}.{did_you_mean(name, list(models))} Run `tlfeat models` to list the valid names."
        )


def family(name: str) -> Family:
    check_model(name)
    fam = modelinfo.family_of(name)
    if fam is None:
        raise TlfeatError(f"model {name!r} has no registered head; add its family in tlfeat/modelinfo.py")
    return fam


def default_weights_id(name: str) -> str:
    """IMAGENET1K_V1 where it exists (the weights transfer studies used and mirrors carry), else DEFAULT."""
    check_model(name)
    return modelinfo.models()[name].default_weights


def weights_entry(name: str, weights_id: str | None) -> modelinfo.WeightsInfo:
    """The weights entry `weights_id` (None: the tlfeat default) of a model."""
    check_model(name)
    info = modelinfo.models()[name]
    wid = weights_id or info.default_weights
    if wid not in info.weights:
        raise TlfeatError(f"model {name!r} has no weights entry {wid!r}; valid entries: {', '.join(info.weights)}")
    return info.weights[wid]


def preprocessing(
    name: str, weights_id: str | None, image_size: int | None, fast_decode: bool = False
) -> Preprocessing:
    """The weights entry's own eval transform, optionally scaled to crop `image_size`."""
    w = weights_entry(name, weights_id)
    base = Preprocessing(w.crop_size, w.resize_size, w.mean, w.std, w.interpolation, w.antialias, fast_decode)
    return base.scaled(image_size)


def build(name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
    """Build the architecture with untrained weights (on `device`, "meta" for shapes only)."""
    import torch
    from torchvision.models import get_model

    check_model(name)
    kwargs: dict[str, object] = {}
    if name in ("googlenet", "inception_v3"):
        # Auxiliary heads only matter for training from scratch; their absence keeps the
        # state dict of the pretrained weights loadable (torchvision drops them the same way).
        kwargs.update(aux_logits=False, init_weights=True)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device(device):
                return get_model(name, **kwargs)
        except NotImplementedError:
            if device != "meta":
                raise
            # A few builders (RegNet) compute widths with real tensors: build on CPU instead.
            return get_model(name, **kwargs)


def get_submodule_parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, child = dotted.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def layer_names(model: nn.Module) -> list[str]:
    """Named modules that `--layer` accepts by their short name: containers and blocks."""
    return [n for n, m in model.named_modules() if n and len(list(m.children())) > 0]


def graph_nodes(model: nn.Module) -> list[str]:
    """Every node of the model's evaluation graph; each works as `--layer` too."""
    from torchvision.models.feature_extraction import get_graph_node_names

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(get_graph_node_names(model)[1])


@cache
def _headless_nodes(name: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """(graph nodes, block names) of `name` without its head: tracing costs a second, so once per model."""
    model = build(name, device="meta")
    _drop_head(model, name)
    return tuple(graph_nodes(model)), frozenset(layer_names(model))


def check_layers(name: str, layers: list[str]) -> None:
    """Raise, naming the valid layers, unless every one of `layers` is a block or graph node of `name`."""
    nodes, modules = _headless_nodes(name)
    for layer in layers:
        if layer in modules or layer in nodes or any(n.startswith(layer + ".") for n in nodes):
            continue
        raise TlfeatError(
            f"model {name!r} has no layer {layer!r}.{did_you_mean(layer, sorted(modules) + list(nodes))} "
            f"Run `tlfeat models --layers {name}` to list them."
        )


def _drop_head(model: nn.Module, name: str) -> None:
    from torch import nn

    fam = family(name)
    if fam.conv_head:
        setattr(model, "classifier", nn.AdaptiveAvgPool2d(1))  # noqa: B010 - the model flattens what it returns
    else:
        parent, child = get_submodule_parent(model, fam.head)
        setattr(parent, child, nn.Identity())


class Pooled:
    """Global average pooling of whatever a layer returns: (n, c, h, w) and (n, tokens, c) -> (n, c)."""

    @staticmethod
    def apply(out: Any) -> Any:
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        elif out.ndim == 3:
            out = out.mean(dim=1)
        return out.flatten(1)


def feature_extractor(model: nn.Module, name: str, layers: list[str | None] | str | None = None) -> nn.Module:
    """A module returning a tuple of (n, d) features, one per layer (None: the penultimate one).

    The head is dropped, then torchvision's `create_feature_extractor` keeps only the graph up to
    the deepest layer asked for. A single layer gives a tensor instead of a tuple.
    """
    from torch import nn
    from torchvision.models.feature_extraction import create_feature_extractor

    wanted = layers if isinstance(layers, list) else [layers]
    check_layers(name, [layer for layer in wanted if layer is not None])
    _drop_head(model, name)
    final = _headless_nodes(name)[0][-1]
    nodes = {final if layer is None else layer: layer or PENULTIMATE for layer in wanted}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = create_feature_extractor(model, return_nodes=nodes)
    order = [layer or PENULTIMATE for layer in wanted]

    class Extractor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph
            self.order = order

        def forward(self, x: Any) -> Any:
            out = self.graph(x)
            feats = tuple(Pooled.apply(out[k]) for k in self.order)
            return feats[0] if len(feats) == 1 else feats

    return Extractor().eval()


def feature_dims(name: str, layers: list[str | None], image_size: int = 224) -> list[int]:
    """Feature dimension of each layer (None: the penultimate one), computed without weights."""
    import torch

    if layers == [None]:
        check_model(name)
        return [modelinfo.models()[name].feature_dim]
    model = build(name, device="meta")
    extractor = feature_extractor(model, name, list(layers))
    device = next(model.parameters()).device
    with torch.no_grad():
        out = extractor(torch.zeros(1, 3, image_size, image_size, device=device))
    outs = out if isinstance(out, tuple) else (out,)
    return [int(o.shape[1]) for o in outs]


def feature_dim(name: str, layer: str | None = None, image_size: int = 224) -> int:
    return feature_dims(name, [layer], image_size)[0]
