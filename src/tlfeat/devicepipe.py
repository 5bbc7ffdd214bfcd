"""Decoding and preprocessing on the device (`--decode device`): JPEG bytes in, normalised batches out.

Three stages, so the device never waits for the host:

1. `Fetcher`: threads read each batch's bytes ahead of the network and hash them (the fingerprints
   the cache keeps). JPEGs the device decoder takes (8-bit, three colour components, baseline or
   progressive, whole) stay as bytes; every other image (PNG, CMYK, grey, 16-bit, GIF, an unreadable
   file) goes at once to the CPU workers (`pool.DecodePool`, the PIL path of `--decode cpu`), and
   in-memory datasets (MNIST, CIFAR) stay uint8 arrays.
2. `Preparer`, one per device: `torchvision.io.decode_jpeg(list, device=...)` decodes the batch (nvJPEG
   on a GPU, libjpeg-turbo on the CPU), arrays are uploaded as uint8 through pinned, double-buffered
   host memory, and images of one size are resized together (the weights' interpolation and
   antialiasing), centre-cropped and normalised on the device, on a stream of their own. The CPU
   workers' crops join the batch in their rows. A JPEG the device refuses after all is decoded by
   the CPU workers instead (so a damaged file gets the CPU path's one-line error, or is skipped).
3. The network (`inference.TorchRunner.start`) runs while the next batch is prepared (`replicas`).

The same code runs on a CPU device (where it is tested); there libjpeg-turbo and PIL decode the same
pixels and torch's resize is within one grey level of PIL's, so features agree to cosine 0.999+.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlfeat import images
from tlfeat.datasets import ImageSplit
from tlfeat.errors import TlfeatError
from tlfeat.pool import Decoded, DecodePool
from tlfeat.preprocess import Preprocessing

log = logging.getLogger(__name__)

# Start-of-frame markers decode_jpeg takes: baseline, extended sequential, progressive (Huffman coded).
DEVICE_FRAMES = {0xC0: "baseline", 0xC1: "baseline", 0xC2: "progressive"}
_STANDALONE = {0x01, *range(0xD0, 0xDA)}  # markers without a length field (TEM, RSTn, SOI, EOI)


# --------------------------------------------------------------------------- which JPEGs


def jpeg_kind(data: bytes | bytearray) -> str | None:
    """ "baseline" or "progressive" for a whole 8-bit YCbCr JPEG the device decoder takes, else None.

    Read from the markers alone (no decoding): grey, CMYK, RGB-coded, 12-bit, lossless and arithmetic
    coded JPEGs, and files cut short before their end-of-image marker, are None (the CPU path decodes
    them, or names them as damaged).
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n, kind, adobe_rgb = 2, len(data), None, False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_rgb = segment[11] == 0  # colour transform 0: the components are R, G, B
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in DEVICE_FRAMES or len(segment) < 6:
                return None
            precision, components = segment[0], segment[5]
            ids = bytes(segment[6 : 6 + 3 * components : 3])
            if precision != 8 or components != 3 or adobe_rgb or ids == b"RGB":
                return None
            kind = DEVICE_FRAMES[marker]
        elif marker == 0xDA:  # start of scan: the entropy-coded data follows
            # 0xFF 0xD9 can only be a real end-of-image marker inside scans (0xFF is stuffed there)
            return kind if kind is not None and data.rfind(b"\xff\xd9") > i else None
        i += 2 + length
    return None


# --------------------------------------------------------------------------- stage 1: bytes, in order


@dataclass
class Fetched:
    """One batch, read: what the device decodes, what the CPU workers decode, the digests."""

    index: int  # the batch's number
    rows: np.ndarray
    digests: np.ndarray  # (n, 32); the CPU workers' rows are filled in when their crops arrive
    errors: list[str]
    jpegs: list[tuple[int, bytearray, str, str]] = field(default_factory=list)  # (position, bytes, kind, name)
    arrays: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (position, uint8 HW or HWC)
    cpu: list[tuple[list[int], Future[Decoded]]] = field(default_factory=list)  # the CPU workers' crops, by position


def _as_image_array(array: np.ndarray) -> bool:
    """An in-memory image the device takes as it is: uint8 grey (H, W) or RGB (H, W, 3)."""
    return array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3))


class Fetcher:
    """Batches of an ImageSplit read ahead by `readers` threads, yielded in order.

    With `device_decode` false every image goes to the CPU workers (the decode of `--decode cpu`,
    used when several devices share the work).
    """

    def __init__(
        self, images: ImageSplit, batches: list[list[int]], pool: DecodePool, device_decode: bool, readers: int
    ) -> None:
        self.images, self.batches, self.pool = images, batches, pool
        self.device_decode, self.readers = device_decode, max(1, readers)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Fetched]:
        with ThreadPoolExecutor(self.readers, thread_name_prefix="tlfeat-read") as threads:
            pending: deque[Future[Fetched]] = deque()
            try:
                for index, rows in enumerate(self.batches):
                    pending.append(threads.submit(self.fetch, index, rows))
                    if len(pending) > self.readers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def fetch(self, index: int, rows: list[int]) -> Fetched:
        items = self.images.items(rows)
        out = Fetched(index, np.asarray(rows), np.zeros((len(rows), 32), np.uint8), [""] * len(rows))
        cpu_items: list[images.Item] = []
        cpu_positions: list[int] = []
        for pos, item in enumerate(items):
            if self.device_decode:
                try:
                    content, name = images.read(item)
                except TlfeatError:  # the CPU path reports it (or records it, with --on-error skip)
                    content, name = None, ""
                if isinstance(content, np.ndarray) and _as_image_array(content):
                    out.digests[pos] = np.frombuffer(images.content_digest(content), np.uint8)
                    out.arrays.append((pos, content))
                    continue
                if isinstance(content, bytes) and (kind := jpeg_kind(content)) is not None:
                    out.digests[pos] = np.frombuffer(images.content_digest(content), np.uint8)
                    out.jpegs.append((pos, bytearray(content), kind, name))
                    continue
                if content is not None:  # read once: the workers get the bytes, not the path
                    item = ("array", (content, name)) if isinstance(content, np.ndarray) else ("bytes", (content, name))
            cpu_positions.append(pos)
            cpu_items.append(item)
        if cpu_items:
            out.cpu.append((cpu_positions, self.pool.submit(cpu_items)))
        return out


# --------------------------------------------------------------------------- stage 2: on the device


@dataclass
class Prepared:
    """A batch ready for the network: float32 (n, 3, crop, crop) on the device, normalised."""

    fetched: Fetched
    x: Any
    ready: Any = None  # a CUDA event the network's stream waits for (None on the CPU)


class _Staging:
    """Host -> device copies through two pinned buffers, each reused only once its copy finished."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers: list[Any] = [None, None]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def upload(self, array: np.ndarray) -> Any:
        import torch

        source = torch.from_numpy(np.ascontiguousarray(array))
        if not self.pinned:
            return source.to(self.device)
        k, self.turn = self.turn, 1 - self.turn
        if self.events[k] is not None:
            self.events[k].synchronize()
        buffer = self.buffers[k]
        if buffer is None or buffer.numel() < source.numel():
            buffer = self.buffers[k] = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=True)
        staged = buffer[: source.numel()].view(source.shape)
        staged.copy_(source)
        out = staged.to(self.device, non_blocking=True)
        self.events[k] = torch.cuda.Event()
        self.events[k].record()
        return out


class Preparer:
    """Decode, resize, crop and normalise batches on one device (see the module's docstring)."""

    def __init__(self, prep: Preprocessing, device: str, pool: DecodePool) -> None:
        import torch
        from torchvision.transforms.v2 import InterpolationMode

        warnings.filterwarnings("ignore", message=r"The image decoding and encoding capabilities of TorchVision")
        self.prep, self.pool = prep, pool
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.staging = _Staging(self.device)
        self.mode = InterpolationMode(prep.interpolation)
        self.mean = torch.tensor(prep.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(prep.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.refused: set[str] = set()  # JPEG kinds this device's decoder turned down: straight to the CPU

    def __call__(self, fetched: Fetched) -> Prepared:
        import torch

        if not self.cuda:
            return Prepared(fetched, self._prepare(fetched))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = self._prepare(fetched)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return Prepared(fetched, x, ready)

    def _prepare(self, fetched: Fetched) -> Any:
        import torch

        pieces, order = [], []
        by_shape: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
        for pos, image in self._decode(fetched) + self._upload(fetched.arrays):
            by_shape.setdefault(tuple(image.shape), []).append((pos, image))
        for group in by_shape.values():
            pieces.append(self.resize_crop(torch.stack([image for _, image in group])))
            order += [pos for pos, _ in group]
        for positions, future in fetched.cpu:
            pieces.append(self._join_cpu(fetched, positions, future))
            order += positions
        if sorted(order) != list(range(len(fetched.rows))):
            raise TlfeatError(f"internal: batch {fetched.index} lost track of its images")
        crops = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        rows = torch.from_numpy(np.argsort(np.asarray(order)))  # the crop of each row, in row order
        batch = crops[rows.to(self.device, non_blocking=True)]
        return batch.float().div_(255.0).sub_(self.mean).div_(self.std)

    def resize_crop(self, x: Any) -> Any:
        """uint8 (k, 3, h, w) -> (k, 3, crop, crop): torchvision's resize of the short side, centre crop."""
        from torch.nn.functional import pad
        from torchvision.transforms.v2.functional import resize

        h, w = x.shape[-2:]
        new_h, new_w = self.prep.resized_shape(h, w)
        if (new_h, new_w) != (h, w):
            x = resize(x, [new_h, new_w], interpolation=self.mode, antialias=self.prep.antialias)
        crop = self.prep.crop_size
        pad_h, pad_w = max(crop - new_h, 0), max(crop - new_w, 0)
        if pad_h or pad_w:  # torchvision pads with zeros, left/top getting the smaller half
            x = pad(x, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2])
        h, w = x.shape[-2:]
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        return x[..., top : top + crop, left : left + crop]

    def _decode(self, fetched: Fetched) -> list[tuple[int, Any]]:
        """The batch's JPEGs on the device; any it refuses go to the CPU workers with the rest."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.stream is not None:
            # decode_jpeg allocates its outputs on this stream but writes them from nvJPEG's own: a block
            # freed here while kernels queued here still read it would be overwritten early
            # (pytorch/vision#9606). With this stream idle, every freed block is really free.
            self.stream.synchronize()
        todo = [j for j in fetched.jpegs if j[2] not in self.refused]
        refused = [j for j in fetched.jpegs if j[2] in self.refused]
        tensors = [torch.frombuffer(content, dtype=torch.uint8) for _, content, _, _ in todo]
        out: list[tuple[int, Any]] = []
        try:
            if tensors:
                decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
                out = [(pos, image) for (pos, *_), image in zip(todo, decoded, strict=True)]
        except RuntimeError:  # one bad file fails the whole batch: decode one at a time to find it
            failed: list[tuple[int, bytearray, str, str]] = []
            for job, tensor in zip(todo, tensors, strict=True):
                try:
                    out.append((job[0], decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device)))
                except RuntimeError:
                    failed.append(job)
            worked = {j[2] for j in todo} - {j[2] for j in failed}
            for kind in {j[2] for j in failed} - worked:
                if sum(j[2] == kind for j in failed) >= 2:  # a kind of JPEG, not a damaged file
                    log.info("%s: the device decoder refuses %s JPEGs; the CPU decodes them", self.device, kind)
                    self.refused.add(kind)
            refused += failed
        if refused:
            positions = {pos for pos, *_ in refused}
            fetched.jpegs = [j for j in fetched.jpegs if j[0] not in positions]
            items: list[images.Item] = [("bytes", (bytes(content), name)) for _, content, _, name in refused]
            fetched.cpu.append(([pos for pos, *_ in refused], self.pool.submit(items)))
        return out

    def _upload(self, arrays: list[tuple[int, np.ndarray]]) -> list[tuple[int, Any]]:
        """In-memory images as uint8 (3, h, w) on the device, one copy per shape."""
        by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for pos, array in arrays:
            by_shape.setdefault(array.shape, []).append((pos, array))
        out = []
        for shape, group in by_shape.items():
            stack = self.staging.upload(np.stack([a for _, a in group]))
            stack = stack[:, None].expand(-1, 3, -1, -1) if len(shape) == 2 else stack.permute(0, 3, 1, 2)
            out += [(pos, stack[k]) for k, (pos, _) in enumerate(group)]
        return out

    def _join_cpu(self, fetched: Fetched, positions: list[int], future: Future[Decoded]) -> Any:
        """The CPU workers' crops, uploaded; their digests and errors into the batch's."""
        decoded = self.pool.result(future)
        fetched.digests[positions] = decoded.digests
        for pos, error in zip(positions, decoded.errors, strict=True):
            fetched.errors[pos] = error
        return self.staging.upload(decoded.crops)
