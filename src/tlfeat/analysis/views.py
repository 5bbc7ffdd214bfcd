"""What each layer of a network sees: its first layer's filters, and its activation maps of one photo.

The photo goes through the weights' own preprocessing (resize, centre crop, ImageNet normalisation).
A "block" is read from the forward pass itself, the same way for every architecture: per spatial
resolution, the shallowest module that keeps that resolution (or a layer such as a pooling that
brings the input to it), the last of them to finish: one map per stage, just before the network
downsamples (VGG16 at 224 px: features.3 at 224, ..., features.30 at 7; MobileNetV2: features.1 at
112, features.3 at 56, ...; ResNet: layer1, layer2.1, ...).
Per block, the channels with the largest mean activation are shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfeat import backbones, fsio, images
from tlfeat.analysis import plots
from tlfeat.errors import TlfeatError

if TYPE_CHECKING:
    from tlfeat.config import LayerViewConfig


@dataclass
class Stage:
    name: str
    output: np.ndarray  # (channels, h, w)


def network(cfg: LayerViewConfig) -> Any:
    """The model with the weights asked for (verified), in evaluation mode."""
    from tlfeat.weights import build_with_weights, resolve

    resolved = resolve(cfg.model, cfg.weights_id, cfg.weights_file, untrained=cfg.untrained, seed=0)
    return build_with_weights(cfg.model, resolved).eval(), resolved


def crop(cfg: LayerViewConfig) -> np.ndarray:
    """The photo as the network receives it before normalisation: uint8 (3, crop, crop)."""
    path = Path(cfg.image)
    if not path.is_file():
        raise TlfeatError(f"--image {path} is not a file")
    try:
        picture = images.decode(path.read_bytes(), str(path))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the same mistake for the user
        raise TlfeatError(f"--image {path} is not an image tlfeat can read ({exc})") from None
    return backbones.preprocessing(cfg.model, cfg.weights_id, cfg.image_size).resize_crop(picture)


def stages(model: Any, x: Any) -> list[Stage]:
    """The block outputs of one forward pass (see the module's docstring), largest resolution first."""
    import torch

    last: dict[tuple[int, ...], Stage] = {}
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = not any(True for _ in module.children())

        def record(mod: Any, inputs: Any, output: Any, name: str = name, leaf: bool = leaf) -> None:
            first = inputs[0] if isinstance(inputs, tuple) and inputs else None
            if not (isinstance(output, torch.Tensor) and output.ndim == 4):
                return
            size = tuple(output.shape[-2:])
            if size[0] * size[1] == 1:  # a pooled vector (squeeze-excitation, the final pooling): no map
                return
            if isinstance(first, torch.Tensor) and first.ndim == 4:
                same = tuple(first.shape[-2:]) == size
                shrinks = first.shape[-1] * first.shape[-2] >= size[0] * size[1]
            else:
                same, shrinks = False, leaf
            if not (same or (leaf and shrinks)):  # a container spanning resolutions, or an upsampling, is no block
                return
            depth = name.count(".")  # the shallowest module at a resolution (the stage, not a layer in it)
            if size not in last or depth <= last[size].name.count("."):
                last[size] = Stage(name, output[0].numpy())

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sorted(last.values(), key=lambda st: -st.output.shape[-1] * st.output.shape[-2])


def first_conv(model: Any) -> tuple[str, np.ndarray]:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            return name, module.weight.detach().numpy()
    raise TlfeatError("this model has no convolution to show filters of")


@dataclass
class Views:
    filters: Path
    activations: Path
    blocks: list[tuple[str, tuple[int, ...]]]  # (module, (channels, h, w)) of each block shown


def layer_views(cfg: LayerViewConfig) -> Views:
    """Write the first layer's filters and the activation maps of the photo."""
    import torch

    backbones.check_model(cfg.model)
    pixels = crop(cfg)
    out = Path(cfg.out)  # claimed before the network is built: a folder of the user's is refused at once
    fsio.take(out, [f"{cfg.model}-filters.png", f"{cfg.model}-activations.png"], "tlfeat analyze")
    model, resolved = network(cfg)
    prep = backbones.preprocessing(cfg.model, cfg.weights_id, cfg.image_size)
    mean, std = np.asarray(prep.mean).reshape(3, 1, 1), np.asarray(prep.std).reshape(3, 1, 1)
    x = torch.from_numpy(((pixels / 255.0 - mean) / std).astype(np.float32))[None]
    weights = "untrained (random)" if not resolved.pretrained else resolved.weights_id
    conv_name, w = first_conv(model)
    filters = plots.filters(
        w, f"{cfg.model} ({weights}): the {len(w)} filters of {conv_name}, {w.shape[2]}x{w.shape[3]}",
        out / f"{cfg.model}-filters.png",
    )  # fmt: skip
    found = stages(model, x)
    rows = []
    for stage in found:
        means = stage.output.mean(axis=(1, 2))
        top = np.argsort(-means, kind="stable")[: cfg.channels]
        rows.append(
            {
                "name": stage.name,
                "shape": "x".join(map(str, stage.output.shape)),
                "maps": [(int(c), stage.output[c]) for c in top],
            }
        )
    title = f"{cfg.model} ({weights}) on {Path(cfg.image).name}: the {cfg.channels} most active channels per block"
    maps = plots.activations(pixels.transpose(1, 2, 0), rows, title, out / f"{cfg.model}-activations.png")
    return Views(filters, maps, [(s.name, tuple(s.output.shape)) for s in found])
