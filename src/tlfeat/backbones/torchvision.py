"""torchvision's classifiers: a bare model name (`resnet50`) or `torchvision:resnet50`.

Names, weights entries and preprocessing come from torchvision's weights enums (through `modelinfo`,
which reads them without torch where it can). The penultimate features are the input of each
family's final classification layer. Earlier layers are cut with torchvision's own
`create_feature_extractor`, which prunes the graph after the last layer asked for, so the rest of
the network is neither run nor exported, and several layers come from one forward pass.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache
from typing import TYPE_CHECKING, Any

from tlfeat import config, modelinfo
from tlfeat.backbones.base import PENULTIMATE, Backbone, Located, ModelInfo, Source, WeightsInfo
from tlfeat.errors import TlfeatError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# Auxiliary heads only matter for training from scratch; their absence keeps the state dict of the
# pretrained weights loadable (torchvision drops them the same way when it loads these weights).
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


class TorchvisionSource(Source):
    prefix = "torchvision"
    package = "torchvision"

    def names(self) -> list[str]:
        names = set(modelinfo.names())
        return [n for n in modelinfo.STUDIED if n in names] + sorted(names - set(modelinfo.STUDIED))

    def check(self, name: str) -> None:
        known = modelinfo.names()
        if name not in known:
            raise TlfeatError(
                f"unknown model {name!r}.{did_you_mean(name, list(known))} Run `tlfeat models` to list the valid names."
            )

    def info(self, name: str) -> ModelInfo:
        return modelinfo.info(name)

    def feature_dim(self, backbone: Backbone) -> int:
        return modelinfo.feature_dim(backbone.name, lambda: _penultimate_dim(backbone.name))

    # ---- weights files: torch's hub cache, named by torchvision's file name (with its hash prefix)

    def locate(self, name: str, entry: WeightsInfo, verify: bool = True) -> Located | None:
        from tlfeat import offline

        hub_file = hub_checkpoints() / entry.filename
        if not hub_file.is_file():
            return None
        digest = offline.sha256_known(hub_file)
        prefix = entry.sha_prefix
        if verify and prefix and not digest.startswith(prefix):
            raise TlfeatError(
                f"{hub_file} has sha256 {digest[:8]}..., expected {prefix}...; delete it and run again to fetch a good copy"
            )
        return Located(hub_file, "hub-cache", digest)

    def download(self, name: str, entry: WeightsInfo) -> Located:
        import torch

        from tlfeat import offline

        hub_file = hub_checkpoints() / entry.filename
        hub_file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, str(hub_file), hash_prefix=entry.sha_prefix, progress=False)
        return Located(hub_file, "download", offline.sha256_file(hub_file))

    def where(self, name: str, entry: WeightsInfo) -> str:
        return f"put {entry.filename} in {hub_checkpoints()}"

    def convert(self, name: str, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        return {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}

    # ---- torch

    def build(self, name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        """The architecture with untrained weights (on `device`, "meta" for shapes only)."""
        import torch
        from torchvision.models import get_model

        kwargs: dict[str, Any] = dict(BUILD_KWARGS.get(name, {}))
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

    def head(self, model: nn.Module, name: str) -> str:
        return family(name).head

    def layer_names(self, model: nn.Module, name: str, nodes: bool = False) -> list[str]:
        if nodes:
            return graph_nodes(model)
        return super().layer_names(model, name)

    def check_layers(self, backbone: Backbone, layers: list[str]) -> None:
        check_layers(backbone.name, layers)

    def extractor(self, model: nn.Module, name: str, layers: list[str | None], pool: str | None) -> nn.Module:
        """The head is dropped, then torchvision's `create_feature_extractor` keeps only the graph up to
        the deepest layer asked for."""
        from torchvision.models.feature_extraction import create_feature_extractor

        from tlfeat.backbones import cut

        _drop_head(model, name)
        final = _headless_nodes(name)[0][-1]
        nodes = {final if layer is None else layer: layer or PENULTIMATE for layer in layers}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = create_feature_extractor(model, return_nodes=nodes)
        order = [layer or PENULTIMATE for layer in layers]

        def forward(graph: Any, x: Any) -> list[Any]:
            out = graph(x)
            return [cut.pool_map(out[k]) for k in order]

        return cut.Extractor(graph, forward).eval()

    def blocks(self, model: nn.Module, name: str) -> list[list[str]]:
        """Only blocks with parameters count. Leading single layers (a ResNet's conv1 and bn1) form one
        stem block; layers of the classifier before its head (VGG's fc6, fc7) form the last block."""
        from tlfeat.backbones import cut

        head = family(name).head
        head_top = head.split(".")[0]
        out: list[list[str]] = []
        stem: list[str] = []
        for child_name, child in model.named_children():
            if child_name == head:
                continue
            if child_name == head_top:  # a classifier Sequential that contains the head
                out.append([f"{child_name}.{n}" for n, _ in child.named_children() if f"{child_name}.{n}" != head])
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
        return [b for b in out if cut.has_params(model, b)]


def hub_checkpoints() -> Any:
    """torch's hub cache of weights files (found without importing torch)."""
    return config.torch_home() / "checkpoints"


def family(name: str) -> modelinfo.Family:
    fam = modelinfo.family_of(name)
    if fam is None:
        raise TlfeatError(f"model {name!r} has no registered head; add its family in tlfeat/modelinfo.py")
    return fam


def graph_nodes(model: nn.Module) -> list[str]:
    """Every node of the model's evaluation graph; each works as `--layer` too."""
    from torchvision.models.feature_extraction import get_graph_node_names

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(get_graph_node_names(model)[1])


@cache
def _headless_nodes(name: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """(graph nodes, block names) of `name` without its head: tracing costs a second, so once per model."""
    model = SOURCE.build(name, device="meta")
    _drop_head(model, name)
    blocks = [n for n, m in model.named_modules() if n and len(list(m.children())) > 0]
    return tuple(graph_nodes(model)), frozenset(blocks)


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

    from tlfeat.backbones.cut import parent_of

    fam = family(name)
    if fam.conv_head:
        setattr(model, "classifier", nn.AdaptiveAvgPool2d(1))  # noqa: B010 - the model flattens what it returns
    elif not isinstance(model.get_submodule(fam.head), nn.Identity):
        parent, child = parent_of(model, fam.head)
        setattr(parent, child, nn.Identity())


def _penultimate_dim(name: str) -> int:
    """The input size of the head, read from the architecture built on the meta device (this model only)."""
    from tlfeat.backbones.cut import in_features

    return in_features(SOURCE.build(name, device="meta").get_submodule(family(name).head))


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


SOURCE = TorchvisionSource()
