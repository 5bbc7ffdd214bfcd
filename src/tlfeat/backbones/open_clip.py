"""open_clip's image towers: `open_clip:ViT-B-32/laion2b_s34b_b79k` (architecture/pretrained tag), or
`open_clip:hf-hub:ORG/NAME` (a repository holding `open_clip_config.json` and its weights).

The penultimate features are the image embedding `encode_image` returns: after the projection, the
input of CLIP's zero-shot classifier (the dot product with the class prompts' text embeddings).
`--layer pre-projection` takes the tower's pooled output before the projection (ViT towers), and the
key says which (`cut`). Earlier blocks by name (`transformer.resblocks.5`), from the tower's own
`forward_intermediates`; `--pool` on their tokens. Only the image tower is built: the text tower's
tensors in a checkpoint are left out. Preprocessing is the tag's (or the repository's) preprocess
config: resize the shortest side to the image size, centre crop, CLIP's mean/std.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import TYPE_CHECKING, Any

from tlfeat import config, offline, progress
from tlfeat.backbones import hub
from tlfeat.backbones.base import Backbone, Located, ModelInfo, Source, Store, WeightsInfo
from tlfeat.errors import TlfeatError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

PRE_PROJECTION = "pre-projection"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_HUB = "hf-hub:"


class OpenClipSource(Source):
    prefix = "open_clip"
    package = "open_clip"
    extra = "open_clip"
    tokens = True

    def version(self) -> str:
        import importlib.metadata

        try:
            return importlib.metadata.version("open_clip_torch")
        except importlib.metadata.PackageNotFoundError:
            return "none"

    def _catalog(self) -> list[str]:
        store = _store(self.version())
        found = store.get("catalog", "all")
        if isinstance(found, list):
            return found
        self.require()
        progress.status(f"reading open_clip's model list (once per open_clip version: {self.version()})")
        import open_clip

        found = [f"{arch}/{tag}" for arch, tag in open_clip.list_pretrained()]
        store.put("catalog", "all", found)
        return found

    def names(self) -> list[str]:
        cached = [
            f"{HF_HUB}{r}"
            for r in hub.cached_repos()
            if (s := hub.snapshot(r)) and (s / "open_clip_config.json").is_file()
        ]
        return self._catalog() + cached

    def check(self, name: str) -> None:
        if name.startswith(HF_HUB):
            _hub_config(name[len(HF_HUB) :])
            return
        known = self._catalog()
        if name not in known:
            raise TlfeatError(
                f"unknown model 'open_clip:{name}'.{did_you_mean(name, known)} Name it ARCH/TAG "
                "(`tlfeat models --source open_clip --filter PATTERN` lists them) or hf-hub:ORG/NAME."
            )

    def info(self, name: str) -> ModelInfo:
        store = _store(self.version())
        raw = store.get("info", name) if not name.startswith(HF_HUB) else None
        if not isinstance(raw, dict):
            raw = _read_info(name).encode()
            if not name.startswith(HF_HUB):
                store.put("info", name, raw)
        return ModelInfo.decode(raw)

    def pooling(self, name: str, layer: str | None, pool: str | None) -> str:
        if pool is not None:
            return pool
        return "the tower's own" if layer in (None, PRE_PROJECTION) else "global-average"

    def cut(self, name: str, layer: str | None) -> dict[str, Any]:
        if layer is None:
            return {"cut": "image embedding (encode_image: after the projection)"}
        if layer == PRE_PROJECTION:
            return {"cut": "image tower before the projection"}
        return {}

    # ---- weights files

    def locate(self, name: str, entry: WeightsInfo, verify: bool = True) -> Located | None:
        repo, _, filename = entry.url.partition("#")
        if repo.startswith(HF_HUB):
            return hub.find(repo[len(HF_HUB) :].rstrip("/"), (filename,) if filename else WEIGHT_FILES)
        if repo.startswith(("http://", "https://")):
            path = config.open_clip_cache() / entry.filename
            if path.is_file():
                digest = offline.sha256_known(path)
                if verify and entry.sha256 and digest != entry.sha256:
                    raise TlfeatError(f"{path} has sha256 {digest[:12]}..., expected {entry.sha256[:12]}...; delete it")
                return Located(path, "hub-cache", digest)
        return None

    def download(self, name: str, entry: WeightsInfo) -> Located:
        repo, _, filename = entry.url.partition("#")
        if repo.startswith(HF_HUB):
            return hub.download(repo[len(HF_HUB) :].rstrip("/"), (filename,) if filename else WEIGHT_FILES)
        return super().download(name, entry)

    def where(self, name: str, entry: WeightsInfo) -> str:
        repo = entry.url.partition("#")[0]
        if repo.startswith(HF_HUB):
            return f"put its weights in the Hugging Face cache ({hub.repo_folder(repo[len(HF_HUB) :].rstrip('/'))})"
        return f"put {entry.filename} in {config.open_clip_cache()}"

    def convert(self, name: str, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """A CLIP checkpoint's image tower (`visual.*`) -> this wrapper's `base.*`; the text tower is left out."""
        if any(k.startswith("base.") for k in state):
            return state  # a tlfeat fine-tune (best.pt)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if not any(k.startswith("visual.") for k in state):
            raise TlfeatError("the weights file holds no image tower (no visual.* tensors)")
        return {"base." + k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}

    # ---- torch

    def build(self, name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        import torch

        from tlfeat.backbones import cut

        model_cfg, quick_gelu = _model_config(name)
        from open_clip.model import _build_vision_tower

        with torch.device(device):
            visual = _build_vision_tower(int(model_cfg["embed_dim"]), model_cfg["vision_cfg"], quick_gelu=quick_gelu)
        prefix = 1 if hasattr(visual, "class_embedding") else None
        model = cut.Headed(visual, int(model_cfg["embed_dim"]), lambda v, x: v(x), prefix)
        if num_classes is not None:
            cut.set_linear_head(model, num_classes)
        return model

    def head(self, model: nn.Module, name: str) -> str:
        return "head"

    def check_request(self, backbone: Backbone, image_size: int, pool: str | None) -> None:
        """open_clip's towers take their own image size only: the position embedding is fixed (open_clip
        resamples it only when loading a checkpoint into a tower built for another size)."""
        native = backbone.weights_entry().crop_size
        if image_size != native:
            raise TlfeatError(
                f"open_clip:{backbone.name} takes {native}x{native} images only (its position embedding is "
                f"fixed); use --image-size {native} or leave --image-size out"
            )
        super().check_request(backbone, image_size, pool)

    def layer_names(self, model: nn.Module, name: str, nodes: bool = False) -> list[str]:
        visual: Any = model.base  # type: ignore[union-attr]
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        names = [f"transformer.resblocks.{i}" for i in range(len(blocks))] if blocks is not None else []
        return ([PRE_PROJECTION] if getattr(visual, "proj", None) is not None else []) + names

    def extractor(self, model: nn.Module, name: str, layers: list[str | None], pool: str | None) -> nn.Module:
        from tlfeat.backbones import cut

        prefix: Any = model.prefix_tokens
        if pool is not None and prefix is None:
            raise TlfeatError(f"--pool applies to transformer tokens; open_clip:{name}'s tower outputs feature maps")
        names = self.layer_names(model, name)
        blocks = [layer for layer in layers if layer not in (None, PRE_PROJECTION)]
        indices = [names.index(layer) - (1 if PRE_PROJECTION in names else 0) for layer in blocks]

        def forward(m: Any, x: Any) -> list[Any]:
            v = m.base
            out: dict[Any, Any] = {}
            if pool is not None and (None in layers or PRE_PROJECTION in layers):
                tokens = _final_tokens(v, x)
                pooled = cut.pool_tokens(tokens, prefix, pool)
                out[PRE_PROJECTION] = pooled
                out[None] = pooled @ v.proj if v.proj is not None else pooled
            else:
                if None in layers:
                    out[None] = v(x)
                if PRE_PROJECTION in layers:
                    out[PRE_PROJECTION] = _without_projection(v, x)
            if blocks:
                got = v.forward_intermediates(
                    x, indices=indices, intermediates_only=True, stop_early=True, output_extra_tokens=pool is not None
                )
                for k, layer in enumerate(blocks):
                    spatial = got["image_intermediates"][k]
                    if pool is None:
                        out[layer] = cut.pool_map(spatial)
                    else:
                        import torch

                        extra = got["image_intermediates_prefix"][k]
                        tokens = torch.cat([extra, spatial.flatten(2).transpose(1, 2)], dim=1)
                        out[layer] = cut.pool_tokens(tokens, extra.shape[1], pool)
            return [out[layer] for layer in layers]

        return cut.Extractor(model, forward).eval()

    def blocks(self, model: nn.Module, name: str) -> list[list[str]]:
        """Stem (patch embedding, class and position embeddings), each residual block, then the final
        norm with the projection (a parameter of the tower itself, used last)."""
        from tlfeat.backbones import cut

        blocks = cut.top_level_blocks(model, "head")
        if blocks and "base.proj" in blocks[0]:
            blocks[0].remove("base.proj")
            blocks[-1].append("base.proj")
        return blocks

    def replace_head(self, model: nn.Module, name: str, n_classes: int, seed: int = 0) -> None:
        from tlfeat.backbones import cut

        cut.set_linear_head(model, n_classes, seed)


def _without_projection(visual: Any, x: Any) -> Any:
    """The tower's pooled output before `proj` (the tower's own forward with the projection lifted)."""
    if getattr(visual, "proj", None) is None:
        raise TlfeatError("pre-projection: this open_clip tower has no projection to take off")
    proj = visual.proj
    visual.proj = None
    try:
        return visual(x)
    finally:
        visual.proj = proj


def _final_tokens(visual: Any, x: Any) -> Any:
    """All tokens after the last block and the final norm (what the tower's pooling reads)."""
    got = visual.forward_intermediates(x, indices=1, intermediates_only=False, output_extra_tokens=True)
    import torch

    spatial, extra = got["image_intermediates"][-1], got["image_intermediates_prefix"][-1]
    tokens = torch.cat([extra, spatial.flatten(2).transpose(1, 2)], dim=1)
    return visual.ln_post(tokens)


@cache
def _store(version: str) -> Store:
    return Store("open_clip", version)


def _hub_config(repo: str) -> dict[str, Any]:
    snap = hub.snapshot(repo)
    if snap is None and not config.hub_offline():
        hub.download(repo, ("open_clip_config.json",))
        snap = hub.snapshot(repo)
    if snap is None or not (snap / "open_clip_config.json").is_file():
        raise TlfeatError(
            f"open_clip:{HF_HUB}{repo}: no open_clip_config.json in the Hugging Face cache ({hub.repo_folder(repo)})"
        )
    value = json.loads((snap / "open_clip_config.json").read_text())
    if not isinstance(value, dict) or "model_cfg" not in value:
        raise TlfeatError(f"{snap / 'open_clip_config.json'} has no model_cfg")
    return value


def _model_config(name: str) -> tuple[dict[str, Any], bool]:
    """(model config, quick_gelu) of an `ARCH/TAG` or `hf-hub:` name."""
    if name.startswith(HF_HUB):
        cfg = _hub_config(name[len(HF_HUB) :])["model_cfg"]
        return cfg, bool(cfg.get("quick_gelu", False))
    import open_clip

    arch, _, tag = name.partition("/")
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise TlfeatError(f"open_clip has no model config {arch!r}")
    pretrained = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    return cfg, bool(cfg.get("quick_gelu", False) or pretrained.get("quick_gelu", False))


def _transform(wid: str, url: str, size: int, pre: dict[str, Any], sha256: str = "") -> WeightsInfo:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise TlfeatError(f"open_clip resize_mode {mode!r} is not supported (shortest and squash are)")
    return WeightsInfo(
        name=wid,
        url=url,
        crop_size=size,
        resize_size=size,
        mean=tuple(float(m) for m in pre.get("mean") or OPENAI_DATASET_MEAN),
        std=tuple(float(s) for s in pre.get("std") or OPENAI_DATASET_STD),
        interpolation=str(pre.get("interpolation") or "bicubic"),
        antialias=True,
        squash=mode == "squash",
        sha256=sha256,
    )


def _read_info(name: str) -> ModelInfo:
    """The weights entry and preprocessing of a name, from open_clip's tables or the repository's config."""
    if name.startswith(HF_HUB):
        repo = name[len(HF_HUB) :]
        cfg = _hub_config(repo)
        size = cfg["model_cfg"]["vision_cfg"].get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        snap = hub.snapshot(repo)
        wid = f"rev:{snap.name[:12]}" if snap is not None else "hf-hub"
        entry = _transform(wid, f"{HF_HUB}{repo}", int(size), cfg.get("preprocess_cfg", {}))
        return ModelInfo(name, int(cfg["model_cfg"]["embed_dim"]), wid, {wid: entry})
    import open_clip

    arch, _, tag = name.partition("/")
    model_cfg = open_clip.get_model_config(arch) or {}
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    tags = [tag] if tag else [t for a, t in open_clip.list_pretrained() if a == arch]
    weights = {}
    for t in tags or ["none"]:
        pre = {**model_cfg.get("preprocess_cfg", {}), **(open_clip.get_pretrained_cfg(arch, t) or {})}
        if pre.get("hf_hub"):
            url = f"{HF_HUB}{pre['hf_hub']}"
            sha = ""
        else:
            url = str(pre.get("url") or "")
            parts = url.split("/")
            sha = parts[-2] if len(parts) > 2 and len(parts[-2]) == 64 else ""  # OpenAI's URLs carry it
        weights[t] = _transform(t, url, int(size), pre, sha)
    return ModelInfo(name, int(model_cfg.get("embed_dim") or 0) or None, next(iter(weights)), weights)


SOURCE = OpenClipSource()
