"""Stage 1: run a frozen pretrained CNN once over a dataset and cache the features.

For each split and layer asked for, a `Target`: a cache file named by a key derived from the
config's `key` fields. A target is reused when its file holds features of the images as they are
now; updated when the images changed (only added and modified images are computed, the rest carried
over by id, and the new file equals a fresh extraction bit for bit); computed otherwise. All layers
of one split come from one pass over its images.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tlfeat import backbones, cache, catalog, config, constraints, datasets, engine, fingerprint, fsio
from tlfeat.backbones import Backbone, layer_name
from tlfeat.backbones.base import Store
from tlfeat.config import ExtractConfig
from tlfeat.datasets import ImageSplit
from tlfeat.errors import (
    CacheDamaged,
    CacheMismatch,
    ExportFailed,
    StaleFeatures,
    TlfeatError,
    did_you_mean,
    first_line,
    printable,
)
from tlfeat.preprocess import Preprocessing
from tlfeat.targets import State, Target

log = logging.getLogger(__name__)


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
    backbone: Backbone


# Key fields that enter the key in a resolved form; every other `key` field of ExtractConfig enters
# as its plain value, so a new option that changes the numbers reaches the key with one edit in config.py.
KEY_RESOLVERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "model": lambda c: {"model": c.cfg.model},
    "data": lambda c: {"dataset": c.dataset},
    "layer": lambda c: {
        "layer": layer_name(c.layer),
        "pooling": c.backbone.pooling(c.layer, c.cfg.pool),
        **c.backbone.cut(c.layer),
    },
    "pool": lambda c: {},  # in "pooling", with the layer it applies to
    "weights_id": lambda c: {"weights_id": c.weights_id},
    "weights_file": lambda c: {"weights_id": c.weights_id},
    "untrained": lambda c: {"weights_id": c.weights_id},
    "seed": lambda c: {"weights_id": c.weights_id},
    "image_size": lambda c: {"preprocessing": _prep_key(c)},
    "fast_decode": lambda c: {"preprocessing": _prep_key(c)},
    "limit": lambda c: _limit(c),
    "test_limit": lambda c: _limit(c),
    "subset_seed": lambda c: _limit(c),
    "label_field": lambda c: {"label_field": c.cfg.label_field} if c.dataset.startswith("shards:") else {},
    "backend": lambda c: {"backend": c.backend},
    "device": lambda c: {"device": c.cfg.device.split(":")[0]},
    # `--decode cpu` (what auto means on a CPU) adds nothing: the keys of files made before the option stay valid.
    "decode": lambda c: {} if c.cfg.resolved_decode() == "cpu" else {"decode": c.cfg.resolved_decode()},
}


def _prep_key(c: Context) -> dict[str, Any]:
    return c.prep.key(decoded=c.dataset not in datasets.named_datasets())  # named datasets are pixels, not files


def _limit(c: Context) -> dict[str, Any]:
    limit = c.cfg.split_limit(c.split)
    return {"limit": limit} if limit is None else {"limit": limit, "subset_seed": c.cfg.subset_seed}


def key_fields(ctx: Context) -> dict[str, Any]:
    fields: dict[str, Any] = {"format": cache.FORMAT_VERSION, "split": ctx.split}
    for name in constraints.key_fields(ctx.cfg):
        resolve = KEY_RESOLVERS.get(name)
        value = getattr(ctx.cfg, name)
        fields.update(resolve(ctx) if resolve else {name: str(value) if isinstance(value, Path) else value})
    return fields


def _export_memo() -> Store:
    from tlfeat.inference import versions

    return Store("onnx-exports", versions()["torch"] or "none")


def _export_id(cfg: ExtractConfig, image_size: int) -> str:
    return json.dumps([cfg.model, [layer_name(layer) for layer in cfg.layers()], image_size, cfg.pool])


def choose_backend(cfg: ExtractConfig, image_size: int | None = None) -> str:
    """The backend that will run: ONNX Runtime on CPU where installed (measured faster), else torch;
    torch for a network torch.onnx could not export before (remembered per torch version)."""
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
    exports = config.model_cache_dir() / "onnx"
    problem = onnx_backend.folder_problem(exports)
    if (
        problem
        and exports.is_dir()
        and any(exports.glob(f"{backbones.slug(cfg.model)}__{image_size or '*'}px__*.onnx"))
    ):
        problem = None  # a model cache that cannot be written still serves the exports it holds
    if cfg.backend == "onnxruntime":
        onnx_backend.require()
        if not cpu:
            raise TlfeatError(f"--backend onnxruntime runs on the CPU; use --backend torch with --device {cfg.device}")
        if problem:
            raise TlfeatError(
                f"--backend onnxruntime keeps its exports in TLFEAT_MODEL_CACHE, and {problem}; "
                "set TLFEAT_MODEL_CACHE to a writable folder, or use --backend torch"
            )
        return "onnxruntime"
    if image_size is not None and _export_memo().get("failed", _export_id(cfg, image_size)):
        return "torch"
    if not (cpu and onnx_backend.available()):
        return "torch"
    if problem:
        if problem not in _WARNED:
            _WARNED.add(problem)
            log.warning(
                "no ONNX export can be written into TLFEAT_MODEL_CACHE (%s): this extraction runs on torch; "
                "set TLFEAT_MODEL_CACHE to a writable folder for the faster ONNX Runtime",
                problem,
            )
        return "torch"
    return "onnxruntime"


_WARNED: set[str] = set()  # model cache problems already said in this process


def weights_id(cfg: ExtractConfig) -> str:
    """The weights id for the cache key, computed without torch and without the network."""
    from tlfeat.weights import weights_id as resolved_id

    return resolved_id(cfg.model, cfg.weights_id, cfg.weights_file, cfg.untrained, cfg.seed)


def plan(cfg: ExtractConfig) -> list[Target]:
    """Every cache file the request covers: (split, layer) pairs, in split order."""
    bb = backbones.resolve(cfg.model)
    dataset = datasets.canonical(cfg.data)
    refuse_inside(dataset, cfg.resolved_cache_dir(), "--cache-dir")
    available = datasets.splits(cfg.data)
    for split in cfg.splits or available:
        if split not in available:
            raise TlfeatError(
                f"{printable(cfg.data)} has no split {split!r}; valid: {', '.join(available)}."
                + did_you_mean(split, list(available))
            )
    prep = bb.preprocessing(cfg.weights_id, cfg.image_size, cfg.fast_decode)
    wid = weights_id(cfg)

    def targets(backend: str) -> list[Target]:
        out = []
        for split in cfg.splits or available:
            for layer in cfg.layers():
                fields = key_fields(Context(cfg, split, layer, dataset, wid, backend, prep, bb))
                key = cache.cache_key(fields)
                path = cache.cache_path(cfg.resolved_cache_dir(), bb.slug, _file_stem(dataset, layer), split, key)
                out.append(Target(split, layer, path, fields, key))
        return out

    out = targets(_backend(cfg, targets, prep.crop_size))
    named = [layer for layer in cfg.layers() if layer is not None]
    if not all(t.path.is_file() for t in out):  # before any work; a cache hit imports no torch
        bb.check_request(prep.crop_size, cfg.pool)
        if named:
            bb.check_layers(named)  # raises, naming the valid layers
    return out


def _backend(cfg: ExtractConfig, targets: Callable[[str], list[Target]], image_size: int) -> str:
    """The one backend of every file of a request. With --backend auto, the backend whose files
    already cover most of it (ties: the faster one), so that the splits of one extraction always
    pair: `extract --backend torch --split train`, then a plain `extract`, computes test with torch
    too. A backend that cannot run here is chosen only where its files cover everything."""
    chosen = choose_backend(cfg, image_size)
    if cfg.backend != "auto":
        return chosen
    options = {backend: targets(backend) for backend in dict.fromkeys((chosen, "torch", "onnxruntime"))}
    have = {backend: sum(t.path.is_file() for t in found) for backend, found in options.items()}
    usable = [b for b in options if b in (chosen, "torch") or have[b] == len(options[b])]
    return max(usable, key=lambda b: (have[b], b == chosen))


def refuse_inside(dataset: str, folder: Path, option: str) -> None:
    """An output folder inside a dataset folder would add its own files to the dataset: refused."""
    root = datasets.folder_of(dataset)
    if root is None:
        return
    where = Path(os.path.realpath(folder))
    if where == root or root in where.parents:
        raise TlfeatError(
            f"{option} {printable(str(folder))} is inside the dataset folder {printable(str(root))}; its files would "
            f"be read as images of the dataset: choose a folder outside it"
        )


def refuse_unreachable_weights(cfg: ExtractConfig) -> None:
    """Weights that only a download could bring, where no download can work: refused before any image
    is read and before torch is imported (WeightsNotFound names the ways to supply them)."""
    if cfg.untrained or cfg.weights_file is not None:
        return
    from tlfeat import network, weights

    path, source = weights.locate(cfg.model, cfg.weights_id)
    url = backbones.resolve(cfg.model).weights_entry(cfg.weights_id).url
    if path is None and source == "download" and not network.can_download(url):
        weights.resolve(cfg.model, cfg.weights_id)  # raises, without trying the download


def _file_stem(dataset: str, layer: str | None) -> str:
    slug = datasets.dataset_slug(dataset)
    return slug if layer is None else f"{slug}__{''.join(c if c.isalnum() else '_' for c in layer)}"


def extract_command(
    attrs: dict[str, Any], split: str, backend: str | None = None, cache_dir: Path | None = None
) -> str:
    """The `tlfeat extract` command that makes `split` of the extraction a cache file's attributes
    describe (with `backend`, where given): the exact command for advice, never "the same options"."""
    import shlex

    weights = str(attrs.get("weights_id") or "")
    args = [
        "tlfeat",
        "extract",
        "--model",
        str(attrs.get("model")),
        "--data",
        datasets.data_of(str(attrs.get("dataset"))),
    ]
    if weights.startswith("untrained:seed"):
        args += ["--untrained", "--seed", weights.removeprefix("untrained:seed")]
    elif weights.startswith("file:"):
        args += ["--weights", str(attrs.get("weights_source") or "FILE")]
    elif weights:
        args += ["--weights-id", weights]
    if attrs.get("layer") not in (None, "", layer_name(None)):
        args += ["--layer", str(attrs["layer"])]
    args += ["--image-size", str(attrs.get("image_size"))]
    for option, name in (("--limit", "train_limit"), ("--test-limit", "test_limit")):
        if int(attrs.get(name) or 0):
            args += [option, str(attrs[name])]
    if int(attrs.get("subset_seed") or 0):
        args += ["--subset-seed", str(attrs["subset_seed"])]
    if str(attrs.get("dataset", "")).startswith("shards:") and attrs.get("label_field", "cls") != "cls":
        args += ["--label-field", str(attrs["label_field"])]
    if attrs.get("fast_decode") in (False, 0):
        args.append("--no-fast-decode")
    for option, name, default in (("--precision", "precision", "fp32"), ("--device", "device", "cpu")):
        if attrs.get(name) not in (None, "", default):
            args += [option, str(attrs[name])]
    args += ["--backend", backend or str(attrs.get("backend") or "auto"), "--split", split]
    if cache_dir is not None and Path(cache_dir) != config.default_cache_dir():
        args += ["--cache-dir", str(cache_dir)]
    return " ".join(shlex.quote(printable(a)) for a in args)


# --------------------------------------------------------------------------- reuse, staleness


def assess(cfg: ExtractConfig, target: Target, images: ImageSplit, locked: bool = False) -> State:
    """Reuse, update or compute `target`, looking at its file.

    Images the file skipped as unreadable that read now are computed again (an update). A damaged
    file is moved aside (never deleted) only when `locked`: until then another process may be
    rewriting it.
    """
    path = target.path
    if not path.is_file():
        return State(target)
    try:
        meta = cache.check(path, verify=False)
        _check_same(path, meta, target.key_fields)
        changes = fingerprint.compare_file(path, meta, images, cfg.verify_content)
        changes.retry([i for i in changes.carried_skipped if _readable(images, i)])
        if changes.stale:
            cache.check(path, verify=True)  # rows are carried over only from a file that passes its checksums
            return State(target, changes=changes, old=path)
        fs = cache.read(path)
    except CacheDamaged as exc:
        if locked:
            aside = fsio.set_aside(path)
            log.warning("%s; moved it to %s and extracting again", str(exc).split(";")[0], aside.name)
        return State(target)
    fs.reused = True
    return State(target, fs=fs)


def _readable(images: ImageSplit, i: int) -> bool:
    """Can image i, skipped as unreadable when its file was made, be read and decoded now?"""
    try:
        images.image(i)
    except TlfeatError:
        return False
    return True


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
    """Extract, update or reuse features for every requested split and layer; one FeatureSet each.

    With `--backend auto`, a network that torch.onnx cannot export is said once and runs on torch
    (its files are keyed `torch`); later runs go to torch directly."""
    try:
        return _extract(cfg, echo)
    except ExportFailed as exc:
        if cfg.backend != "auto":
            raise
        size = backbones.resolve(cfg.model).preprocessing(cfg.weights_id, cfg.image_size).crop_size
        why = first_line(exc).split("; use --backend", 1)[0]
        _export_memo().put("failed", _export_id(cfg, size), why)
        log.warning("%s runs on torch: %s (remembered; later runs go to torch directly)", cfg.model, why)
        return _extract(replace(cfg, backend="torch"), echo)


def _extract(cfg: ExtractConfig, echo: Callable[[str], None] | None = None) -> list[cache.FeatureSet]:
    targets = plan(cfg)
    if not all(t.path.is_file() for t in targets):  # the backend chosen is the one whose files are there
        refuse_unreachable_weights(cfg)
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
    pooling: str | None = None,
    lazy: bool = False,
    allow_stale: bool = False,
) -> cache.FeatureSet:
    """Load cached features of `model` (`MODEL:untrained` for random weights) on `data` (the same string
    given to `--data`).

    With no selectors, the penultimate-layer set is loaded if exactly one matches; `layer`,
    `weights_id`, `image_size`, `limit` (of the training split) / `test_limit` (of the others),
    `subset_seed`, `backend` and `pooling` (as stored: "cls", "mean", "cls+mean" for `--pool`, or the
    source's own, e.g. "global-average") choose among several. `lazy=True` leaves the features on disk:
    `fs.X` reads rows on demand and `fs.iter_batches(n)` streams them.

    Where the images are still there, they are compared with the file's fingerprints first: features
    of images that changed since raise StaleFeatures (run `tlfeat extract` again to update them), unless
    `allow_stale=True`.
    """
    from tlfeat import freshness, onnx_backend

    folder = Path(cache_dir) if cache_dir else config.default_cache_dir()
    model, untrained = backbones.split_variant(model)  # MODEL:untrained, as extract and compare write it
    if untrained:
        weights_id = weights_id or f"{backbones.base.UNTRAINED}:seed0"
    # Among several variants, the one `tlfeat extract --model MODEL --data DATA` makes.
    prefer: dict[str, Any] = {"backend": "onnxruntime" if onnx_backend.available() else "torch"}
    try:
        entry = backbones.weights_entry(model, None if weights_id is None or ":" in weights_id else weights_id)
        prefer.update(weights_id=entry.name, image_size=entry.crop_size)
    except TlfeatError:  # not a model of the registry: no default to prefer
        pass
    path = catalog.find(
        folder,
        model,
        datasets.canonical(data),
        split,
        prefer=prefer,
        layer=layer_name(layer),
        weights_id=weights_id,
        image_size=image_size,
        limit=limit if split == "train" else test_limit,
        subset_seed=subset_seed if split == "train" else None,  # only --limit subsets have one
        backend=backend,
        pooling=pooling,
    )
    if not allow_stale:  # the hint names the command that updates them (export and analyze have no --allow-stale)
        freshness.require_fresh([catalog.Entry(path, cache.read_attrs(path), "ok")], allow_stale_hint=None)
    return cache.read(path, lazy=lazy)


__all__ = ["ExtractConfig", "State", "Target", "extract", "load_features", "plan"]
