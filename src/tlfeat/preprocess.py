"""The weights' evaluation transform (resize, centre crop, normalise) in PIL and numpy.

torchvision's `ImageClassification` on a PIL image resizes with PIL and crops with PIL, then
divides by 255 and normalises in float32. The same operations here give the same bytes (tested
against torchvision), without importing torch: decoding workers send uint8 crops, and the batch is
normalised in the main process into one reused buffer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tlfeat import images

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

    def key(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        if not self.fast_decode:
            del out["fast_decode"]  # keys of files made before the option existed stay valid
        return out

    @classmethod
    def from_key(cls, fields: dict[str, Any]) -> Preprocessing:
        return cls(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})

    def scaled(self, image_size: int | None) -> Preprocessing:
        """The same transform at crop `image_size`, keeping the weights' resize/crop ratio (256/224)."""
        if image_size is None:
            return self
        resize = int(round(image_size * self.resize_size / self.crop_size))
        return Preprocessing(
            image_size, resize, self.mean, self.std, self.interpolation, self.antialias, self.fast_decode
        )

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after torchvision's resize of the short side to `resize_size`."""
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def resize_crop(self, img: Any) -> np.ndarray:
        """PIL RGB image -> uint8 (3, crop, crop): torchvision's resize (short side) and centre crop."""
        w, h = img.size
        new_h, new_w = self.resized_shape(h, w)
        if (new_h, new_w) != (h, w):
            img = img.resize((new_w, new_h), _PIL_FILTERS[self.interpolation])
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
        draft = self.resize_size if self.fast_decode else None
        return self.resize_crop(images.decode(content, name, draft_size=draft))


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
