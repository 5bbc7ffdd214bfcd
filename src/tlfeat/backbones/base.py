"""What a backbone source declares, the registry of sources, and `Backbone`: a model name resolved once.

A model is named `source:name`: `timm:convnext_tiny`, `open_clip:ViT-B-32/laion2b_s34b_b79k`,
`hf:facebook/dinov2-small`, `custom:package.module:function`. A bare name is torchvision's, so every
name (and every cache key made from it) means what it meant before sources existed. A source knows
its names, its weights entries and where their files are found, the preprocessing each entry was
trained with, how to build the network, where to cut it for features, and its blocks and head for
fine-tuning. Nothing in this module imports torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tlfeat.errors import TlfeatError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

    from tlfeat.preprocess import Preprocessing

log = logging.getLogger(__name__)

# The registry: a name's prefix -> the module holding its source (imported when a name uses it).
# Adding a source is one module defining `SOURCE = MySource()` and one line here.
SOURCES: dict[str, str] = {
    "torchvision": "tlfeat.backbones.torchvision",
    "timm": "tlfeat.backbones.timm",
    "open_clip": "tlfeat.backbones.open_clip",
    "hf": "tlfeat.backbones.hf",
    "custom": "tlfeat.backbones.custom",
}
DEFAULT_SOURCE = "torchvision"

PENULTIMATE = "penultimate"  # the one spelling of the default feature layer (None in code)
POOLS = ("cls", "mean", "cls+mean")  # how transformer tokens become one vector (`--pool`)
UNTRAINED = "untrained"  # compare's `MODEL:untrained`


def layer_name(layer: str | None) -> str:
    """A layer as stored in keys and files: None is the penultimate one."""
    return layer or PENULTIMATE


def parse_layers(text: str | None) -> list[str | None]:
    """`--layer a,b,penultimate` -> ["a", "b", None]; nothing -> [None]. A concatenation `a+b` (one
    feature set for `fit`) is made of its parts' files: it asks for `a` and `b`."""
    names = [part.strip() for n in (text or "").split(",") for part in n.split("+") if part.strip()]
    return [None if n == PENULTIMATE else n for n in dict.fromkeys(names)] or [None]


def split_variant(spec: str) -> tuple[str, bool]:
    """compare's `MODEL:untrained` -> (MODEL, True). Only a trailing `:untrained` is a variant, so
    `timm:resnet18:untrained` is timm's resnet18 with random weights and `timm:resnet18` is timm's."""
    if spec.endswith(":" + UNTRAINED) and spec != ":" + UNTRAINED:
        return spec[: -len(UNTRAINED) - 1], True
    return spec, False


def selects(spec: str, model: object, weights_id: object) -> bool:
    """Does `--model spec` (MODEL or MODEL:untrained) select what was computed by `model` with
    `weights_id`? MODEL:untrained selects MODEL's random-weights features and results only."""
    name, untrained = split_variant(spec)
    if model == spec:
        return True
    return model == name and (not untrained or str(weights_id or "").startswith(UNTRAINED + ":"))


def slug(spec: str) -> str:
    """A model name fit for a file name: torchvision's names unchanged, `/` and `:` as `-`, no `__`
    (which separates the parts of a cache file's name)."""
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", spec)
    text = re.sub(r"_{2,}", "_", text).strip("-") or "model"
    if len(text) > 80:
        import hashlib

        text = f"{text[:60]}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    return text


# --------------------------------------------------------------------------- what a source describes


@dataclass(frozen=True)
class WeightsInfo:
    """One weights entry: where its file comes from and the eval transform it was trained with."""

    name: str
    url: str  # the download address, or the hub id a source fetches it from
    crop_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    antialias: bool
    squash: bool = False  # resized to a square, ignoring the aspect ratio (Hugging Face's ViT processor)
    sha256: str = ""  # the full digest, where the publisher gives one

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha_prefix(self) -> str | None:
        """The published sha256, or the prefix torchvision encodes in its file names (`name-<hex>.pth`)."""
        if self.sha256:
            return self.sha256
        match = re.search(r"-([a-f0-9]{6,})\.", self.filename)
        return match.group(1) if match else None

    def preprocessing(self, fast_decode: bool = False) -> Preprocessing:
        from tlfeat.preprocess import Preprocessing

        return Preprocessing(
            self.crop_size,
            self.resize_size,
            self.mean,
            self.std,
            self.interpolation,
            self.antialias,
            fast_decode,
            squash=self.squash,
        )

    def encode(self) -> dict[str, Any]:
        """As JSON, leaving out optional fields at their defaults (the snapshot's format stays)."""
        out = asdict(self)
        for f in fields(self):
            if f.name in ("squash", "sha256") and out[f.name] == f.default:
                del out[f.name]
        return out

    @classmethod
    def decode(cls, raw: dict[str, Any]) -> WeightsInfo:
        return cls(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})


@dataclass(frozen=True)
class ModelInfo:
    name: str
    feature_dim: int | None  # of the penultimate layer (None: not read yet)
    default_weights: str
    weights: dict[str, WeightsInfo]

    def encode(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "feature_dim": self.feature_dim,
            "default_weights": self.default_weights,
            "weights": {k: w.encode() for k, w in self.weights.items()},
        }

    @classmethod
    def decode(cls, raw: dict[str, Any]) -> ModelInfo:
        weights = {k: WeightsInfo.decode(w) for k, w in raw["weights"].items()}
        return cls(raw["name"], raw.get("feature_dim"), raw["default_weights"], weights)


@dataclass(frozen=True)
class Located:
    """A weights file found on this machine, and where (for the provenance)."""

    path: Path
    source: str  # "hub-cache", "hf-cache", "registry:<pkg>==<ver>", "download", "local"
    sha256: str | None = None


class Store:
    """What was read from a library once (names, weights entries, dimensions), kept per library
    version under TLFEAT_HOME/models/ so that later commands need neither the library nor torch."""

    def __init__(self, library: str, version: str) -> None:
        from tlfeat.config import tlfeat_home

        self.path = tlfeat_home() / "models" / f"{library}-{version}.json"
        self._data: dict[str, Any] | None = None

    def data(self) -> dict[str, Any]:
        if self._data is None:
            try:
                value = json.loads(self.path.read_text())
            except (OSError, ValueError):
                value = {}
            self._data = value if isinstance(value, dict) else {}
        return self._data

    def get(self, section: str, key: str) -> Any:
        part = self.data().get(section)
        return part.get(key) if isinstance(part, dict) else None

    def put(self, section: str, key: str, value: Any) -> None:
        """Remember `value` (merged with what other processes wrote meanwhile); best effort."""
        from tlfeat import fsio

        self._data = None
        data = self.data()
        data.setdefault(section, {})[key] = value
        try:
            fsio.atomic_write(self.path, json.dumps(data, sort_keys=True))
        except (OSError, TlfeatError) as exc:  # remembering is an optimisation only
            log.debug("could not write %s: %s", self.path, exc)


class Source:
    """One model hub. Subclasses override what differs; the defaults suit any `nn.Module`."""

    prefix: ClassVar[str] = ""
    package: ClassVar[str] = ""  # the import name whose absence is one clear line
    extra: ClassVar[str] = ""  # `pip install 'tlfeat[extra]'`
    tokens: ClassVar[bool] = False  # its models may output transformer tokens (`--pool` applies)
    builds_weights: ClassVar[bool] = False  # `build` returns the pretrained network itself (custom)

    # ---- names and metadata (no torch)

    def require(self) -> None:
        if self.package and not _installed(self.package):
            raise TlfeatError(
                f"{self.prefix}: models need the {self.package} package, which is not installed; "
                f"pip install 'tlfeat[{self.extra or self.prefix}]'"
            )

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.package or self.prefix)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    def names(self) -> list[str]:
        """Every model name this source can list (may be empty where the hub cannot be listed)."""
        return []

    def check(self, name: str) -> None:
        """Raise, naming the closest valid names, unless `name` is a model of this source."""
        known = self.names()
        if name not in known:
            raise TlfeatError(
                f"unknown model {self.spell(name)!r}.{did_you_mean(name, known)} "
                f"Run `tlfeat models --source {self.prefix}` to list the valid names."
            )

    def spell(self, name: str) -> str:
        return name if self.prefix == DEFAULT_SOURCE else f"{self.prefix}:{name}"

    def info(self, name: str) -> ModelInfo:
        raise NotImplementedError

    def feature_dim(self, backbone: Backbone) -> int:
        """The penultimate layer's size: from the metadata where it says, else built on the meta device."""
        dim = self.info(backbone.name).feature_dim
        return int(dim) if dim is not None else backbone.feature_dims([None])[0]

    def pooling(self, name: str, layer: str | None, pool: str | None) -> str:
        """How `layer`'s output becomes one vector, as the cache key records it."""
        if pool is not None:
            raise TlfeatError(f"--pool applies to transformer models (timm, open_clip, hf), not {self.spell(name)}")
        return "global-average"

    def cut(self, name: str, layer: str | None) -> dict[str, Any]:
        """What the features of `layer` are, for keys beyond layer and pooling ({}: nothing more to say)."""
        return {}

    # ---- weights files

    def locate(self, name: str, entry: WeightsInfo, verify: bool = True) -> Located | None:
        """The entry's file in this source's own cache, checked where a digest is published; no network."""
        return None

    def download(self, name: str, entry: WeightsInfo) -> Located:
        raise TlfeatError(f"{self.spell(name)}: this source cannot download weights")

    def where(self, name: str, entry: WeightsInfo) -> str:
        """Where `locate` looks, for the message that says the weights are missing."""
        return "its hub cache"

    def load(self, name: str, path: Path) -> nn.Module | None:
        """The network with the weights of `path` loaded by the library's own loader, where the library
        renames tensors as it loads (transformers); None: tlfeat loads the state dict itself."""
        return None

    def convert(self, name: str, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """A file's tensors under `model`'s parameter names (most files need nothing)."""
        return state

    # ---- torch

    def build(self, name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        raise NotImplementedError

    def head(self, model: nn.Module, name: str) -> str:
        """Dotted name of the final classification layer (replaced for fine-tuning, dropped for features)."""
        raise NotImplementedError

    def extractor(self, model: nn.Module, name: str, layers: list[str | None], pool: str | None) -> nn.Module:
        """A module returning one (n, d) tensor per layer (a tensor for one layer, a tuple for several)."""
        raise NotImplementedError

    def layer_names(self, model: nn.Module, name: str, nodes: bool = False) -> list[str]:
        """What `--layer` accepts for this model."""
        return [n for n, m in model.named_modules() if n and len(list(m.children())) > 0]

    def check_layers(self, backbone: Backbone, layers: list[str]) -> None:
        valid = self.layer_names(backbone.build(device="meta"), backbone.name)
        for layer in layers:
            if layer not in valid:
                raise TlfeatError(
                    f"model {backbone.spec!r} has no layer {layer!r}.{did_you_mean(layer, valid)} "
                    f"Run `tlfeat models --layers {backbone.spec}` to list them."
                )

    def check_request(self, backbone: Backbone, image_size: int, pool: str | None) -> None:
        """Refuse, before any work, what the network cannot run: `--pool` where it outputs feature maps
        (its extractor says so, built on the meta device)."""
        if pool is not None and self.tokens:
            self.extractor(backbone.build(device="meta"), backbone.name, [None], pool)

    def blocks(self, model: nn.Module, name: str) -> list[list[str]]:
        """The blocks before the head in forward order (what `freeze:k` and discriminative rates count)."""
        from tlfeat.backbones import cut

        return cut.top_level_blocks(model, self.head(model, name))

    def replace_head(self, model: nn.Module, name: str, n_classes: int, seed: int = 0) -> None:
        from tlfeat.backbones import cut

        cut.new_linear_head(model, self.head(model, name), n_classes, seed)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


@cache
def source(prefix: str) -> Source:
    if prefix not in SOURCES:
        raise TlfeatError(f"unknown model source {prefix!r}; valid: {', '.join(SOURCES)}")
    module = importlib.import_module(SOURCES[prefix])
    return module.SOURCE  # type: ignore[no-any-return]


def split_source(spec: str) -> tuple[str, str]:
    """`timm:convnext_tiny` -> ("timm", "convnext_tiny"); a bare name -> ("torchvision", name)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in SOURCES:
        return prefix, rest
    return DEFAULT_SOURCE, spec


# --------------------------------------------------------------------------- a resolved model


@dataclass(frozen=True)
class Backbone:
    """A model name resolved once: its source and everything a stage asks about it."""

    spec: str  # as the user wrote it; what keys and records store
    name: str  # within its source
    source: Source = field(compare=False)

    @property
    def slug(self) -> str:
        return slug(self.spec)

    @property
    def info(self) -> ModelInfo:
        return self.source.info(self.name)

    @property
    def default_weights(self) -> str:
        return self.info.default_weights

    def weights_entry(self, weights_id: str | None = None) -> WeightsInfo:
        """The weights entry `weights_id` (None: tlfeat's default for this model)."""
        info = self.info
        wid = weights_id or info.default_weights
        if wid not in info.weights:
            raise TlfeatError(
                f"model {self.spec!r} has no weights entry {wid!r}; valid entries: {', '.join(info.weights)}"
            )
        return info.weights[wid]

    def preprocessing(
        self, weights_id: str | None = None, image_size: int | None = None, fast_decode: bool = False
    ) -> Preprocessing:
        """The weights entry's own eval transform, optionally scaled to crop `image_size`."""
        return self.weights_entry(weights_id).preprocessing(fast_decode).scaled(image_size)

    def pooling(self, layer: str | None = None, pool: str | None = None) -> str:
        if pool is not None and pool not in POOLS:
            raise TlfeatError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
        return self.source.pooling(self.name, layer, pool)

    def cut(self, layer: str | None) -> dict[str, Any]:
        return self.source.cut(self.name, layer)

    def build(self, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        self.source.require()
        return self.source.build(self.name, device, num_classes)

    def head(self, model: nn.Module) -> str:
        return self.source.head(model, self.name)

    def feature_extractor(
        self, model: nn.Module, layers: list[str | None] | str | None = None, pool: str | None = None
    ) -> nn.Module:
        wanted = layers if isinstance(layers, list) else [layers]
        for layer in wanted:
            self.pooling(layer, pool)
        named = [layer for layer in wanted if layer is not None]
        if named:
            self.check_layers(named)
        return self.source.extractor(model, self.name, list(wanted), pool)

    def feature_dims(self, layers: list[str | None], image_size: int = 224, pool: str | None = None) -> list[int]:
        """Feature dimension of each layer, computed without weights (on the meta device)."""
        import torch

        if layers == [None] and pool is None:
            dim = self.source.info(self.name).feature_dim
            if dim is not None:
                return [int(dim)]
        model = self.build(device="meta")
        extractor = self.feature_extractor(model, list(layers), pool)
        device = next(iter(model.parameters())).device
        with torch.no_grad():
            out = extractor(torch.zeros(1, 3, image_size, image_size, device=device))
        outs = out if isinstance(out, tuple) else (out,)
        return [int(o.shape[1]) for o in outs]

    def feature_dim(self, layer: str | None = None, image_size: int = 224) -> int:
        return self.feature_dims([layer], image_size)[0]

    def layer_names(self, model: nn.Module | None = None, nodes: bool = False) -> list[str]:
        return self.source.layer_names(model if model is not None else self.build(device="meta"), self.name, nodes)

    def check_request(self, image_size: int, pool: str | None) -> None:
        self.source.check_request(self, image_size, pool)

    def check_layers(self, layers: list[str]) -> None:
        self.source.check_layers(self, layers)

    def blocks(self, model: nn.Module) -> list[list[str]]:
        return self.source.blocks(model, self.name)

    def replace_head(self, model: nn.Module, n_classes: int, seed: int = 0) -> None:
        self.source.replace_head(model, self.name, n_classes, seed)

    def with_spec(self, spec: str) -> Backbone:
        return replace(self, spec=spec)


@cache
def resolve(spec: str) -> Backbone:
    """Parse a model name once: its source, checked that it knows the name."""
    prefix, name = split_source(str(spec).strip())
    if not name:
        raise TlfeatError(f"model name {spec!r} names no model; e.g. resnet50 or timm:convnext_tiny")
    src = source(prefix)
    try:
        src.check(name)
    except TlfeatError as exc:
        if prefix != DEFAULT_SOURCE:
            raise
        raise _unknown_source(str(spec).strip()) or exc from None
    return Backbone(spec, name, src)


def _unknown_source(spec: str) -> TlfeatError | None:
    """`Timm:resnet18`, `foo:bar`: a prefix that is no source (and no torchvision model either)."""
    head, sep, rest = spec.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", head) or head in source(DEFAULT_SOURCE).names():
        return None
    others = [p for p in SOURCES if p != DEFAULT_SOURCE]
    if head.lower() in SOURCES:
        return TlfeatError(f"unknown model source {head!r} (source names are lower case); use {head.lower()}:{rest}")
    return TlfeatError(
        f"unknown model source {head!r}; valid: {', '.join(others)} (PREFIX:NAME), or a torchvision name "
        "without a prefix." + did_you_mean(head, others)
    )
