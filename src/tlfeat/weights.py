"""Finding a pretrained weights file, checking it, and loading it without unpickling objects.

Resolution order: an explicit file; torch's hub cache; a registry package carrying the exact
file (for machines behind a package mirror); torchvision's own download. Every file is checked
against the sha256 prefix torchvision puts in its file names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlfeat import config, offline
from tlfeat.backbones import weights_entry
from tlfeat.errors import TlfeatError, WeightsNotFound, first_line

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# (model, weights id) -> a registry package carrying torchvision's exact file.
REGISTRY_WEIGHTS: dict[tuple[str, str], offline.RegistryFile] = {
    ("mobilenet_v2", "IMAGENET1K_V1"): offline.MOBILENET_V2_IMAGENET1K_V1,
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights a model gets: an id for the cache key, the file and where it came from."""

    weights_id: str  # torchvision entry ("IMAGENET1K_V1"), "file:<sha12>" or "untrained:seed<k>"
    source: str  # "file", "hub-cache", "registry:<pkg>==<ver>", "download", "untrained"
    path: Path | None = None
    sha256: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.source != "untrained"


def hub_checkpoints() -> Path:
    """torch's hub cache of weights files (found without importing torch)."""
    return config.torch_home() / "checkpoints"


def locate(name: str, weights_id: str | None, verify: bool = False) -> tuple[Path | None, str]:
    """Where the weights would come from without downloading: (path or None, source).

    With `verify`, a file in the hub cache whose sha256 disagrees with its name is reported as
    "corrupt ..." instead of found.
    """
    entry = weights_entry(name, weights_id)
    filename = entry.url.rsplit("/", 1)[-1]
    hub_file = hub_checkpoints() / filename
    if hub_file.is_file():
        prefix = entry.sha_prefix
        if verify and prefix and not offline.sha256_known(hub_file).startswith(prefix):
            return None, f"corrupt file in the hub cache ({hub_file}): delete it"
        return hub_file, "hub-cache"
    rf = REGISTRY_WEIGHTS.get((name, entry.name))
    if rf is not None:
        local = offline.locate(rf)
        return local, f"registry:{rf.spec}"
    return None, "download"


def resolve(
    name: str,
    weights_id: str | None = None,
    weights_file: Path | None = None,
    untrained: bool = False,
    seed: int = 0,
    allow_download: bool = True,
) -> ResolvedWeights:
    """Find a verified weights file for `name`, fetching it if needed and allowed."""
    if untrained:
        return ResolvedWeights(f"untrained:seed{seed}", "untrained")
    entry = weights_entry(name, weights_id)
    filename = entry.url.rsplit("/", 1)[-1]
    prefix = entry.sha_prefix

    if weights_file is not None:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            exists = path.exists()
            what = "is not a regular file (a device, a directory or a pipe)" if exists else "does not exist"
            raise WeightsNotFound(f"weights file {path} {what}; give a state dict or a tlfeat checkpoint (.pt)")
        digest = offline.sha256_file(path)
        if prefix and digest.startswith(prefix):
            return ResolvedWeights(entry.name, "file", path, digest)
        if path.name == filename:
            raise TlfeatError(
                f"{path} is named like torchvision's {entry.name} file but its sha256 starts with "
                f"{digest[:8]}, not {prefix}; refusing a corrupt or altered file"
            )
        log.info("using custom weights %s (sha256 %s)", path, digest[:12])
        return ResolvedWeights(f"file:{digest[:12]}", "file", path, digest)

    hub_file = hub_checkpoints() / filename
    if hub_file.is_file():
        digest = offline.sha256_known(hub_file)
        if prefix and not digest.startswith(prefix):
            raise TlfeatError(
                f"{hub_file} has sha256 {digest[:8]}..., expected {prefix}...; "
                "delete it and run again to fetch a good copy"
            )
        return ResolvedWeights(entry.name, "hub-cache", hub_file, digest)

    errors: list[str] = []
    rf = REGISTRY_WEIGHTS.get((name, entry.name))
    if rf is not None:
        try:
            path = offline.fetch(rf, dest=hub_file)
            return ResolvedWeights(entry.name, f"registry:{rf.spec}", path, rf.sha256)
        except TlfeatError as exc:
            errors.append(str(exc))

    if allow_download and not config.offline():
        import torch

        try:
            hub_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(entry.url, str(hub_file), hash_prefix=prefix, progress=False)
            return ResolvedWeights(entry.name, "download", hub_file, offline.sha256_file(hub_file))
        except Exception as exc:  # noqa: BLE001 - any network failure means "not downloadable"
            errors.append(f"download from {entry.url} failed: {type(exc).__name__}")

    why = f" ({'; '.join(errors)})" if errors else ""
    raise WeightsNotFound(
        f"no weights for {name} {entry.name}{why}. Supply them with --weights FILE, or put "
        f"{filename} in {hub_checkpoints()}, or run once with internet so torchvision downloads it "
        "(or use --untrained for random weights)"
    )


def load_error(exc: BaseException) -> str:
    """Why torch.load refused a file, without torch's advice to load untrusted files unsafely."""
    text = first_line(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        return "not a PyTorch file of tensors: tlfeat loads only tensors, never other pickled objects"
    return text


def load_state_dict(path: Path) -> dict[str, Any]:
    """Load a state dict from a file with `weights_only=True`: tensors, never arbitrary objects."""
    import pickle

    import torch

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
    """Build `name` on CPU with `resolved` weights loaded (strictly, heads aside for custom files)."""
    import torch

    from tlfeat.backbones import build

    if not resolved.pretrained:
        torch.manual_seed(int(resolved.weights_id.rsplit("seed", 1)[-1]))
        return build(name)
    assert resolved.path is not None
    state = load_state_dict(resolved.path)
    model = build(name)
    own = model.state_dict()
    # torchvision drops auxiliary-classifier weights when loading googlenet/inception without them.
    state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if resolved.weights_id.startswith("file:"):
        # A fine-tuned checkpoint with another number of classes: its head is not used for features.
        head = {k for k in state if k in own and own[k].shape != state[k].shape and k.startswith(_head_prefix(name))}
        state = {k: v for k, v in state.items() if k not in head}
        shapes = [s for s in shapes if s.split(" ", 1)[0] not in head]
    missing = [
        k
        for k in own
        if k not in state and not (resolved.weights_id.startswith("file:") and k.startswith(_head_prefix(name)))
    ]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or shapes:
        raise TlfeatError(
            f"{resolved.path} does not fit {name}: {len(missing)} tensor(s) missing (e.g. {', '.join(missing[:2]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2]) or '-'}), {len(shapes)} of another shape "
            f"(e.g. {', '.join(shapes[:2]) or '-'}); is it a checkpoint of another architecture?"
        )
    model.load_state_dict(state, strict=False)
    return model


def _head_prefix(name: str) -> str:
    from tlfeat.backbones import family

    return family(name).head + "."
