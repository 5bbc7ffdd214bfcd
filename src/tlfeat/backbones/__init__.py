"""Backbones from every model hub behind one interface: `resolve(name)` gives a `Backbone`.

Sources (one module each, registered in `base.SOURCES`): torchvision (a bare name), `timm:`,
`open_clip:`, `hf:` (Hugging Face transformers) and `custom:module:function` (a user's own
`torch.nn.Module`). The functions below take a model name, as the stages did before sources
existed; each resolves it once (cached) and asks its `Backbone`. Nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tlfeat.backbones.base import (
    PENULTIMATE,
    POOLS,
    SOURCES,
    Backbone,
    ModelInfo,
    Source,
    WeightsInfo,
    layer_name,
    parse_layers,
    resolve,
    selects,
    slug,
    source,
    split_source,
    split_variant,
)

if TYPE_CHECKING:
    from torch import nn

    from tlfeat.modelinfo import STUDIED, Family
    from tlfeat.preprocess import Preprocessing

__all__ = [
    "PENULTIMATE",
    "POOLS",
    "SOURCES",
    "STUDIED",
    "Backbone",
    "Family",
    "ModelInfo",
    "Source",
    "WeightsInfo",
    "available_models",
    "build",
    "check_layers",
    "check_model",
    "default_weights_id",
    "family",
    "feature_dim",
    "feature_dims",
    "feature_extractor",
    "get_submodule_parent",
    "graph_nodes",
    "layer_name",
    "layer_names",
    "parse_layers",
    "preprocessing",
    "resolve",
    "slug",
    "source",
    "split_source",
    "selects",
    "split_variant",
    "weights_entry",
]


def available_models(source_prefix: str = "torchvision") -> tuple[str, ...]:
    """Every model name of a source (torchvision: studied ones first), as `--model` takes it."""
    src = source(source_prefix)
    return tuple(src.spell(n) for n in src.names())


def check_model(name: str) -> None:
    resolve(name)


def family(name: str) -> Family:
    """A torchvision model's family (its head); other sources have no families."""
    from tlfeat.backbones import torchvision

    bb = resolve(name)
    if bb.source is not torchvision.SOURCE:
        raise ValueError(f"{name} is not a torchvision model")
    return torchvision.family(bb.name)


def default_weights_id(name: str) -> str:
    """IMAGENET1K_V1 where it exists (the weights transfer studies used and mirrors carry), else the
    source's default."""
    return resolve(name).default_weights


def weights_entry(name: str, weights_id: str | None) -> WeightsInfo:
    """The weights entry `weights_id` (None: the tlfeat default) of a model."""
    return resolve(name).weights_entry(weights_id)


def preprocessing(
    name: str, weights_id: str | None, image_size: int | None, fast_decode: bool = False
) -> Preprocessing:
    """The weights entry's own eval transform, optionally scaled to crop `image_size`."""
    return resolve(name).preprocessing(weights_id, image_size, fast_decode)


def build(name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
    """Build the architecture with untrained weights (on `device`, "meta" for shapes only)."""
    return resolve(name).build(device, num_classes)


def feature_extractor(
    model: nn.Module, name: str, layers: list[str | None] | str | None = None, pool: str | None = None
) -> nn.Module:
    """A module returning a tuple of (n, d) features, one per layer (None: the penultimate one); a
    single layer gives a tensor instead of a tuple."""
    return resolve(name).feature_extractor(model, layers, pool)


def feature_dims(name: str, layers: list[str | None], image_size: int = 224, pool: str | None = None) -> list[int]:
    """Feature dimension of each layer (None: the penultimate one), computed without weights."""
    bb = resolve(name)
    if layers == [None] and pool is None:
        return [bb.source.feature_dim(bb)]
    return bb.feature_dims(layers, image_size, pool)


def feature_dim(name: str, layer: str | None = None, image_size: int = 224) -> int:
    return feature_dims(name, [layer], image_size)[0]


def check_layers(name: str, layers: list[str]) -> None:
    """Raise, naming the valid layers, unless each of `layers` is a layer of `name`."""
    resolve(name).check_layers(layers)


def layer_names(model: nn.Module, name: str | None = None) -> list[str]:
    """Named modules that `--layer` accepts by their short name."""
    if name is None:
        return [n for n, m in model.named_modules() if n and len(list(m.children())) > 0]
    return resolve(name).layer_names(model)


def graph_nodes(model: nn.Module) -> list[str]:
    from tlfeat.backbones.torchvision import graph_nodes as nodes

    return nodes(model)


def get_submodule_parent(model: nn.Module, dotted: str) -> tuple[Any, str]:
    from tlfeat.backbones.cut import parent_of

    return parent_of(model, dotted)


def models_origin() -> str:
    """Where the table of torchvision models comes from (the shipped snapshot or this torchvision)."""
    from tlfeat import modelinfo

    return modelinfo.origin()


def __getattr__(name: str) -> Any:
    # torchvision's metadata module imports this package's base: read from it on first use.
    if name in ("STUDIED", "Family"):
        from tlfeat import modelinfo

        return getattr(modelinfo, name)
    raise AttributeError(f"module 'tlfeat.backbones' has no attribute {name!r}")
