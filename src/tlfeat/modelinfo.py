"""What tlfeat needs to know about each torchvision model without importing torch.

Names, weights entries (file name, hash prefix, preprocessing) and feature dimensions all come
from torchvision's weights enums. Importing torchvision costs seconds, so `models.json` holds a
snapshot of them made by `python -m tlfeat.modelinfo` for one torchvision version; a test checks
it against torchvision itself. With another torchvision installed, only what a command needs is
read, for the models it names: a model's enum (no model is constructed for that), and its
penultimate size (that one model built on the meta device). What was read is kept per torchvision
version under TLFEAT_HOME/models/, so each is read once per machine.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tlfeat.backbones.base import ModelInfo, Store, WeightsInfo

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


def read_enum(name: str) -> ModelInfo:
    """One model's weights entries from its torchvision enum: no model is constructed."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(name)
    default = "IMAGENET1K_V1" if "IMAGENET1K_V1" in enum.__members__ else enum.DEFAULT.name
    return ModelInfo(name, None, default, {w.name: _weights_info(w) for w in enum})


def from_torchvision(names: list[str] | None = None) -> dict[str, ModelInfo]:
    """Every classification model's metadata and penultimate size from torchvision (imports torch;
    builds each model on the meta device: seconds). What `models.json` is made of."""
    import torchvision.models as tvm

    from tlfeat.backbones.torchvision import _penultimate_dim

    out = {}
    for name in names or sorted(tvm.list_models(module=tvm)):
        if family_of(name) is None:
            continue
        info = read_enum(name)
        out[name] = ModelInfo(name, _penultimate_dim(name), info.default_weights, info.weights)
    return out


def torchvision_version() -> str | None:
    try:
        return importlib.metadata.version("torchvision").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def _snapshot() -> dict[str, Any] | None:
    """The shipped snapshot, when it was made from the installed torchvision (or none is installed)."""
    try:
        snapshot = json.loads(SNAPSHOT.read_text())
    except (OSError, ValueError):
        return None
    installed = torchvision_version()
    if installed is None or snapshot.get("torchvision") == installed:
        return dict(snapshot)
    return None


@cache
def _store() -> Store:
    return Store("torchvision", torchvision_version() or "none")


def origin() -> str:
    """Where the table of models comes from, in words (`tlfeat models` says it)."""
    snap = _snapshot()
    if snap is not None:
        return f"torchvision {snap.get('torchvision')}: the snapshot shipped with tlfeat"
    return (
        f"torchvision {torchvision_version()} (the snapshot is of {_shipped_version()}): its weights enums, "
        f"read for the models named and kept in {_store().path}"
    )


def _shipped_version() -> str:
    try:
        return str(json.loads(SNAPSHOT.read_text()).get("torchvision"))
    except (OSError, ValueError):
        return "none"


@cache
def names() -> tuple[str, ...]:
    """Every torchvision classifier tlfeat knows a head for (no model constructed)."""
    snap = _snapshot()
    if snap is not None:
        return tuple(snap["models"])
    store = _store()
    known = store.get("names", "all")
    if isinstance(known, list):
        return tuple(known)
    import torchvision.models as tvm

    log.info("torchvision %s differs from the model snapshot's; listing its models once", torchvision_version())
    found = [n for n in sorted(tvm.list_models(module=tvm)) if family_of(n) is not None]
    store.put("names", "all", found)
    return tuple(found)


@cache
def info(name: str) -> ModelInfo:
    """One model's weights entries: the snapshot, else what was read before, else its enum (read once)."""
    snap = _snapshot()
    if snap is not None:
        return ModelInfo.decode(snap["models"][name])
    store = _store()
    raw = store.get("info", name)
    if isinstance(raw, dict):
        return ModelInfo.decode(raw)
    found = read_enum(name)
    store.put("info", name, found.encode())
    return found


def feature_dim(name: str, compute: Callable[[], int]) -> int:
    """The penultimate size: the snapshot, else what was computed before, else `compute()` (kept)."""
    dim = info(name).feature_dim
    if dim is not None:
        return int(dim)
    store = _store()
    known = store.get("dims", name)
    if isinstance(known, int):
        return known
    dim = int(compute())
    store.put("dims", name, dim)
    return dim


def models() -> dict[str, ModelInfo]:
    """Every model's entries (reads each enum where the snapshot does not match: prefer `info`)."""
    return {name: info(name) for name in names()}


def write_snapshot(path: Path = SNAPSHOT) -> None:
    import torchvision

    data = {
        "torchvision": torchvision.__version__.split("+")[0],
        "models": {name: info.encode() for name, info in from_torchvision().items()},
    }
    from tlfeat import fsio

    fsio.atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_snapshot()
    print(f"wrote {SNAPSHOT}")
