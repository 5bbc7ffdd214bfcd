"""The weights' evaluation transform (resize, centre crop, normalise) in PIL and numpy.

torchvision's `ImageClassification` on a PIL image resizes with PIL and crops with PIL, then
divides by 255 and normalises in float32. The same operations here give the same bytes (tested
against torchvision), without importing torch: decoding workers send uint8 crops, and the batch is
normalised in the main process into one reused buffer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from tlfeat import images
from tlfeat.errors import TlfeatError

# torchvision's InterpolationMode values -> PIL's resampling filters (torchvision's own mapping).
_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
NORMALIZE_STEP = 4  # images normalised at a time: each pass stays in cache (2.5x faster than a whole batch)


@dataclass(frozen=True)
class Preprocessing:
    """What turns an image into the network's input; every field is part of the cache key."""

    crop_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    antialias: bool = True
    fast_decode: bool = False  # JPEG DCT-domain downscaling of large photos before the resize
    squash: bool = False  # resize both sides to resize_size, ignoring the aspect ratio (Hugging Face's ViT)

    def key(self, decoded: bool = True) -> dict[str, Any]:
        """The key fields of this transform; `decoded=False` for images held as pixels (named datasets),
        which no decode rule touches: their keys stay those of earlier versions."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        for name in ("fast_decode", "squash"):
            if not out[name]:
                del out[name]  # keys of files made before the option existed stay valid
        if self.fast_decode and decoded:  # files of an earlier draft rule hold other bits: another key
            out["decode_rule"] = images.DECODE_RULE
        return out

    @classmethod
    def from_key(cls, fields: dict[str, Any]) -> Preprocessing:
        rule = fields.get("decode_rule")
        if rule not in (None, images.DECODE_RULE):
            raise TlfeatError(
                f"features made with decode rule {rule} cannot be extended by this tlfeat (rule {images.DECODE_RULE})"
            )
        known = {k: v for k, v in fields.items() if k != "decode_rule"}
        return cls(**{**known, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})

    def scaled(self, image_size: int | None) -> Preprocessing:
        """The same transform at crop `image_size`, keeping the weights' resize/crop ratio (256/224)."""
        if image_size is None:
            return self
        resize = int(round(image_size * self.resize_size / self.crop_size))
        return replace(self, crop_size=image_size, resize_size=resize)

    def resized_shape(self, h: float, w: float) -> tuple[int, int]:
        """(height, width) after torchvision's resize of the short side to `resize_size` (both sides
        with `squash`)."""
        if self.squash:
            return self.resize_size, self.resize_size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def resize_crop(self, img: Any, box: images.Box | None = None) -> np.ndarray:
        """PIL RGB image -> uint8 (3, crop, crop): torchvision's resize (short side) and centre crop.

        `box`: where the full image lies in `img` when it was decoded at reduced scale; the resize
        then maps the full image's geometry exactly (its size is the box's times the scale, and
        torchvision's output size depends only on the ratio of its sides).
        """
        box = box or (0, 0, *img.size)
        new_h, new_w = self.resized_shape(box[3], box[2])
        if (new_w, new_h) != tuple(box[2:]) or tuple(box[2:]) != img.size:
            img = img.resize((new_w, new_h), _PIL_FILTERS[self.interpolation], box=box)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        crop = self.crop_size
        if crop > new_w or crop > new_h:  # torchvision pads with zeros, left/top getting the smaller half
            pad_w, pad_h = max(crop - new_w, 0), max(crop - new_h, 0)
            arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = arr.shape[:2]
        top = int(round((height - crop) / 2.0))
        left = int(round((width - crop) / 2.0))
        return np.ascontiguousarray(arr[top : top + crop, left : left + crop].transpose(2, 0, 1))

    def crop_of(self, content: Any, name: str) -> np.ndarray:
        """Decoded and resized: what a decoding worker sends for one image."""
        img, box = images.decode_draft(content, name, self.resize_size if self.fast_decode else None)
        return self.resize_crop(img, box)


class Normalizer:
    """uint8 NCHW batch -> float32 / 255, - mean, / std, in place into one buffer reused between batches.

    The result is only valid until the next call. A 64-image batch at 224 px is 38 MB, which glibc
    would otherwise map and fault in afresh every time.
    """

    def __init__(self, prep: Preprocessing) -> None:
        self.mean = np.asarray(prep.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(prep.std, dtype=np.float32).reshape(1, -1, 1, 1)
        self.buffer: np.ndarray | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.buffer is None or self.buffer.shape[1:] != batch.shape[1:] or len(self.buffer) < n:
            self.buffer = np.empty((n, *batch.shape[1:]), dtype=np.float32)
        out = self.buffer[:n]
        for i in range(0, n, NORMALIZE_STEP):
            part = out[i : i + NORMALIZE_STEP]
            np.copyto(part, batch[i : i + NORMALIZE_STEP], casting="unsafe")
            part /= np.float32(255.0)
            part -= self.mean
            part /= self.std
        return out
