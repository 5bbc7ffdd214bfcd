"""Stage 1: run a frozen pretrained CNN once over a dataset and cache the features.

For each split and layer asked for, a `Target`: a cache file named by a key derived from the
config's `key` fields. A target is reused when its file holds features of the images as they are
now; updated when the images changed (only added and modified images are computed, the rest carried
over by id, and the new file equals a fresh extraction bit for bit); computed otherwise. All layers
of one split come from one pass over its images.
"""

from __future__ import annotations

import glob
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tlfeat import __version__, backbones, cache, catalog, config, constraints, datasets, fingerprint, fsio
from tlfeat.config import ExtractConfig
from tlfeat.datasets import ImageSplit
from tlfeat.errors import CacheDamaged, CacheMismatch, StaleFeatures, TlfeatError, printable
from tlfeat.preprocess import Preprocessing

log = logging.getLogger(__name__)

LAYER_DEFAULT = backbones.PENULTIMATE
POOLING = "global-average"


# --------------------------------------------------------------------------- the cache key


@dataclass(frozen=True)
class Context:
    """What the key of one file is computed from: the config, and what it resolves to."""

    cfg: ExtractConfig
    split: str
    layer: str | None
    dataset: str
    weights_id: str
    backend: str
    prep: Preprocessing


# Key fields that enter the key in a resolved form; every other `key` field of ExtractConfig enters
# as its plain value, so a new option that changes the numbers reaches the key with one edit in config.py.
KEY_RESOLVERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "model": lambda c: {"model": c.cfg.model},
    "data": lambda c: {"dataset": c.dataset},
    "layer": lambda c: {"layer": c.layer or LAYER_DEFAULT},
    "weights_id": lambda c: {"weights_id": c.weights_id},
    "weights_file": lambda c: {"weights_id": c.weights_id},
    "untrained": lambda c: {"weights_id": c.weights_id},
    "seed": lambda c: {"weights_id": c.weights_id},
    "image_size": lambda c: {"preprocessing": c.prep.key()},
    "fast_decode": lambda c: {"preprocessing": c.prep.key()},
    "limit": lambda c: _limit(c),
    "test_limit": lambda c: _limit(c),
    "subset_seed": lambda c: _limit(c),
    "label_field": lambda c: {"label_field": c.cfg.label_field} if c.dataset.startswith("shards:") else {},
    "backend": lambda c: {"backend": c.backend},
    "device": lambda c: {"device": c.cfg.device.split(":")[0]},
}


def _limit(c: Context) -> dict[str, Any]:
    limit = c.cfg.split_limit(c.split)
    return {"limit": limit} if limit is None else {"limit": limit, "subset_seed": c.cfg.subset_seed}


def key_fields(ctx: Context) -> dict[str, Any]:
    fields: dict[str, Any] = {"format": cache.FORMAT_VERSION, "split": ctx.split, "pooling": POOLING}
    for name in constraints.key_fields(ctx.cfg):
        resolve = KEY_RESOLVERS.get(name)
        value = getattr(ctx.cfg, name)
        fields.update(resolve(ctx) if resolve else {name: str(value) if isinstance(value, Path) else value})
    return fields


@dataclass
class Target:
    """One cache file to produce: a split at a layer."""

    split: str
    layer: str | None
    path: Path
    key_fields: dict[str, Any]
    key: str


def choose_backend(cfg: ExtractConfig) -> str:
    """The backend that will run: ONNX Runtime on CPU where installed (measured faster), else torch."""
    from tlfeat import onnx_backend

    cpu = cfg.device.startswith("cpu")
    if cfg.backend == "torch":
        return "torch"
    if cfg.precision != "fp32":
        if cfg.backend == "onnxruntime":
            raise TlfeatError(
                f"--precision {cfg.precision} is GPU autocast in torch; use --backend torch with --device cuda"
            )
        return "torch"
    if cfg.backend == "onnxruntime":
        onnx_backend.require()
        if not cpu:
            raise TlfeatError(f"--backend onnxruntime runs on the CPU; use --backend torch with --device {cfg.device}")
        return "onnxruntime"
    return "onnxruntime" if cpu and onnx_backend.available() else "torch"


def weights_id(cfg: ExtractConfig) -> str:
    """The weights id for the cache key, computed without torch and without the network."""
    if cfg.untrained:
        return f"untrained:seed{cfg.seed}"
    if cfg.weights_file is not None:
        from tlfeat.weights import resolve

        return resolve(cfg.model, cfg.weights_id, cfg.weights_file).weights_id
    return backbones.weights_entry(cfg.model, cfg.weights_id).name


def plan(cfg: ExtractConfig) -> list[Target]:
    """Every cache file the request covers: (split, layer) pairs, in split order."""
    backbones.check_model(cfg.model)
    dataset = datasets.canonical(cfg.data)
    available = datasets.splits(cfg.data)
    for split in cfg.splits or available:
        if split not in available:
            raise TlfeatError(f"{printable(cfg.data)} has no split {split!r}; valid: {', '.join(available)}")
    wid, backend = weights_id(cfg), choose_backend(cfg)
    prep = backbones.preprocessing(cfg.model, cfg.weights_id, cfg.image_size, cfg.fast_decode)
    out = []
    for split in cfg.splits or available:
        for layer in cfg.layers():
            fields = key_fields(Context(cfg, split, layer, dataset, wid, backend, prep))
            key = cache.cache_key(fields)
            path = cache.cache_path(cfg.resolved_cache_dir(), cfg.model, _file_stem(dataset, layer), split, key)
            out.append(Target(split, layer, path, fields, key))
    named = [layer for layer in cfg.layers() if layer is not None]
    if named and not all(t.path.is_file() for t in out):
        backbones.check_layers(cfg.model, named)  # raises, naming the valid layers, before any work
    return out


def _file_stem(dataset: str, layer: str | None) -> str:
    slug = datasets.dataset_slug(dataset)
    return slug if layer is None else f"{slug}__{''.join(c if c.isalnum() else '_' for c in layer)}"


def alternatives(cfg: ExtractConfig, target: Target) -> list[tuple[Path, dict[str, Any]]]:
    """With --backend auto, the same features from the other backend: reused rather than computed twice."""
    if cfg.backend != "auto":
        return []
    out = []
    for other in ("torch", "onnxruntime"):
        if other != target.key_fields["backend"]:
            fields = {**target.key_fields, "backend": other}
            stem = target.path.name.rsplit("__", 1)[0]
            out.append((target.path.with_name(f"{stem}__{cache.cache_key(fields)}{cache.SUFFIX}"), fields))
    return out


# --------------------------------------------------------------------------- reuse, staleness


@dataclass
class State:
    """What a target's file holds compared with the images now."""

    target: Target
    fs: cache.FeatureSet | None = None  # the file's features, when they can be returned as they are
    changes: fingerprint.Changes | None = None  # how the images differ, when the file is stale
    old: Path | None = None  # the stale file, to carry rows over from


def assess(cfg: ExtractConfig, target: Target, images: ImageSplit, locked: bool = False) -> State:
    """Reuse, update or compute `target`, looking at its file (and the other backend's).

    A damaged file of the target is moved aside (never deleted) only when `locked`: until then
    another process may be rewriting it.
    """
    for path, fields in [(target.path, target.key_fields), *alternatives(cfg, target)]:
        if not path.is_file():
            continue
        try:
            meta = cache.check(path, verify=False)
            _check_same(path, meta, fields)
            changes = fingerprint.compare(
                cache.stored_index(path), str(meta.get("signature", "")), images, cfg.verify_content
            )
            if changes.stale:
                cache.check(path, verify=True)  # rows are carried over only from a file that passes its checksums
                fs = None
            else:
                fs = cache.read(path)
        except CacheDamaged as exc:
            if locked and path == target.path:
                aside = fsio.set_aside(path)
                log.warning("%s; moved it to %s and extracting again", str(exc).split(";")[0], aside.name)
            continue
        if fs is not None:
            fs.reused = True
            return State(target, fs=fs)
        if path == target.path:
            return State(target, changes=changes, old=path)
    return State(target)


def _set_aside_older(target: Target) -> None:
    """Files of the same model, dataset, split and layer from an older tlfeat: their key holds the
    format, so no request names them again; moved aside (never deleted) as this one is rebuilt."""
    stem = target.path.name.rsplit("__", 1)[0]
    for path in target.path.parent.glob(f"{glob.escape(stem)}__*{cache.SUFFIX}"):
        if path == target.path:
            continue
        try:
            fmt = cache.read_attrs(path).get("format")
        except (OSError, KeyError, ValueError, RuntimeError):
            continue  # not readable as HDF5: `ls` says so; it may belong to a key still in use
        if isinstance(fmt, int) and fmt < cache.FORMAT_VERSION:
            aside = fsio.set_aside(path)
            log.warning("%s was written by an older tlfeat (format %d); moved it to %s", path.name, fmt, aside.name)


def _check_same(path: Path, meta: dict[str, Any], key_fields: dict[str, Any]) -> None:
    """A file found under a key's name must hold what that key describes."""
    import json

    stored = json.loads(str(meta.get("key_fields", "{}")))
    diffs = [f"{k}: stored {stored.get(k)!r}, asked {v!r}" for k, v in key_fields.items() if stored.get(k) != v]
    if diffs or meta.get("key") != cache.cache_key(key_fields):
        raise CacheMismatch(
            f"{path} does not hold what was asked ({'; '.join(diffs) or 'key differs'}); move it away and run extract again"
        )


def refuse_update(images: ImageSplit, state: State) -> StaleFeatures:
    assert state.changes is not None
    return StaleFeatures(
        f"the images of {printable(images.dataset)} ({images.split}) changed since {state.target.path.name} was made: "
        f"{state.changes.summary()} ({state.changes.examples(images)}); run without --no-update to update the features"
    )


# --------------------------------------------------------------------------- extract


def load_images(cfg: ExtractConfig, split: str) -> ImageSplit:
    images = datasets.load_split(
        cfg.data, split, cfg.data_dir, cfg.split_limit(split), subset_seed=cfg.subset_seed, label_field=cfg.label_field
    )
    if len(images) == 0:
        raise TlfeatError(f"{printable(cfg.data)} split {split!r} has no images")
    return images


def extract(cfg: ExtractConfig, echo: Callable[[str], None] | None = None) -> list[cache.FeatureSet]:
    """Extract, update or reuse features for every requested split and layer; one FeatureSet each."""
    from tlfeat import engine

    targets = plan(cfg)
    results: list[cache.FeatureSet] = []
    runner = engine.Runners(cfg)
    try:
        for split in dict.fromkeys(t.split for t in targets):
            group = [t for t in targets if t.split == split]
            images = load_images(cfg, split)
            states = [assess(cfg, t, images) for t in group]
            if all(s.fs is not None for s in states):
                results += [s.fs for s in states if s.fs is not None]
                continue
            with _locks([s.target.path for s in states if s.fs is None]):
                # Another process may have finished (or changed) these while this one waited.
                states = [s if s.fs is not None else assess(cfg, s.target, images, locked=True) for s in states]
                for s in states:
                    if s.fs is None:
                        _set_aside_older(s.target)
                for s in states:
                    if s.changes is not None and not cfg.update:
                        raise refuse_update(images, s)
                    if s.changes is not None and echo is not None:
                        echo(f"{split}: {s.target.path.name}: images changed ({s.changes.summary()}); updating")
                todo = [s for s in states if s.fs is None]
                if todo:
                    done = engine.compute(cfg, images, todo, runner)
                    for s in todo:
                        s.fs = done[s.target.path]
                results += [s.fs for s in states if s.fs is not None]
    finally:
        runner.close()
    return results


class _locks:
    """Hold the lock of several cache files at once (in name order, so two processes never deadlock)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = sorted(set(paths))
        self.stack: list[Any] = []

    def __enter__(self) -> None:
        for path in self.paths:
            ctx = fsio.lock(path)
            ctx.__enter__()
            self.stack.append(ctx)
            fsio.sweep_temps(path.parent)

    def __exit__(self, *exc: Any) -> None:
        while self.stack:
            self.stack.pop().__exit__(*exc)


def provenance(
    cfg: ExtractConfig, target: Target, images: ImageSplit, weights: dict[str, Any], runtime: dict[str, str]
) -> dict[str, Any]:
    """The attributes a cache file describes itself with."""
    import json

    from tlfeat.inference import versions

    prep = target.key_fields["preprocessing"]
    installed = versions()
    return {
        "tlfeat_version": __version__,
        "format": cache.FORMAT_VERSION,
        "model": cfg.model,
        "weights_id": weights.get("weights_id") or target.key_fields["weights_id"],
        "weights_source": weights.get("weights_source", ""),
        "weights_sha256": weights.get("weights_sha256", ""),
        "pretrained": not str(target.key_fields["weights_id"]).startswith("untrained:"),
        "layer": target.layer or LAYER_DEFAULT,
        "pooling": POOLING,
        "preprocessing": json.dumps(prep, sort_keys=True),
        "image_size": prep["crop_size"],
        "fast_decode": bool(prep.get("fast_decode", False)),
        "dataset": images.dataset,
        "dataset_source": images.source,
        "source_files": json.dumps(list(images.source_files)),
        "split": target.split,
        "limit": cfg.split_limit(target.split) or 0,
        "train_limit": cfg.limit or 0,
        "test_limit": cfg.test_limit or 0,
        "subset_seed": cfg.subset_seed if cfg.split_limit(target.split) is not None else 0,
        "data_dir": str(cfg.data_dir) if images.dataset in datasets.named_datasets() else "",
        "label_field": cfg.label_field,
        "split_seed": datasets.SPLIT_SEED,
        "backend": target.key_fields["backend"],
        "precision": cfg.precision,
        "engine": cfg.engine,
        "runtime_version": runtime.get("version", ""),
        "device": cfg.device,
        "torch_version": installed["torch"],
        "torchvision_version": installed["torchvision"],
        "onnxruntime_version": installed["onnxruntime"],
        "python_version": platform.python_version(),
        "key_fields": json.dumps(target.key_fields, sort_keys=True, default=str),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- loading from Python


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
    test_limit: int | None = None,
    subset_seed: int | None = None,
    backend: str | None = None,
    lazy: bool = False,
    allow_stale: bool = False,
) -> cache.FeatureSet:
    """Load cached features of `model` on `data` (the same string given to `--data`).

    With no selectors, the penultimate-layer set is loaded if exactly one matches; `layer`,
    `weights_id`, `image_size`, `limit` (of the training split) / `test_limit` (of the others),
    `subset_seed` and `backend` choose among several. `lazy=True` leaves the features on disk:
    `fs.X` reads rows on demand and `fs.iter_batches(n)` streams them.

    Where the images are still there, they are compared with the file's fingerprints first: features
    of images that changed since raise StaleFeatures (run `tlfeat extract` again to update them), unless
    `allow_stale=True`.
    """
    from tlfeat import freshness

    folder = Path(cache_dir) if cache_dir else config.default_cache_dir()
    path = catalog.find(
        folder,
        model,
        datasets.canonical(data),
        split,
        layer=layer or LAYER_DEFAULT,
        weights_id=weights_id,
        image_size=image_size,
        limit=limit if split == "train" else test_limit,
        subset_seed=subset_seed if split == "train" else None,  # only --limit subsets have one
        backend=backend,
    )
    if not allow_stale:
        freshness.require_fresh(
            [catalog.Entry(path, cache.read_attrs(path), "ok")], allow_stale_hint="allow_stale=True"
        )
    return cache.read(path, lazy=lazy)


__all__ = ["ExtractConfig", "State", "Target", "extract", "load_features", "plan"]
