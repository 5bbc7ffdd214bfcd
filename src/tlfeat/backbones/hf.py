"""Hugging Face transformers vision models: `hf:facebook/dinov2-small`, `hf:google/vit-base-patch16-224`,
`hf:openai/clip-vit-base-patch32` (its image tower), `hf:facebook/convnext-tiny-224`, or `hf:PATH` (a
folder written by `save_pretrained`).

Everything but the network is read from the repository's own JSON files, without transformers:
`config.json` (the architecture, the feature size) and `preprocessor_config.json` (the image
processor's resize, crop, resample and mean/std: the preprocessing the weights were trained with).
Files come from Hugging Face's hub cache (HF_HOME), a local folder, or the hub when online; a file
whose content disagrees with the digest the hub published (its blob name) is refused. The weights
entry is the snapshot's revision (`rev:<commit>`), or `file:<sha256>` of a local folder's weights.

Features: `pooler_output` where the model's classifier reads it (DINOv2, CLIP, ConvNeXt), the CLS
token of `last_hidden_state` for ViT (what ViTForImageClassification reads); `--pool cls|mean|cls+mean`
on the last layer's tokens, register tokens left out of the mean; earlier layers by their module name
(`encoder.layer.3`), from `hidden_states`. Fine-tuning puts a new linear head on those features.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlfeat import config, offline
from tlfeat.backbones import hub
from tlfeat.backbones.base import Located, ModelInfo, Source, WeightsInfo
from tlfeat.errors import TlfeatError, WeightsNotFound, first_line

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILES = ("config.json", "preprocessor_config.json")
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
CLS_MODELS = ("vit", "deit")  # whose classifier reads the CLS token of last_hidden_state, not the pooler
STACKS = ("layer", "layers", "stages")


class HFSource(Source):
    prefix = "hf"
    package = "transformers"
    tokens = True

    def names(self) -> list[str]:
        """The vision models in the Hugging Face cache (any other hub id works once it is fetched)."""
        out = []
        for repo in hub.cached_repos():
            snap = hub.snapshot(repo)
            if snap is None:
                continue
            cfg = _json(snap / "config.json")
            if (
                isinstance(cfg, dict)
                and _vision_config(cfg) is not None
                and (snap / "preprocessor_config.json").is_file()
            ):
                out.append(repo)
        return out

    def check(self, name: str) -> None:
        folder(name)

    def info(self, name: str) -> ModelInfo:
        return _info(name, str(folder(name)))

    def pooling(self, name: str, layer: str | None, pool: str | None) -> str:
        if pool is not None:
            return pool
        if layer is not None:
            return "global-average"
        model_type = _vision_config(_json(folder(name) / "config.json") or {}) or {}
        return "cls" if model_type.get("model_type") in CLS_MODELS else "pooler_output"

    # ---- weights files

    def locate(self, name: str, entry: WeightsInfo, verify: bool = True) -> Located | None:
        local = Path(name).expanduser()
        if local.is_dir():
            found = hub.find(name, WEIGHT_FILES, folder=local)
            if found is None:  # a local folder: nothing to download, nowhere else to look
                raise WeightsNotFound(
                    f"{local} has no weights file ({' or '.join(WEIGHT_FILES)}); save_pretrained writes one, "
                    "or give one with --weights FILE (or use --untrained for random weights)"
                )
            return found
        return hub.find(name, WEIGHT_FILES)

    def download(self, name: str, entry: WeightsInfo) -> Located:
        return hub.download(name, WEIGHT_FILES)

    def where(self, name: str, entry: WeightsInfo) -> str:
        return f"put {name}'s model.safetensors in the Hugging Face cache ({hub.repo_folder(name)})"

    def load(self, name: str, path: Path) -> nn.Module | None:
        """transformers' own `from_pretrained` (it renames a checkpoint's tensors to the installed
        version's modules) from a folder of the config and the checked file; every tensor of the
        model must be in the file (a classification head or a CLIP's text tower may be left over)."""
        import tempfile

        from tlfeat.weights import is_safetensors

        if not is_safetensors(path) and _holds_wrapper(path):
            return None  # a tlfeat fine-tune (best.pt): loaded as a state dict
        _check_readable(name, path)
        with tempfile.TemporaryDirectory(prefix="tlfeat-hf-") as tmp:
            for extra in ("config.json",):
                (Path(tmp) / extra).symlink_to((folder(name) / extra).resolve())
            weights = "model.safetensors" if is_safetensors(path) else "pytorch_model.bin"
            (Path(tmp) / weights).symlink_to(Path(path).resolve())
            try:
                return _make(Path(tmp), pretrained=True)
            except TlfeatError as exc:
                raise TlfeatError(f"{path} does not fit hf:{name}: {exc}") from exc

    def convert(self, name: str, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """A checkpoint of the bare model, of a *ForImageClassification model (its `dinov2.` prefix and
        classifier), or of a whole CLIP (its image tower kept) -> this wrapper's `base.` names."""
        if any(k.startswith("base.") for k in state):
            return state  # a tlfeat fine-tune (best.pt)
        base: Any = model.base
        own = set(base.state_dict())
        prefix = getattr(base, "base_model_prefix", "")
        out = {}
        for key, value in state.items():
            k = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") and key not in own else key
            if k in own:
                out["base." + k] = value
            elif not k.startswith(
                ("classifier.", "text_model.", "text_projection", "logit_scale", "visual_projection")
            ):
                out["base." + k] = value  # reported as unexpected by the caller
        return out

    # ---- torch

    def build(self, name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        import torch

        with torch.device(device):
            model = _make(folder(name))
        if num_classes is not None:
            self.replace_head(model, name, num_classes)
        return model

    def head(self, model: nn.Module, name: str) -> str:
        return "head"

    def layer_names(self, model: nn.Module, name: str, nodes: bool = False) -> list[str]:
        return [n for n, _ in _stack_layers(model)]

    def extractor(self, model: nn.Module, name: str, layers: list[str | None], pool: str | None) -> nn.Module:
        from tlfeat.backbones import cut

        wrapper: Any = model
        index = {n: i for i, (n, _) in enumerate(_stack_layers(model))}
        prefix = wrapper.prefix_tokens
        if pool is not None and prefix is None:
            raise TlfeatError(f"--pool applies to transformer tokens; hf:{name} outputs feature maps")
        default = self.pooling(name, None, pool)
        named = [layer for layer in layers if layer is not None]

        def forward(m: Any, x: Any) -> list[Any]:
            out = _run(m.base, x, hidden=bool(named))
            feats = []
            for layer in layers:
                if layer is None:
                    if pool is not None:
                        feats.append(cut.pool_tokens(out.last_hidden_state, prefix, pool))
                    elif default == "cls":
                        feats.append(out.last_hidden_state[:, 0])
                    else:
                        feats.append(out.pooler_output)
                    continue
                hidden = out.hidden_states[index[layer] + 1]  # [0] is the embeddings' output
                if hidden.ndim == 3:
                    feats.append(cut.pool_tokens(hidden, prefix or 0, pool or "mean"))
                else:
                    feats.append(cut.pool_map(hidden))
            return feats

        return cut.Extractor(model, forward).eval()

    def blocks(self, model: nn.Module, name: str) -> list[list[str]]:
        from tlfeat.backbones import cut

        return cut.top_level_blocks(model, "head")

    def replace_head(self, model: nn.Module, name: str, n_classes: int, seed: int = 0) -> None:
        from tlfeat.backbones import cut

        cut.set_linear_head(model, n_classes, seed)


def folder(name: str) -> Path:
    """The folder holding `name`'s config files: a local folder, the cached snapshot, or (online) fetched."""
    local = Path(name).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return local
    if "/" not in name or local.is_absolute() or name.startswith("."):
        raise TlfeatError(
            f"hf:{name} is neither a hub id (org/name) nor a folder with a config.json (as save_pretrained writes)"
        )
    snap = hub.snapshot(name)
    if snap is not None and (snap / "config.json").is_file():
        return snap
    if config.hub_offline():
        raise TlfeatError(
            f"hf:{name} is not in the Hugging Face cache ({hub.repo_folder(name)}) and tlfeat is offline; "
            "fetch it once with internet, or name a folder written by save_pretrained (hf:PATH)"
        )
    hub.download(name, ("config.json",), extra=("preprocessor_config.json",))
    snap = hub.snapshot(name)
    assert snap is not None
    return snap


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _vision_config(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The image tower's config: the config itself, or a CLIP's `vision_config`."""
    if isinstance(cfg.get("vision_config"), dict):
        return {**cfg["vision_config"], "model_type": cfg.get("model_type", "") + "_vision_model"}
    if "image_size" in cfg or "hidden_sizes" in cfg or "num_channels" in cfg:
        return cfg
    return None


@cache
def _info(name: str, where: str) -> ModelInfo:
    base = Path(where)
    cfg = _json(base / "config.json")
    vision = _vision_config(cfg) if isinstance(cfg, dict) else None
    if vision is None:
        raise TlfeatError(f"hf:{name}: {base / 'config.json'} is not the config of a vision model")
    proc = _json(base / "preprocessor_config.json")
    if not isinstance(proc, dict):
        raise TlfeatError(f"hf:{name} has no preprocessor_config.json, so its preprocessing is unknown")
    if base.parent.name == "snapshots":
        wid = f"rev:{base.name[:12]}"
    else:
        found = hub.find(name, WEIGHT_FILES, folder=base)
        wid = f"file:{offline.sha256_known(found.path)[:12]}" if found is not None else "none"
    entry = _entry(wid, proc, f"hf-hub:{name}")
    dim = vision.get("hidden_size") or (vision.get("hidden_sizes") or [None])[-1]
    return ModelInfo(name, int(dim) if dim else None, wid, {wid: entry})


def _size(value: Any, default: int) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return default


def _entry(wid: str, proc: dict[str, Any], url: str) -> WeightsInfo:
    """The image processor's numbers as tlfeat's eval transform."""
    size = proc.get("size", 224)
    squash = isinstance(size, dict) and "height" in size
    resize = _size(size, 224)
    crop = _size(proc.get("crop_size"), resize) if proc.get("do_center_crop", not squash) else resize
    if "crop_pct" in proc and proc.get("crop_pct") and resize < 384:  # ConvNeXt: resize to size/crop_pct, crop size
        crop, resize = resize, int(resize / float(proc["crop_pct"]))
    return WeightsInfo(
        name=wid,
        url=url,
        crop_size=crop,
        resize_size=resize,
        mean=tuple(float(m) for m in proc.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(float(s) for s in proc.get("image_std", (0.5, 0.5, 0.5))),
        interpolation=RESAMPLE.get(int(proc.get("resample", 2)), "bilinear"),
        antialias=True,
        squash=squash,
    )


def _check_readable(name: str, path: Path) -> None:
    """A damaged safetensors file (cut short, an edited header) as one line, before transformers reads it."""
    from tlfeat.weights import is_safetensors

    if not is_safetensors(path):
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: one line
        local = Path(name).expanduser().is_dir()
        fix = "write it again (save_pretrained)" if local else f"delete {hub.repo_folder(name)} and fetch it again"
        raise TlfeatError(f"{path} is damaged ({first_line(exc)}); {fix}") from exc


def _stack_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """(name relative to the model, module) of each layer of the encoder's stack, in order."""
    base: Any = model.base  # type: ignore[union-attr]
    for stack_name, module in base.named_modules():
        if stack_name.rsplit(".", 1)[-1] in STACKS and type(module).__name__ == "ModuleList":
            return [(f"{stack_name}.{i}", child) for i, child in enumerate(module)]
    return []


def _run(base: Any, x: Any, hidden: bool = False) -> Any:
    import inspect

    kwargs: dict[str, Any] = {"output_hidden_states": hidden}
    if "interpolate_pos_encoding" in inspect.signature(base.forward).parameters:
        kwargs["interpolate_pos_encoding"] = True  # other image sizes (--image-size) than the config's
    return base(pixel_values=x, **kwargs)


LEFT_OVER = ("classifier.", "text_model.", "text_projection", "logit_scale", "visual_projection")


def _holds_wrapper(path: Path) -> bool:
    from tlfeat.weights import load_state_dict

    return any(k.startswith("base.") for k in load_state_dict(path))


def _make(where: Path, pretrained: bool = False) -> nn.Module:
    """The wrapper (`base`: the transformers model, `head`) of the model whose config is in `where`,
    with the weights beside it when `pretrained`."""
    import warnings

    from transformers import AutoConfig, AutoModel, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    from tlfeat.backbones.cut import Headed

    hf_logging.disable_progress_bar()  # tlfeat has its own; this one would print on every load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.from_pretrained(str(where), local_files_only=True)
        clip = getattr(cfg, "vision_config", None) is not None  # a whole CLIP: its image tower
        vcfg = cfg.vision_config if clip else cfg
        if not pretrained:
            base = CLIPVisionModel(vcfg) if clip else AutoModel.from_config(cfg)
        else:
            loader: Any = CLIPVisionModel if clip else AutoModel
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its loading report is a table; the error below is one line
            try:
                base, info = loader.from_pretrained(str(where), local_files_only=True, output_loading_info=True)
            except (RuntimeError, OSError, ValueError) as exc:
                raise TlfeatError(f"the weights do not fit the config ({first_line(exc)})") from exc
            finally:
                hf_logging.set_verbosity(verbosity)
            left = [k for k in info.get("unexpected_keys", []) if not k.startswith(LEFT_OVER)]
            missing = list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
            if missing or left:
                raise TlfeatError(
                    f"the weights do not fit the config: {len(missing)} tensor(s) missing or of another shape "
                    f"(e.g. {', '.join(missing[:2]) or '-'}), {len(left)} unexpected (e.g. {', '.join(left[:2]) or '-'})"
                )
            base.eval()
    dim = getattr(vcfg, "hidden_size", None) or vcfg.hidden_sizes[-1]
    tokens = getattr(vcfg, "patch_size", None) is not None
    prefix = 1 + int(getattr(vcfg, "num_register_tokens", 0) or 0) if tokens else None
    cls_token = getattr(vcfg, "model_type", "") in CLS_MODELS

    def features(base: Any, x: Any) -> Any:
        out = _run(base, x)
        return out.last_hidden_state[:, 0] if cls_token else out.pooler_output

    return Headed(base, int(dim), features, prefix)


SOURCE = HFSource()
