"""Computing the rows a cache file lacks, and writing the file: the local engine (and Ray's driver side).

For each target, every row of the current image list is either already written (a resumed run),
carried over from the stale file or from an abandoned `.partial` of an earlier image list (same id,
same fingerprint), or computed. The rows to compute, over all targets of a split, go through one
pipeline: decoding workers -> normalisation -> the network (all layers at once) -> each target's
writer, in row order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import allocator, cache, config, inference, progress
from tlfeat.config import ExtractConfig
from tlfeat.datasets import ImageSplit
from tlfeat.errors import TlfeatError
from tlfeat.pool import DecodePool
from tlfeat.preprocess import Normalizer, Preprocessing
from tlfeat.targets import State, provenance
from tlfeat.writer import Listing, Writer

log = logging.getLogger(__name__)

# (row indices, one (n, d) array per layer, errors, digests) for consecutive rows to compute.
Chunk = tuple[np.ndarray, list[np.ndarray], list[str], np.ndarray]


def default_workers(device: str = "cpu") -> int:
    """Decoding processes: one per core up to 4. On 2 cores, 2 workers beside the inference threads
    measured 117 img/s end to end against 104 with 1 (MobileNetV2, ONNX Runtime, 500 x 375 JPEGs).
    With a GPU doing the network, every core but the one feeding it decodes."""
    if device.startswith("cuda"):
        return max(1, config.cores() - 1)
    return max(1, min(4, config.cores()))


class Runners:
    """The network, loaded once per `extract` call and only when a row must be computed."""

    def __init__(self, cfg: ExtractConfig) -> None:
        self.cfg = cfg
        self.runner: Any = None
        self.weights: dict[str, Any] = {}

    def get(self, spec: inference.ModelSpec) -> tuple[Any, dict[str, Any]]:
        if self.runner is None:
            allocator.pin_malloc_thresholds()
            if self.cfg.engine == "ray":  # the replicas run the network; the driver only ships it
                from tlfeat import ray_engine

                self.runner, self.weights = ray_engine.payload(spec)
            else:
                inference.check_device(self.cfg.device)  # every GPU of cuda:0,1,... before any is used
                self.runner, self.weights = inference.load(spec)
        return self.runner, self.weights

    def close(self) -> None:
        self.runner = None


def model_spec(cfg: ExtractConfig, states: list[State]) -> inference.ModelSpec:
    fields = states[0].target.key_fields
    return inference.ModelSpec(
        model=cfg.model,
        layers=tuple(cfg.layers()),
        weights_id=str(fields["weights_id"]),
        weights_id_arg=cfg.weights_id,
        weights_file=cfg.weights_file,
        untrained=cfg.untrained,
        seed=cfg.seed,
        image_size=int(fields["preprocessing"]["crop_size"]),
        backend=str(fields["backend"]),
        precision=cfg.precision,
        device=cfg.devices()[0],  # the others get copies of its network (replicas.build)
        cache_dir=cfg.resolved_cache_dir(),
        pool=cfg.pool,
    )


@dataclass
class Plan:
    """One target's writer and where each of its remaining rows comes from."""

    state: State
    writer: Writer
    carry: dict[int, tuple[str, Any]] = field(default_factory=dict)  # row -> ("old", row) | ("left", (block, i))
    cursor: int = 0

    def needs(self) -> set[int]:
        return {i for i in range(self.writer.done, self.writer.n) if i not in self.carry}


def _plans(cfg: ExtractConfig, images: ImageSplit, states: list[State]) -> list[Plan]:
    listing = Listing(
        list(images.ids),
        images.labels,
        list(images.class_names),
        images.stats if images.stats is not None else np.zeros((len(images), 2), np.int64),
        images.signature(),
    )
    known: Any = False  # digests of in-memory images (their stats are zeros), computed when needed
    plans = []
    for state in states:
        base = provenance(cfg, state.target, images, {}, {})
        writer = Writer(state.target.path, state.target.key, base, listing, flush_every=config.flush_every())
        plan = Plan(state, writer, cursor=writer.done)
        if state.changes is not None:
            plan.carry.update({i: ("old", j) for i, j in state.changes.carry.items()})
        left = {sid: (b, k) for b, block in enumerate(writer.leftover) for k, sid in enumerate(block.ids)}
        if left and known is False:
            known = images.known_digests()
        for i, sid in enumerate(images.ids):  # rows of an abandoned .partial of an earlier image list
            if sid not in left or i in plan.carry:
                continue
            b, k = left[sid]
            block = writer.leftover[b]
            same = np.array_equal(block.stats[k], listing.stats[i]) and (
                known is None or np.array_equal(block.digests[k], known[i])
            )
            if same:
                plan.carry[i] = ("left", (b, k))
        plans.append(plan)
    return plans


class _Carrier:
    """Reads carried rows of one plan: from the stale file (a block at a time) or leftover blocks."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.old = plan.state.old
        self.index = cache.stored_index(self.old) if self.old is not None else None
        self.skipped = (
            dict(zip(self.index.skipped_index.tolist(), self.index.skipped_error, strict=True)) if self.index else {}
        )
        self.digests = plan.state.changes.digests if plan.state.changes else {}

    def rows(self, rows: list[int]) -> tuple[np.ndarray, list[str], np.ndarray]:
        sources = [self.plan.carry[i] for i in rows]
        old_rows = [ref for kind, ref in sources if kind == "old"]
        old = {}
        if old_rows and self.old is not None:
            import h5py

            unique = np.unique(old_rows)
            with h5py.File(self.old, "r") as h5:
                data = h5["features"][unique]
            old = {int(r): data[k] for k, r in enumerate(unique)}
        feats, errors, digests = [], [], []
        for i, (kind, ref) in zip(rows, sources, strict=True):
            if kind == "old":
                assert self.index is not None
                feats.append(old[int(ref)])
                errors.append(self.skipped.get(int(ref), ""))
                digests.append(
                    np.frombuffer(self.digests[i], np.uint8) if i in self.digests else self.index.digests[ref]
                )
            else:
                block = self.plan.writer.leftover[ref[0]]
                feats.append(block.features[ref[1]])
                errors.append(cache.decode_strings([block.errors[ref[1]]])[0])
                digests.append(block.digests[ref[1]])
        return np.stack(feats).astype(np.float32), errors, np.stack(digests).astype(np.uint8)


def _advance(
    plan: Plan, carrier: _Carrier, upto: int, computed: dict[int, tuple[list[np.ndarray], str, np.ndarray]], layer: int
) -> None:
    """Append the plan's rows [cursor, upto): carried ones read in runs, computed ones from `computed`."""
    while plan.cursor < upto:
        i = plan.cursor
        carried = i in plan.carry
        run = [i]
        while run[-1] + 1 < upto and ((run[-1] + 1) in plan.carry) == carried and len(run) < 4096:
            run.append(run[-1] + 1)
        if carried:
            feats, errors, digests = carrier.rows(run)
        else:
            missing = [k for k in run if k not in computed]
            if missing:
                raise TlfeatError(
                    f"internal: row {missing[0]} of {plan.writer.final.name} was neither computed nor carried"
                )
            feats = np.stack([computed[k][0][layer] for k in run])
            errors = [computed[k][1] for k in run]
            digests = np.stack([computed[k][2] for k in run])
        plan.writer.append(feats, errors, digests)
        plan.cursor = run[-1] + 1


def compute(
    cfg: ExtractConfig, images: ImageSplit, states: list[State], runners: Runners
) -> dict[Path, cache.FeatureSet]:
    """Write every target of one split; returns the finished feature sets by path."""
    plans = _plans(cfg, images, states)
    carriers = [_Carrier(p) for p in plans]
    layer_of = {layer: k for k, layer in enumerate(cfg.layers())}
    needs = [p.needs() for p in plans]
    todo = sorted(set().union(*needs))
    spec = model_spec(cfg, states)
    prep = Preprocessing.from_key(states[0].target.key_fields["preprocessing"])
    t0 = time.perf_counter()
    weights: dict[str, Any] = {}
    export_wait = 0.0  # a one-time cost (the model's first use on this machine): kept apart from the extraction's
    try:
        if todo:
            runner, weights = runners.get(spec)
            for rows, outputs, errors, digests in chunks(cfg, images, todo, prep, runner, spec):
                computed = {int(i): ([o[k] for o in outputs], errors[k], digests[k]) for k, i in enumerate(rows)}
                for plan, carrier in zip(plans, carriers, strict=True):
                    _advance(plan, carrier, int(rows[-1]) + 1, computed, layer_of[plan.state.target.layer])
        for plan, carrier in zip(plans, carriers, strict=True):
            _advance(plan, carrier, plan.writer.n, {}, layer_of[plan.state.target.layer])
        if todo:
            export_wait = inference.take_export_wait(runner)
    except BaseException:
        for plan in plans:
            plan.writer.close()  # keep the finished blocks for the next run to resume
        raise
    seconds = time.perf_counter() - t0 - export_wait
    done = {}
    for plan, need in zip(plans, needs, strict=True):
        spent = seconds  # what the rows this file holds cost: this run's, and the carried rows' share of the old file's
        if plan.state.old is not None:
            old = cache.read_attrs(plan.state.old)
            if not weights:
                weights = {k: old.get(k, "") for k in ("weights_id", "weights_source", "weights_sha256")}
            old_n = int(old.get("n_images") or 0)
            from_old = sum(1 for source, _ in plan.carry.values() if source == "old")
            if old_n and from_old:
                spent += float(old.get("extract_seconds") or 0.0) * from_old / old_n
        extra = {
            **{k: v for k, v in weights.items() if v},
            "extract_seconds": spent,
            "run_seconds": seconds,
            **({"onnx_export_wait_seconds": export_wait} if export_wait else {}),
            "images_per_second": len(todo) / max(seconds, 1e-9),
            "computed_rows": len(need),
            "carried_rows": len(plan.carry),
            "resumed_from": plan.writer.resumed_from,
        }
        final = plan.writer.finish(extra)
        fs = cache.read(final)
        fs.changes = plan.state.changes
        done[final] = fs
        log.info("wrote %s (%d x %d) in %.1fs", final, fs.X.shape[0], fs.X.shape[1], seconds)
    return done


def chunks(
    cfg: ExtractConfig, images: ImageSplit, rows: list[int], prep: Preprocessing, runner: Any, spec: inference.ModelSpec
) -> Iterator[Chunk]:
    """The local engine: decoding workers feed the network, batch after batch, in row order.

    With `--decode device` or several devices, the tensor pipeline (`replicas`) does it instead:
    JPEGs decoded, resized and normalised on the device, one model replica per device.
    """
    if cfg.engine == "ray":
        from tlfeat import ray_engine

        yield from ray_engine.chunks(cfg, images, rows, prep, runner, spec)
        return
    size = cfg.batch_size or 64
    workers = cfg.workers if cfg.workers is not None else default_workers(cfg.device)
    if len(rows) <= size:
        workers = 0  # starting worker processes costs more than decoding one batch
    if cfg.resolved_decode() == "device" or len(cfg.devices()) > 1:
        from tlfeat import replicas

        yield from replicas.chunks(cfg, images, rows, prep, runner, spec, workers)
        return
    batches = [rows[i : i + size] for i in range(0, len(rows), size)]
    normalize = Normalizer(prep)
    bar = progress.bar(cfg.progress, len(rows), f"{cfg.model} {images.split}")
    try:
        with DecodePool(prep, workers, skip=cfg.on_error == "skip") as pool:
            for batch, decoded in zip(batches, pool.map(images.items(b) for b in batches), strict=True):
                outputs = runner(normalize(decoded.crops))
                for err in decoded.errors:
                    if err:
                        log.warning("skipped: %s", err)
                bar.update(len(batch))
                yield np.asarray(batch), outputs, decoded.errors, decoded.digests
    finally:
        bar.close()
