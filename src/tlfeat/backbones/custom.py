"""A user's own network: `custom:package.module:function`.

`function()` returns `(model, preprocessing)`: a `torch.nn.Module` whose output is the features
(an (n, d) tensor, or a feature map or token sequence, averaged), with its weights already loaded,
and the eval transform its weights expect as a dict (`crop_size`, `resize_size`, `mean`, `std`,
optionally `interpolation` (default bilinear) and `squash`). A module-level `PREPROCESSING` dict,
if present, is read instead of calling the function when only the transform is needed. The weights
id is `code:<sha256 of the module's file>` (a changed module makes new keys); `--weights FILE` loads a
state dict into the returned model instead. Fine-tuning puts a new linear head on the features.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlfeat.backbones.base import ModelInfo, Source, WeightsInfo
from tlfeat.errors import TlfeatError

if TYPE_CHECKING:
    from torch import nn

EXAMPLE = "custom:mypackage.models:make (make() returns (model, {'crop_size': 224, 'resize_size': 256, 'mean': ..., 'std': ...}))"


class CustomSource(Source):
    prefix = "custom"
    builds_weights = True  # the function loads them; --untrained resets every layer instead

    def check(self, name: str) -> None:
        _entry_point(name)

    def info(self, name: str) -> ModelInfo:
        module, fn = _entry_point(name)
        prep = getattr(module, "PREPROCESSING", None)
        if not isinstance(prep, dict):
            prep = _called(name)[1]
        wid = f"code:{_module_digest(module)}"
        try:
            entry = WeightsInfo(
                name=wid,
                url="",
                crop_size=int(prep["crop_size"]),
                resize_size=int(prep.get("resize_size", prep["crop_size"])),
                mean=tuple(float(m) for m in prep["mean"]),
                std=tuple(float(s) for s in prep["std"]),
                interpolation=str(prep.get("interpolation", "bilinear")),
                antialias=True,
                squash=bool(prep.get("squash", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TlfeatError(
                f"custom:{name}: the preprocessing needs crop_size, mean and std ({type(exc).__name__}: {exc})"
            ) from exc
        return ModelInfo(name, None, wid, {wid: entry})

    def locate(self, name: str, entry: WeightsInfo, verify: bool = True) -> Any:
        from tlfeat.backbones.base import Located

        module, _ = _entry_point(name)
        return Located(Path(inspect.getfile(module)), "code", _module_digest(module))

    def convert(self, name: str, state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if any(k.startswith("base.") for k in state):
            return state
        return {"base." + k: v for k, v in state.items()}

    def build(self, name: str, device: str = "cpu", num_classes: int | None = None) -> nn.Module:
        import copy

        from tlfeat.backbones import cut

        model = copy.deepcopy(_called(name)[0])  # the function's weights; "meta" builds stay on the CPU
        wrapped = cut.Headed(model, 0, lambda m, x: cut.pool_map(m(x)))
        if num_classes is not None:
            self.replace_head(wrapped, name, num_classes)
        return wrapped

    def _dim(self, name: str) -> int:
        import torch

        from tlfeat.backbones import cut

        model = _called(name)[0]
        with torch.no_grad():
            return int(cut.pool_map(model.eval()(torch.zeros(1, 3, 64, 64))).shape[1])

    def head(self, model: nn.Module, name: str) -> str:
        return "head"

    def layer_names(self, model: nn.Module, name: str, nodes: bool = False) -> list[str]:
        base: Any = model.base  # type: ignore[union-attr]
        return [n for n, m in base.named_modules() if n and len(list(m.children())) > 0]

    def extractor(self, model: nn.Module, name: str, layers: list[str | None], pool: str | None) -> nn.Module:
        from tlfeat.backbones import cut

        if pool is not None:
            raise TlfeatError(f"--pool: custom:{name}'s output is pooled by averaging; pool the tokens in the model")

        def forward(m: Any, x: Any) -> list[Any]:
            named = [f"base.{layer}" for layer in layers if layer is not None]
            found = dict(zip(named, cut.hooked(m, named, m.base, x), strict=True)) if named else {}
            out = [
                cut.pool_map(m.base(x)) if layer is None else cut.pool_map(found[f"base.{layer}"]) for layer in layers
            ]
            return out

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


def _entry_point(name: str) -> tuple[Any, Any]:
    module_name, sep, function = name.rpartition(":")
    if not sep or not module_name or not function:
        raise TlfeatError(f"custom:{name}: name a function as custom:MODULE:FUNCTION, e.g. {EXAMPLE}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # a module beside the project, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TlfeatError(f"custom:{name}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from exc
    fn = getattr(module, function, None)
    if not callable(fn):
        raise TlfeatError(f"custom:{name}: {module_name} has no function {function!r}")
    return module, fn


@cache
def _called(name: str) -> tuple[Any, dict[str, Any]]:
    from torch import nn

    _, fn = _entry_point(name)
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise TlfeatError(f"custom:{name} must return (model, preprocessing dict); got {type(result).__name__}")
    model, prep = result
    if not isinstance(prep, dict):
        prep = {k: getattr(prep, k) for k in ("crop_size", "resize_size", "mean", "std", "interpolation")}
    return model, prep


def _module_digest(module: Any) -> str:
    from tlfeat import offline

    return offline.sha256_file(Path(inspect.getfile(module)))[:12]


SOURCE = CustomSource()
