"""A user's own network: `custom:package.module:function`.

`function()` returns `(model, preprocessing)`, or the model alone when the module defines a
`PREPROCESSING` dict: a `torch.nn.Module` whose output is the features (an (n, d) tensor, or an
(n, c, h, w) feature map or (n, tokens, d) sequence, averaged), with its weights already loaded, and
the eval transform its weights expect (`PREPROCESSING_KEYS`). The returned dict wins over the
module's. The weights id is `code:<sha256 of the module's file>+state:<sha256 of the built model's
state dict>` (12 hex digits each): changed code or changed weights, however make() loads them, make
new keys. So every command that uses a custom model builds it once. `--weights FILE` loads a state
dict into the returned model instead. Fine-tuning puts a new linear head on the features.

User code (the import, the function, the forward pass) prints to stderr, never into tlfeat's
results on stdout, and any exception it raises is one line naming the function (exit 2).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlfeat.backbones.base import UNTRAINED, ModelInfo, Source, WeightsInfo
from tlfeat.errors import TlfeatError, first_line

if TYPE_CHECKING:
    from torch import nn

EXAMPLE = "custom:mypackage.models:make (make() returns (model, {'crop_size': 224, 'resize_size': 256, 'mean': ..., 'std': ...}))"

# The preprocessing dict: every key tlfeat reads, and what it means.
PREPROCESSING_KEYS = {
    "crop_size": "the center crop in pixels (required)",
    "mean": "per-channel mean, 3 floats (required)",
    "std": "per-channel std, 3 floats (required)",
    "resize_size": "the shorter side is resized to this first (default: crop_size)",
    "interpolation": "nearest, bilinear (default), bicubic, lanczos, box or hamming",
    "squash": "resize to a square, ignoring the aspect ratio (default false)",
}
REQUIRED = ("crop_size", "mean", "std")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
SHAPES = "expected (N, D), (N, C, H, W) or (N, L, D)"


@dataclass(frozen=True)
class Made:
    """What the user's function gave: the model, its preprocessing, and the digest of its state."""

    model: Any
    preprocessing: dict[str, Any]
    state_sha256: str


class CustomSource(Source):
    prefix = "custom"
    builds_weights = True  # the function loads them; --untrained resets every layer instead

    def check(self, name: str) -> None:
        _entry_point(name)

    def info(self, name: str) -> ModelInfo:
        module, _ = _entry_point(name)
        made = _made(name)
        wid = f"code:{_module_digest(module)}+state:{made.state_sha256[:12]}"
        return ModelInfo(name, None, wid, {wid: _weights_info(name, wid, made.preprocessing)})

    def locate(self, name: str, entry: WeightsInfo, verify: bool = True) -> Any:
        from tlfeat.backbones.base import Located

        module, _ = _entry_point(name)
        return Located(Path(inspect.getfile(module)), "code", _made(name).state_sha256)

    def convert(self, name: str, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if any(k.startswith("base.") for k in state):
            return state  # a tlfeat checkpoint of this model (fine-tuned): its own names
        base: Any = model.base
        _check_fits(name, state, base.state_dict())
        return {"base." + k: v for k, v in state.items()}

    def build(self, name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        import copy

        from tlfeat.backbones import cut

        model = copy.deepcopy(_made(name).model)  # the function's weights; "meta" builds stay on the CPU
        wrapped = cut.Headed(model, 0, partial(_forward, name))
        if num_classes is not None:
            self.replace_head(wrapped, name, num_classes)
        return wrapped

    def _dim(self, name: str) -> int:
        import torch

        with torch.no_grad():
            return int(_forward(name, _made(name).model.eval(), torch.zeros(1, 3, 64, 64)).shape[1])

    def head(self, model: nn.Module, name: str) -> str:
        return "head"

    def layer_names(self, model: nn.Module, name: str, nodes: bool = False) -> list[str]:
        base: Any = model.base  # type: ignore[union-attr]
        return [n for n, _ in base.named_modules() if n]  # leaves too: a user's model may be a few layers

    def extractor(self, model: nn.Module, name: str, layers: list[str | None], pool: str | None) -> nn.Module:
        from tlfeat.backbones import cut

        if pool is not None:
            raise TlfeatError(f"--pool: custom:{name}'s output is pooled by averaging; pool the tokens in the model")

        def forward(m: Any, x: Any) -> list[Any]:
            named = [f"base.{layer}" for layer in layers if layer is not None]
            if not named:
                return [_forward(name, m.base, x)]
            with _user_code(f"custom:{name}'s model"):
                found = dict(zip(named, cut.hooked(m, named, m.base, x), strict=True))
            return [
                _forward(name, m.base, x) if layer is None else _pooled(name, found[f"base.{layer}"], len(x), layer)
                for layer in layers
            ]

        return cut.Extractor(model, forward).eval()

    def blocks(self, model: nn.Module, name: str) -> list[list[str]]:
        from tlfeat.backbones import cut

        return cut.top_level_blocks(model, "head")

    def replace_head(self, model: nn.Module, name: str, n_classes: int, seed: int = 0) -> None:
        from tlfeat.backbones import cut

        wrapped: Any = model
        if not wrapped.dim:
            wrapped.dim = self._dim(name)
        cut.set_linear_head(model, n_classes, seed)


@contextlib.contextmanager
def _user_code(what: str) -> Iterator[None]:
    """Run the user's code with its prints on stderr (stdout carries tlfeat's results); whatever it
    raises becomes one line naming it. Running out of memory stays what it is."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except TlfeatError:
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            raise
        raise TlfeatError(f"{what} raised {type(exc).__name__}: {first_line(exc)}") from exc


def _entry_point(name: str) -> tuple[Any, Any]:
    module_name, sep, function = name.rpartition(":")
    if function == UNTRAINED and ":" in module_name:
        raise TlfeatError(
            f"custom:{name}: ':{UNTRAINED}' is compare's spelling of random weights; "
            f"here write --model custom:{module_name} --untrained"
        )
    if not sep or not module_name or not function:
        raise TlfeatError(f"custom:{name}: name a function as custom:MODULE:FUNCTION, e.g. {EXAMPLE}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # a module beside the project, as `python -m` would find it
    try:
        with _user_code(f"custom:{name}: importing {module_name}"):
            module = importlib.import_module(module_name)
    except TlfeatError as exc:
        missing = exc.__cause__.name if isinstance(exc.__cause__, ModuleNotFoundError) else None
        if missing and (module_name + ".").startswith(missing + "."):  # the module itself, not one it imports
            raise TlfeatError(f"custom:{name}: cannot import {module_name}; is it on PYTHONPATH?") from exc
        raise
    fn = getattr(module, function, None)
    if not callable(fn):
        raise TlfeatError(f"custom:{name}: {module_name} has no function {function!r}")
    return module, fn


@cache
def _made(name: str) -> Made:
    """Call the user's function once per process; its result, checked."""
    from torch import nn

    module, fn = _entry_point(name)
    with _user_code(f"custom:{name}()"):
        result = fn()
    own = getattr(module, "PREPROCESSING", None)
    if isinstance(result, nn.Module):
        model, prep = result, None
    elif isinstance(result, tuple) and len(result) == 2:
        model, prep = result
        if not isinstance(model, nn.Module):
            raise TlfeatError(
                f"custom:{name} returned a tuple whose first element is not a torch module but "
                f"{type(model).__name__}; return (model, preprocessing dict)"
            )
    else:
        raise TlfeatError(
            f"custom:{name} returned a {type(result).__name__}; return (model, preprocessing dict), "
            "or the model alone with a PREPROCESSING dict in its module"
        )
    if prep is None and own is None:
        raise TlfeatError(
            f"custom:{name} returned no preprocessing and its module has no PREPROCESSING dict; "
            f"return (model, dict) with keys {', '.join(PREPROCESSING_KEYS)}"
        )
    prep = own if prep is None else prep
    if not isinstance(prep, dict):
        if not hasattr(prep, "crop_size"):
            raise TlfeatError(f"custom:{name}: the preprocessing is a {type(prep).__name__}, not a dict")
        prep = {k: getattr(prep, k) for k in PREPROCESSING_KEYS if hasattr(prep, k)}
    return Made(model, prep, state_sha256(model))


def state_sha256(model: nn.Module) -> str:
    """The digest of a model's state dict: each tensor's name, dtype, shape and bytes, in order."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(value.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weights_info(name: str, wid: str, prep: dict[str, Any]) -> WeightsInfo:
    unknown = [k for k in prep if k not in PREPROCESSING_KEYS]
    missing = [k for k in REQUIRED if k not in prep]
    if unknown or missing:
        what = f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else f"no {', '.join(missing)}"
        raise TlfeatError(
            f"custom:{name}: the preprocessing dict has {what}; valid keys: {', '.join(PREPROCESSING_KEYS)} "
            f"({', '.join(REQUIRED)} required)"
        )
    interpolation = str(prep.get("interpolation", "bilinear"))
    if interpolation not in INTERPOLATIONS:
        raise TlfeatError(
            f"custom:{name}: preprocessing interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        )
    try:
        return WeightsInfo(
            name=wid,
            url="",
            crop_size=int(prep["crop_size"]),
            resize_size=int(prep.get("resize_size", prep["crop_size"])),
            mean=tuple(float(m) for m in prep["mean"]),
            std=tuple(float(s) for s in prep["std"]),
            interpolation=interpolation,
            antialias=True,
            squash=bool(prep.get("squash", False)),
        )
    except (TypeError, ValueError) as exc:
        raise TlfeatError(
            f"custom:{name}: the preprocessing needs integer sizes and mean/std as sequences of floats ({exc})"
        ) from exc


def _forward(name: str, model: Any, x: Any) -> Any:
    """The model's output on `x`, checked and averaged to (n, d)."""
    with _user_code(f"custom:{name}'s model"):
        out = model(x)
    return _pooled(name, out, len(x))


def _pooled(name: str, out: Any, n: int, layer: str | None = None) -> Any:
    import torch

    from tlfeat.backbones import cut

    what = f"custom:{name}" + (f" layer {layer}" if layer else "")
    if not isinstance(out, torch.Tensor):
        raise TlfeatError(f"{what} returned a {type(out).__name__} for a batch of {n}; {SHAPES} (one tensor)")
    if out.ndim not in (2, 3, 4) or int(out.shape[0]) != n:
        raise TlfeatError(f"{what} returned shape {tuple(int(d) for d in out.shape)} for a batch of {n}; {SHAPES}")
    return cut.pool_map(out)


def _check_fits(name: str, state: dict[str, Any], own: dict[str, Any]) -> None:
    """A state dict for the user's model, in the user's own key names (not tlfeat's `base.` ones)."""
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise TlfeatError(
            f"--weights does not fit custom:{name}: {len(missing)} tensor(s) missing (e.g. {', '.join(missing[:2]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2]) or '-'}), {len(shapes)} of another shape "
            f"(e.g. {', '.join(shapes[:2]) or '-'}); is it a state dict of this model?"
        )


def _module_digest(module: Any) -> str:
    from tlfeat import offline

    return offline.sha256_file(Path(inspect.getfile(module)))[:12]


SOURCE = CustomSource()
