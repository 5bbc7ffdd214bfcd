"""What tlfeat needs to know about each torchvision model without importing torch.

Names, weights entries (file name, hash prefix, preprocessing) and feature dimensions all come
from torchvision's weights enums. Importing torchvision costs seconds, so `models.json` holds a
snapshot of them made by `python -m tlfeat.modelinfo` for one torchvision version; a test checks
it against torchvision itself. With another torchvision installed, the enums are read live.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SNAPSHOT = Path(__file__).with_name("models.json")

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


def register_family(prefix: str, head: str, conv_head: bool = False) -> None:
    if prefix in _FAMILIES:
        raise ValueError(f"architecture family {prefix!r} registered twice")
    _FAMILIES[prefix] = Family(prefix, head, conv_head)


for _prefix, _head in (
    ("alexnet", "classifier.6"),
    ("vgg", "classifier.6"),
    ("resnet", "fc"),
    ("resnext", "fc"),
    ("wide_resnet", "fc"),
    ("regnet", "fc"),
    ("shufflenet", "fc"),
    ("googlenet", "fc"),
    ("inception", "fc"),
    ("densenet", "classifier"),
    ("mobilenet_v2", "classifier.1"),
    ("mobilenet_v3", "classifier.3"),
    ("mnasnet", "classifier.1"),
    ("efficientnet", "classifier.1"),
    ("convnext", "classifier.2"),
    ("maxvit", "classifier.5"),
    ("swin", "head"),
    ("vit", "heads.head"),
):
    register_family(_prefix, _head)
register_family("squeezenet", "classifier.1", conv_head=True)


def family_of(name: str) -> Family | None:
    # Longest prefix wins (mobilenet_v2 vs mobilenet_v3 share "mobilenet").
    for prefix in sorted(_FAMILIES, key=len, reverse=True):
        if name.startswith(prefix):
            return _FAMILIES[prefix]
    return None


@dataclass(frozen=True)
class WeightsInfo:
    name: str
    url: str
    crop_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    antialias: bool

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha_prefix(self) -> str | None:
        """The sha256 prefix torchvision encodes in a weights file name (`name-<hex>.pth`)."""
        match = re.search(r"-([a-f0-9]{6,})\.", self.filename)
        return match.group(1) if match else None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    feature_dim: int  # of the penultimate layer
    default_weights: str  # IMAGENET1K_V1 where it exists, else torchvision's DEFAULT
    weights: dict[str, WeightsInfo]


def _weights_info(entry: Any) -> WeightsInfo:
    t = entry.transforms()
    return WeightsInfo(
        name=entry.name,
        url=entry.url,
        crop_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        mean=tuple(float(m) for m in t.mean),
        std=tuple(float(s) for s in t.std),
        interpolation=str(t.interpolation.value),
        antialias=bool(t.antialias),
    )


def from_torchvision(names: list[str] | None = None) -> dict[str, ModelInfo]:
    """Read every classification model's metadata from torchvision (imports torch; seconds)."""
    import torchvision.models as tvm

    out = {}
    for name in names or sorted(tvm.list_models(module=tvm)):
        fam = family_of(name)
        if fam is None:
            continue
        enum = tvm.get_model_weights(name)
        head = _build_meta(name).get_submodule(fam.head)
        dim = int(head.in_channels if fam.conv_head else head.in_features)
        default = "IMAGENET1K_V1" if "IMAGENET1K_V1" in enum.__members__ else enum.DEFAULT.name
        out[name] = ModelInfo(name, dim, default, {w.name: _weights_info(w) for w in enum})
    return out


def _build_meta(name: str) -> Any:
    import warnings

    import torch
    from torchvision.models import get_model

    kwargs: dict[str, Any] = (
        {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return get_model(name, **kwargs)
        except NotImplementedError:
            return get_model(name, **kwargs)


def _decode(raw: dict[str, Any]) -> ModelInfo:
    weights = {
        k: WeightsInfo(**{**w, "mean": tuple(w["mean"]), "std": tuple(w["std"])}) for k, w in raw["weights"].items()
    }
    return ModelInfo(raw["name"], raw["feature_dim"], raw["default_weights"], weights)


def torchvision_version() -> str | None:
    try:
        return importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def models() -> dict[str, ModelInfo]:
    """Every model tlfeat can use: from the snapshot when it matches the installed torchvision."""
    installed = torchvision_version()
    try:
        snapshot = json.loads(SNAPSHOT.read_text())
    except (OSError, ValueError):
        snapshot = {}
    if snapshot and (installed is None or snapshot.get("torchvision") == installed.split("+")[0]):
        return {name: _decode(raw) for name, raw in snapshot["models"].items()}
    log.info(
        "torchvision %s differs from the model snapshot's %s; reading the enums", installed, snapshot.get("torchvision")
    )
    return from_torchvision()


def write_snapshot(path: Path = SNAPSHOT) -> None:
    import torchvision

    data = {
        "torchvision": torchvision.__version__.split("+")[0],
        "models": {name: asdict(info) for name, info in from_torchvision().items()},
    }
    from tlfeat import fsio

    fsio.atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_snapshot()
    print(f"wrote {SNAPSHOT}")
