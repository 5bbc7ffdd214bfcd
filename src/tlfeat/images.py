"""Decoding one image, from a file, from bytes or from an array, to 8-bit RGB. PIL and numpy only.

Grey, palette, RGBA (composited on white), 16-bit and CMYK images all become 8-bit RGB. Any
failure (an empty, truncated or non-image file, a decompression bomb) is one `TlfeatError` that
names the image, so `--on-error skip` can record it and `fail` can stop on it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfeat.errors import TlfeatError, printable

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# What an image is read from: ("path", str), ("bytes", bytes), ("array", uint8 ndarray), or ("error", why not).
Item = tuple[str, Any]


def content_digest(data: bytes | np.ndarray) -> bytes:
    """sha256 of an image's bytes (a file's contents, or an array's pixels): 32 raw bytes."""
    view = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(view).digest()


def read(item: Item) -> tuple[bytes | np.ndarray, str]:
    """The raw content of an item and a name for messages."""
    kind, value = item
    if kind == "path":
        return read_file(str(value)), printable(str(value))
    if kind == "bytes":
        data, name = value
        return data, printable(str(name))
    if kind == "array":
        array, name = value
        return array, str(name)
    if kind == "error":  # an image its source could not even hand over (a shard member over the size limit)
        raise TlfeatError(str(value))
    raise TlfeatError(f"internal: unknown image item kind {kind!r}")


def megabytes(n: int) -> str:
    return f"{n / 2**20:.3g} MB"


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message: "a FIFO", "a directory"..."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_file(path: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (default: `config.max_image_bytes()`).

    Opened without blocking and checked before anything is read: a FIFO, a device (a link to
    /dev/zero), a socket or a directory named like an image is refused in one line, never read
    until memory runs out or waited on forever.
    """
    from tlfeat import config

    limit = config.max_image_bytes() if limit is None else limit
    name = printable(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TlfeatError(f"cannot read image {name}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TlfeatError(f"cannot read image {name}: it is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise TlfeatError(
                f"cannot read image {name}: {megabytes(st.st_size)}, above the limit of {megabytes(limit)} per image "
                "(raise it with TLFEAT_MAX_IMAGE_MB)"
            )
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 22, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise TlfeatError(f"cannot read image {name}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if total > limit:  # it grew while being read
        raise TlfeatError(f"cannot read image {name}: it grew beyond the limit of {megabytes(limit)} while read")
    return b"".join(chunks)


# A JPEG is decoded at reduced scale (DCT-domain, 1/2, 1/4 or 1/8) only while what is left is at least
# this many times the resize: torchvision's antialiased resize then does the last, larger part of the
# downscale, and features stay at cosine >= 0.999 to a full decode (tests/test_decode.py, real photos
# at 1x-16x the resize). At 2x, the DCT scaling of a 1/8 step, or without the box below, they did not.
DRAFT_MARGIN = 4
DECODE_RULE = 2  # in the cache key of fast-decoded files: bump when the bits of a draft decode change

# The area of the full image a decoded image covers, in the decoded image's pixels (PIL's `box`).
Box = tuple[float, float, float, float]


def decode(content: bytes | np.ndarray, name: str) -> Image.Image:
    """8-bit RGB PIL image of `content`, decoded at full size."""
    return decode_draft(content, name, None)[0]


def decode_draft(content: bytes | np.ndarray, name: str, short_side: int | None) -> tuple[Image.Image, Box]:
    """8-bit RGB PIL image of `content` and the box the full image covers in it.

    With `short_side` (the resize that follows), a JPEG whose short side is at least
    `DRAFT_MARGIN * 2 * short_side` is decoded at the largest DCT scale (1/2, 1/4, 1/8) that leaves
    `DRAFT_MARGIN` times `short_side`; the box then says where the full image lies in the reduced
    one, so that `Image.resize(..., box=box)` keeps the full image's exact geometry.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(content, np.ndarray):
        img = Image.fromarray(content).convert("RGB")
        return img, (0, 0, *img.size)
    try:
        with warnings.catch_warnings():
            # A large image triggers a warning before the hard limit's error; log it, never print it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(content))
            except Image.DecompressionBombWarning as warning:
                log.info("%s: %s", name, warning)
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(content))
            with img:
                box: Box = (0, 0, *img.size)
                scale = draft_scale(img.size, short_side) if img.format == "JPEG" else 1
                if scale > 1:
                    width, height = img.size
                    drafted = img.draft(img.mode, (width // scale, height // scale))
                    if drafted is not None:  # None: PIL cannot draft this file; it is decoded whole
                        box = drafted[1]  # (0, 0, width / scale, height / scale)
                img.load()
                return to_rgb(img), box
    except Image.DecompressionBombError as exc:
        raise TlfeatError(f"cannot decode image {name}: {exc} (a decompression bomb?)") from exc
    except UnidentifiedImageError as exc:  # PIL names its in-memory buffer here, not the file
        raise TlfeatError(f"cannot decode image {name}: not an image format PIL can read") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise TlfeatError(f"cannot decode image {name}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file can make a decoder raise anything
        raise TlfeatError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc


def draft_scale(size: tuple[int, int], short_side: int | None) -> int:
    """The DCT scale (1, 2, 4 or 8) a JPEG of `size` is decoded at before a resize to `short_side`."""
    if not short_side:
        return 1
    room = min(size) / (DRAFT_MARGIN * short_side)
    return next((s for s in (8, 4, 2) if room >= s), 1)


def to_rgb(img: Any) -> Any:
    """Any PIL mode as 8-bit RGB: 16-bit and float scaled to 8 bits, transparency composited on white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
