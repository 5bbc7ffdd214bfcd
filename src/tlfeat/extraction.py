"""Stage 1: run a frozen pretrained CNN once over a dataset and cache the features.

data -> (decode, resize, normalise in DataLoader workers) -> frozen backbone, channels_last,
inference_mode -> float32 rows streamed into an HDF5 file in chunks.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import __version__, allocator, backbones, cache, datasets
from tlfeat.config import ExtractConfig
from tlfeat.errors import CacheDamaged, CacheMismatch, TlfeatError
from tlfeat.weights import ResolvedWeights, build_with_weights, resolve

log = logging.getLogger(__name__)

LAYER_DEFAULT = "penultimate"
CPU_MICRO_BATCH = 4  # images per torch forward pass on CPU (see _prepare_model)
FLUSH_EVERY = 1024  # images per saved block: the most an interrupted run can lose (env TLFEAT_FLUSH_EVERY)


def preprocessing(model: str, weights_id: str | None, image_size: int | None) -> dict[str, Any]:
    """The weights entry's own eval transform, optionally scaled down to `image_size`."""
    entry = backbones.weights_entry(model, weights_id)
    kw = dict(getattr(entry.transforms, "keywords", {}))
    transform = entry.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    if image_size is not None:
        if image_size < 16 or image_size > 2048:
            raise TlfeatError(f"--image-size must be between 16 and 2048 pixels, got {image_size}")
        # Keep the weights' resize/crop ratio (e.g. 256/224) at the new size.
        resize = int(round(image_size * resize / crop))
        crop = image_size
    kw.update(crop_size=crop, resize_size=resize)
    return {
        "crop_size": crop,
        "resize_size": resize,
        "mean": [float(m) for m in transform.mean],
        "std": [float(s) for s in transform.std],
        "interpolation": str(transform.interpolation.value),
        "antialias": bool(transform.antialias),
    }


def make_transform(prep: dict[str, Any]):  # type: ignore[no-untyped-def]
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(
        crop_size=prep["crop_size"],
        resize_size=prep["resize_size"],
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
        interpolation=InterpolationMode(prep["interpolation"]),
        antialias=prep["antialias"],
    )


class ResizeCrop:
    """The PIL half of `make_transform`: resize and centre crop to a uint8 CHW tensor.

    Decoding workers send these to the main process, a quarter of the bytes of float32, and
    `Normalize` finishes the batch there with the same arithmetic, so the features are
    bit-for-bit those of `make_transform` (tested).
    """

    def __init__(self, prep: dict[str, Any]) -> None:
        self.prep = prep

    def __call__(self, img: Any):  # type: ignore[no-untyped-def]
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        interpolation = InterpolationMode(self.prep["interpolation"])
        img = F.resize(img, [self.prep["resize_size"]], interpolation=interpolation, antialias=self.prep["antialias"])
        return F.pil_to_tensor(F.center_crop(img, [self.prep["crop_size"]]))


class Normalize:
    """uint8 NCHW batch -> float32, / 255, - mean, / std: torchvision's operations, in place.

    On CPU a few images at a time, so each pass stays in cache (2.5x faster than the whole batch
    here), into one buffer reused from batch to batch (a 64-image batch is 38 MB, which glibc
    would map and fault in afresh every time). On a GPU the uint8 batch is copied over first.
    The result is only valid until the next call.
    """

    def __init__(self, prep: dict[str, Any], device: str = "cpu") -> None:
        self.prep, self.device = prep, device
        self.buffer: Any = None

    def __call__(self, batch: Any):  # type: ignore[no-untyped-def]
        import torch

        batch = batch.to(self.device, non_blocking=True)
        if self.buffer is None or self.buffer.shape[1:] != batch.shape[1:] or len(self.buffer) < len(batch):
            self.buffer = torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
            self.mean = torch.tensor(self.prep["mean"], dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
            self.std = torch.tensor(self.prep["std"], dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        out = self.buffer[: len(batch)]
        step = 4 if batch.device.type == "cpu" else len(batch)
        for i in range(0, len(batch), step):
            part = out[i : i + step]
            part.copy_(batch[i : i + step])
            part.div_(255.0).sub_(self.mean).div_(self.std)
        return out


ON_ERROR = ("fail", "skip")
BACKENDS = ("auto", "torch", "onnxruntime")


def choose_backend(cfg: ExtractConfig) -> str:
    """The backend that will run: ONNX Runtime on CPU where installed (measured faster), else torch."""
    from tlfeat import onnx_backend

    if cfg.backend not in BACKENDS:
        raise TlfeatError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.backend == "torch":
        return "torch"
    if cfg.backend == "onnxruntime":
        onnx_backend.require()
        if not cfg.device.startswith("cpu"):
            raise TlfeatError("--backend onnxruntime runs on the CPU; use --backend torch with --device " + cfg.device)
        if cfg.layer is not None:
            raise TlfeatError("--backend onnxruntime extracts the penultimate layer; use --backend torch for --layer")
        return "onnxruntime"
    usable = cfg.device.startswith("cpu") and cfg.layer is None and onnx_backend.available()
    return "onnxruntime" if usable else "torch"


class _Images:
    """torch Dataset over an ImageSplit, yielding (resized uint8 tensor, error) from `start` on.

    With `skip`, an image that cannot be decoded yields a zero tensor and its error message, so the
    batch keeps its shape and the row is recorded as skipped; otherwise the error propagates.
    """

    def __init__(self, split: datasets.ImageSplit, transform: Any, start: int, crop: int, skip: bool) -> None:
        self.split, self.transform, self.start, self.crop, self.skip = split, transform, start, crop, skip

    def __len__(self) -> int:
        return len(self.split) - self.start

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        try:
            return self.transform(self.split.image(self.start + i)), ""
        except TlfeatError as exc:
            if not self.skip:
                raise
            import torch

            return torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), str(exc)


def _weights_key(cfg: ExtractConfig) -> tuple[str, ResolvedWeights | None]:
    """The weights id for the cache key, computed without touching the network."""
    if cfg.untrained:
        return f"untrained:seed{cfg.seed}", None
    if cfg.weights_file is not None:
        resolved = resolve(cfg.model, cfg.weights_id, cfg.weights_file)
        return resolved.weights_id, resolved
    return backbones.weights_entry(cfg.model, cfg.weights_id).name, None


def plan(cfg: ExtractConfig) -> list[tuple[str, Path, dict[str, Any]]]:
    """(split, cache file, key fields) for every split the request covers."""
    backbones.check_model(cfg.model)
    if cfg.on_error not in ON_ERROR:
        raise TlfeatError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {cfg.on_error!r}")
    if cfg.batch_size <= 0 or cfg.batch_size > 65536:
        raise TlfeatError(f"--batch-size must be between 1 and 65536, got {cfg.batch_size}")
    if cfg.workers is not None and not 0 <= cfg.workers <= 256:
        raise TlfeatError(f"--workers must be between 0 and 256, got {cfg.workers}")
    if cfg.limit is not None and cfg.limit <= 0:
        raise TlfeatError(f"--limit must be a positive number of images, got {cfg.limit}")
    if cfg.layer is not None:
        backbones.feature_dim(cfg.model, cfg.layer)  # raises, naming the valid layers, before any work
    dataset_id = datasets.canonical(cfg.data)
    available = datasets.splits(cfg.data)
    wanted = cfg.splits or available
    for split in wanted:
        if split not in available:
            raise TlfeatError(f"{cfg.data} has no split {split!r}; valid: {', '.join(available)}")
    weights_id, _ = _weights_key(cfg)
    backend = choose_backend(cfg)
    prep = preprocessing(cfg.model, cfg.weights_id, cfg.image_size)
    out = []
    for split in wanted:
        key_fields = {
            "format": cache.FORMAT_VERSION,
            "model": cfg.model,
            "weights_id": weights_id,
            "layer": cfg.layer or LAYER_DEFAULT,
            "pooling": "global-average",
            "preprocessing": prep,
            "dataset": dataset_id,
            "split": split,
            "limit": cfg.limit,
            "backend": backend,
        }
        key = cache.cache_key(key_fields)
        path = cache.cache_path(cfg.resolved_cache_dir(), cfg.model, datasets.dataset_slug(dataset_id), split, key)
        out.append((split, path, key_fields))
    return out


def default_workers() -> int:
    """Decoding processes: one per core up to 4. On 2 cores, 2 workers beside the inference threads
    measured 117 img/s end to end against 104 with 1 (MobileNetV2, ONNX Runtime, 500 x 375 JPEGs)."""
    return max(1, min(4, os.cpu_count() or 2))


def extract(cfg: ExtractConfig) -> list[cache.FeatureSet]:
    """Extract (or reuse) features for every requested split; one FeatureSet per split."""
    results: list[cache.FeatureSet] = []
    model = None
    resolved: ResolvedWeights | None = None
    for split, path, key_fields in plan(cfg):
        fs = _reuse_any(cfg, path, key_fields)
        if fs is not None:
            results.append(fs)
            continue
        with cache.lock(path):
            fs = _reuse(path, key_fields)  # another process may have finished it while this one waited
            if fs is not None:
                results.append(fs)
                continue
            if model is None:
                allocator.pin_malloc_thresholds()
                resolved = resolve(cfg.model, cfg.weights_id, cfg.weights_file, untrained=cfg.untrained, seed=cfg.seed)
                model = _prepare_model(cfg, resolved, key_fields)
            assert resolved is not None
            results.append(_extract_split(cfg, split, path, key_fields, model, resolved))
    return results


def _reuse(path: Path, key_fields: dict[str, Any]) -> cache.FeatureSet | None:
    """The finished features under `path`, or None when they must be computed.

    A damaged file (truncated, edited, older format) is moved aside, never deleted, and rebuilt.
    """
    if not path.is_file():
        return None
    try:
        fs = cache.read(path)
    except CacheDamaged as exc:
        aside = cache.set_aside(path)
        log.warning("%s; moved it to %s and extracting again", str(exc).split(";")[0], aside.name)
        return None
    _check_same(fs, key_fields)
    fs.reused = True
    log.info("reusing %s", path)
    return fs


def candidates(cfg: ExtractConfig, path: Path, key_fields: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Cache files this request may use, in order: its own, then (with --backend auto) other backends'.

    Features another backend already computed are reused rather than computed twice.
    """
    out = [(path, key_fields)]
    if cfg.backend == "auto":
        stem = path.name.rsplit("__", 1)[0]
        for other in BACKENDS[1:]:
            if other != key_fields["backend"]:
                fields = {**key_fields, "backend": other}
                out.append((path.with_name(f"{stem}__{cache.cache_key(fields)}{cache.SUFFIX}"), fields))
    return out


def _reuse_any(cfg: ExtractConfig, path: Path, key_fields: dict[str, Any]) -> cache.FeatureSet | None:
    for candidate, fields in candidates(cfg, path, key_fields):
        fs = _reuse(candidate, fields)
        if fs is not None:
            return fs
    return None


def _check_same(fs: cache.FeatureSet, key_fields: dict[str, Any]) -> None:
    """A file found under a key's name must hold what that key describes."""
    import json

    stored = json.loads(str(fs.meta.get("key_fields", "{}")))
    diffs = [f"{k}: stored {stored.get(k)!r}, asked {v!r}" for k, v in key_fields.items() if stored.get(k) != v]
    if diffs or fs.meta.get("key") != cache.cache_key(key_fields):
        raise CacheMismatch(
            f"{fs.path} does not hold what was asked ({'; '.join(diffs) or 'key differs'}); "
            "move it away and run extract again"
        )


def _prepare_model(cfg: ExtractConfig, resolved: ResolvedWeights, key_fields: dict[str, Any]):  # type: ignore[no-untyped-def]
    """A callable: preprocessed float32 batch (torch tensor) in, (n, d) float32 numpy features out."""
    import torch

    net = build_with_weights(cfg.model, resolved)
    extractor = backbones.feature_extractor(net, cfg.model, cfg.layer)
    for p in extractor.parameters():
        p.requires_grad_(False)
    extractor = extractor.eval()
    if key_fields["backend"] == "onnxruntime":
        from tlfeat import onnx_backend

        size = int(key_fields["preprocessing"]["crop_size"])
        onnx_path = onnx_backend.export_path(
            cfg.resolved_cache_dir(), cfg.model, resolved.weights_id, resolved.sha256 or "", size
        )
        # The decoding workers share these cores, so ONNX Runtime's idle threads must not spin.
        return onnx_backend.Session(onnx_backend.export(extractor, onnx_path, size), spin=False)
    extractor = extractor.to(cfg.device, memory_format=torch.channels_last)

    # On CPU, torch convolutions run fastest on a few images at a time (the activations stay in
    # cache): measured 16-17 img/s for ResNet-50 at 2-16 images against 10-14 at 32.
    step = CPU_MICRO_BATCH if cfg.device.startswith("cpu") else cfg.batch_size

    def run(batch: torch.Tensor) -> Any:  # `batch` is already on cfg.device (see Normalize)
        batch = batch.contiguous(memory_format=torch.channels_last)
        parts = [extractor(batch[i : i + step]).float().cpu().numpy() for i in range(0, len(batch), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return run


def _extract_split(
    cfg: ExtractConfig, split: str, path: Path, key_fields: dict[str, Any], model: Any, resolved: ResolvedWeights
) -> cache.FeatureSet:
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    images = datasets.load_split(cfg.data, split, cfg.data_dir, cfg.limit)
    if len(images) == 0:
        raise TlfeatError(f"{cfg.data} split {split!r} has no images")
    prep = key_fields["preprocessing"]
    attrs: dict[str, Any] = {
        "tlfeat_version": __version__,
        "format": cache.FORMAT_VERSION,
        "model": cfg.model,
        "weights_id": resolved.weights_id,
        "weights_source": resolved.source,
        "weights_sha256": resolved.sha256 or "",
        "pretrained": resolved.pretrained,
        "layer": cfg.layer or LAYER_DEFAULT,
        "pooling": "global-average",
        "preprocessing": _json(prep),
        "image_size": prep["crop_size"],
        "dataset": images.dataset,
        "dataset_source": images.source,
        "split": split,
        "limit": cfg.limit or 0,
        "split_seed": datasets.SPLIT_SEED,
        "backend": key_fields["backend"],
        "onnxruntime_version": getattr(model, "version", ""),
        "device": cfg.device,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "key_fields": _json(key_fields),
    }
    writer = cache.Writer(
        path,
        cache.cache_key(key_fields),
        attrs,
        images.labels,
        list(images.ids),
        list(images.class_names),
        flush_every=int(os.environ.get("TLFEAT_FLUSH_EVERY") or FLUSH_EVERY),
    )
    start = writer.done
    workers = cfg.workers if cfg.workers is not None else default_workers()
    if len(images) - start <= cfg.batch_size:
        workers = 0  # starting worker processes costs more than decoding one batch
    loader = DataLoader(
        _Images(images, ResizeCrop(prep), start, prep["crop_size"], skip=cfg.on_error == "skip"),
        batch_size=cfg.batch_size,
        num_workers=workers,
        shuffle=False,
        pin_memory=cfg.device.startswith("cuda"),
    )
    t0 = time.perf_counter()
    bar = _progress(
        cfg, total=len(images), initial=start, desc=f"{cfg.model} {datasets.dataset_slug(images.dataset)}/{split}"
    )
    try:
        normalize = Normalize(prep, cfg.device)
        with torch.inference_mode():
            for batch, errors in loader:
                feats = model(normalize(batch))
                writer.append(feats, list(errors))
                for err in errors:
                    if err:
                        log.warning("skipped: %s", err)
                bar.update(len(feats))
    except BaseException:
        writer.close()  # keep the finished blocks for `extract` to resume
        bar.close()
        raise
    bar.close()
    seconds = time.perf_counter() - t0
    final = writer.finish(
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extract_seconds": seconds,
            "images_per_second": (len(images) - start) / max(seconds, 1e-9),
            "resumed_from": start,
        }
    )
    fs = cache.read(final)
    log.info("wrote %s (%d x %d) in %.1fs", final, fs.X.shape[0], fs.X.shape[1], seconds)
    return fs


def _progress(cfg: ExtractConfig, total: int, initial: int, desc: str):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="img", disable=not cfg.progress, dynamic_ncols=True, leave=False
    )


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


def load_features(
    model: str,
    data: str,
    split: str = "train",
    cache_dir: str | Path | None = None,
    *,
    layer: str | None = None,
    weights_id: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
) -> cache.FeatureSet:
    """Load cached features of `model` on `data` (the same string given to `--data`).

    With no selectors, the penultimate-layer set is loaded if exactly one matches; pass `layer`,
    `weights_id`, `image_size` or `limit` to choose among several.
    """
    cfg = ExtractConfig(model=model, data=data, cache_dir=Path(cache_dir) if cache_dir else None)
    path = cache.find(
        cfg.resolved_cache_dir(),
        model,
        datasets.canonical(data),
        split,
        layer=layer or LAYER_DEFAULT,
        weights_id=weights_id,
        image_size=image_size,
        limit=limit,
    )
    return cache.read(path)
