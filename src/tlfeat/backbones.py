"""The model registry: every torchvision classifier, and how to cut it at a feature layer.

One entry per architecture family says where its final classification layer sits (`head`); the
penultimate features are that layer's input. Everything else (weights entries, preprocessing,
metadata) comes from torchvision's weights enums, never re-typed here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from tlfeat.errors import TlfeatError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# The architectures that transfer-learning studies compare; `tlfeat models` lists these first.
STUDIED = (
    "alexnet",
    "vgg16",
    "vgg19",
    "resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
    "densenet161",
    "densenet169",
    "googlenet",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "squeezenet1_1",
    "convnext_tiny",
)


@dataclass(frozen=True)
class Family:
    """How one architecture family ends: the dotted name of its final classifier module."""

    prefix: str
    head: str
    # SqueezeNet classifies with a 1x1 conv over the last feature map; its "penultimate features"
    # are that conv's input, globally average pooled.
    conv_head: bool = False


_FAMILIES: dict[str, Family] = {}


def _register(prefix: str, head: str, conv_head: bool = False) -> None:
    if prefix in _FAMILIES:
        raise ValueError(f"architecture family {prefix!r} registered twice")
    _FAMILIES[prefix] = Family(prefix, head, conv_head)


_register("alexnet", "classifier.6")
_register("vgg", "classifier.6")
_register("resnet", "fc")
_register("resnext", "fc")
_register("wide_resnet", "fc")
_register("regnet", "fc")
_register("shufflenet", "fc")
_register("googlenet", "fc")
_register("inception", "fc")
_register("densenet", "classifier")
_register("mobilenet_v2", "classifier.1")
_register("mobilenet_v3", "classifier.3")
_register("mnasnet", "classifier.1")
_register("efficientnet", "classifier.1")
_register("squeezenet", "classifier.1", conv_head=True)
_register("convnext", "classifier.2")
_register("maxvit", "classifier.5")
_register("swin", "head")
_register("vit", "heads.head")


@cache
def available_models() -> tuple[str, ...]:
    """Every torchvision classification model name, studied ones first."""
    import torchvision.models as tvm

    names = set(tvm.list_models(module=tvm))
    rest = sorted(n for n in names if n not in STUDIED)
    return tuple(n for n in STUDIED if n in names) + tuple(rest)


def family(name: str) -> Family:
    check_model(name)
    # Longest prefix wins (mobilenet_v2 vs mobilenet_v3 share "mobilenet").
    for prefix in sorted(_FAMILIES, key=len, reverse=True):
        if name.startswith(prefix):
            return _FAMILIES[prefix]
    raise TlfeatError(f"model {name!r} has no registered head; add its family in tlfeat/backbones.py")


def check_model(name: str) -> None:
    models = available_models()
    if name not in models:
        raise TlfeatError(
            f"unknown model {name!r}.{did_you_mean(name, list(models))} Run `tlfeat models` to list the valid names."
        )


def weights_enum(name: str):  # type: ignore[no-untyped-def]
    """torchvision's weights enum class for a model."""
    from torchvision.models import get_model_weights

    check_model(name)
    return get_model_weights(name)


def default_weights_id(name: str) -> str:
    """IMAGENET1K_V1 where it exists: the original weights that transfer studies used and that
    mirrors carry; otherwise torchvision's DEFAULT entry."""
    enum = weights_enum(name)
    return "IMAGENET1K_V1" if "IMAGENET1K_V1" in enum.__members__ else enum.DEFAULT.name


def weights_entry(name: str, weights_id: str | None):  # type: ignore[no-untyped-def]
    """The torchvision weights entry `weights_id` (None: the tlfeat default) of a model."""
    enum = weights_enum(name)
    wid = weights_id or default_weights_id(name)
    if wid not in enum.__members__:
        valid = ", ".join(enum.__members__)
        raise TlfeatError(f"model {name!r} has no weights entry {wid!r}; valid entries: {valid}")
    return enum[wid]


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
    """Named modules that `--layer` accepts: containers and blocks, not single ops."""
    return [n for n, m in model.named_modules() if n and len(list(m.children())) > 0]


class _Stop(Exception):
    """Raised by the layer hook to stop the forward pass once the wanted layer has run."""


def feature_extractor(model: nn.Module, name: str, layer: str | None = None) -> nn.Module:
    """Wrap `model` so that it returns (n, d) features: the head's input, or `layer` pooled."""
    from torch import nn

    fam = family(name)

    class Extractor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.layer = layer
            self._captured: torch.Tensor | None = None
            if layer is None:
                if fam.conv_head:
                    # The model flattens whatever its classifier returns: pool before that.
                    model.classifier = nn.AdaptiveAvgPool2d(1)
                else:
                    parent, child = get_submodule_parent(model, fam.head)
                    setattr(parent, child, nn.Identity())
            else:
                try:
                    target = model.get_submodule(layer)
                except AttributeError as exc:
                    hint = did_you_mean(layer, layer_names(model))
                    raise TlfeatError(
                        f"model {name!r} has no layer {layer!r}.{hint} "
                        f"Run `tlfeat models --layers {name}` to list them."
                    ) from exc
                target.register_forward_hook(self._hook)

        def _hook(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._captured = output
            raise _Stop

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.layer is None:
                out = self.model(x)
            else:
                try:
                    self.model(x)
                except _Stop:
                    pass
                out, self._captured = self._captured, None
                assert out is not None  # the hook always runs before _Stop
            if out.ndim == 4:  # (n, c, h, w): global average pooling
                out = out.mean(dim=(2, 3))
            elif out.ndim == 3:  # (n, tokens, c): average the tokens
                out = out.mean(dim=1)
            return out.flatten(1)

    return Extractor().eval()


def feature_dim(name: str, layer: str | None = None, image_size: int = 224) -> int:
    """Feature dimension of the default (penultimate) layer or `layer`, computed without weights."""
    import torch

    model = build(name, device="meta")
    if layer is None:
        fam = family(name)
        head = model.get_submodule(fam.head)
        return int(head.in_channels if fam.conv_head else head.in_features)
    extractor = feature_extractor(model, name, layer)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = extractor(torch.zeros(1, 3, image_size, image_size, device=device))
    return int(out.shape[1])
