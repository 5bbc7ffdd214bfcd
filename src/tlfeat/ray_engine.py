"""Extraction on a Ray cluster (`--engine ray`), built on Ray Data.

The rows to compute become a Ray Dataset of image references (file paths, byte ranges of shards
read by the workers, or in-memory pixels shipped through the object store). Decoding and resizing
run as CPU tasks; the network runs in `map_batches` over an actor pool, one model replica per
actor, loaded once from the object store (so workers need no copy of the weights or the export).
Results stream back to the driver, which puts them in row order (Ray does not keep the order once
a node is lost) and writes them with the same crash-safe writer as the local engine: the cache
format, checksums and resume are one code path. With the same backend on CPU the features equal
the local engine's bit for bit (the same decoding, and fixed-size micro-batches in the network).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from tlfeat import images, inference, progress
from tlfeat.config import ExtractConfig
from tlfeat.datasets import ImageSplit
from tlfeat.errors import TlfeatError, first_line
from tlfeat.preprocess import Normalizer, Preprocessing

log = logging.getLogger(__name__)
INSTALL = "pip install 'tlfeat[ray]'"
BATCH = 32  # images per Ray Data batch


def require() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise TlfeatError(f"--engine ray needs Ray Data: {INSTALL}") from exc
    return ray


def connect(cfg: ExtractConfig) -> Any:
    """Join the cluster at --address, or start Ray on this machine; one line when there is none."""
    ray = require()
    if ray.is_initialized():
        return ray
    if cfg.address and cfg.address != "auto":
        _reachable(cfg.address)
    from tlfeat import progress

    progress.status(
        f"connecting to the Ray cluster at {cfg.address}" if cfg.address else "starting Ray on this machine"
    )
    try:
        # No --address: a Ray of its own on this machine ("local"), never someone else's by accident.
        ray.init(
            address=cfg.address or "local", log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = cfg.address or "this machine"
        raise TlfeatError(
            f"cannot reach a Ray cluster at {where} ({first_line(exc)}); start one with `ray start --head` or drop --address"
        ) from exc
    if cfg.gpus_per_worker > 0:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < cfg.gpus_per_worker:
            ray.shutdown()
            raise TlfeatError(
                f"--gpus-per-worker {cfg.gpus_per_worker:g} but the Ray cluster has {gpus:g} GPU(s); use --gpus-per-worker 0"
            )
    return ray


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once (Ray itself retries for minutes) when nothing listens at host:port."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise TlfeatError(
            f"cannot reach a Ray cluster at {address} ({exc}); start one with `ray start --head` or drop --address"
        ) from exc


def _rows_dataset(ray: Any, images: ImageSplit, rows: list[int]) -> Any:
    """The image references of `rows` as a Ray Dataset; pixels of in-memory datasets go through the object store."""
    if images.kind == "arrays":
        assert images.arrays is not None
        items = [{"row": i, "kind": "array", "ref": images.arrays[i], "name": images.ids[i]} for i in rows]
    elif images.kind == "files":
        items = [{"row": i, "kind": "path", "ref": images.refs[i], "name": images.ids[i]} for i in rows]
    elif images.kind == "members":
        items = [{"row": i, "kind": "range", "ref": list(images.refs[i]), "name": images.ids[i]} for i in rows]
    else:  # parquet: workers read their rows' bytes (a row group at a time), like tar members
        items = [{"row": i, "kind": "parquet", "ref": list(images.refs[i]), "name": images.ids[i]} for i in rows]
    return ray.data.from_items(items)


def decode(batch: dict[str, Any], prep: Preprocessing, skip: bool) -> dict[str, Any]:
    """A Ray Data CPU task: references -> uint8 crops, errors and digests (the local workers' function)."""
    from tlfeat.datasets.readers import parquet_bytes, read_range
    from tlfeat.pool import decode_batch

    items: list[images.Item] = []
    for kind, ref, name in zip(batch["kind"], batch["ref"], batch["name"], strict=True):
        if kind == "array":
            items.append(("array", (np.asarray(ref), str(name))))
        elif kind == "range":
            path, offset, size = ref
            items.append(("bytes", (read_range(str(path), int(offset), int(size)), f"{path}:{name}")))
        elif kind == "parquet":
            path, group, row, column = ref
            items.append(("bytes", (parquet_bytes((str(path), int(group), int(row), str(column))), f"{path}:{name}")))
        else:
            items.append(("path", str(ref)))
    decoded = decode_batch(items, prep, skip)
    errors = np.asarray(decoded.errors, dtype=object)
    return {"row": np.asarray(batch["row"]), "crop": decoded.crops, "error": errors, "digest": decoded.digests}


class Embed:
    """A Ray Data actor: one model replica, loaded once from the object store."""

    def __init__(self, model_ref: Any, spec: inference.ModelSpec, prep: Preprocessing) -> None:
        import ray

        payload = ray.get(model_ref)
        self.runner = _runner_from(payload, spec)
        self.normalize = Normalizer(prep)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        outputs = self.runner(self.normalize(batch["crop"]))
        out = {"row": batch["row"], "error": batch["error"], "digest": batch["digest"]}
        for k, o in enumerate(outputs):
            out[f"features{k}"] = o
        return out


def payload(spec: inference.ModelSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every replica needs to rebuild the network (the export's bytes, or the extractor's state
    dict made on the driver's CPU: the driver needs no GPU), and the weights' provenance."""
    if spec.backend == "onnxruntime":
        meta = inference.ensure_export(spec)
        return {"onnx": spec.onnx_path().read_bytes()}, meta
    resolved = inference._resolve(spec)
    cpu = inference.TorchRunner(dataclasses.replace(spec, device="cpu", precision="fp32"), resolved)  # the weights only
    return {"state_dict": {k: v.cpu() for k, v in cpu.extractor.state_dict().items()}}, inference._weights_meta(
        resolved
    )


def _runner_from(payload: dict[str, Any], spec: inference.ModelSpec) -> Any:
    if "onnx" in payload:  # loaded from memory: a killed actor leaves no file behind
        return inference.OnnxRunner(payload["onnx"], {})
    return inference.TorchRunner.from_state(spec, payload["state_dict"])


def chunks(
    cfg: ExtractConfig, images: ImageSplit, rows: list[int], prep: Preprocessing, runner: Any, spec: inference.ModelSpec
) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[str], np.ndarray]]:
    """Compute `rows` on the cluster; yields them back in row order, in consecutive runs."""
    ray = connect(cfg)
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    context.execution_options.preserve_order = False  # rows are placed by their number, not by arrival
    workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
    model_ref = ray.put(runner)  # the payload: see `payload`
    ds = _rows_dataset(ray, images, rows)
    ds = ds.map_batches(decode, fn_kwargs={"prep": prep, "skip": cfg.on_error == "skip"}, batch_size=BATCH, num_cpus=1)
    ds = ds.map_batches(
        Embed,
        fn_constructor_args=(model_ref, spec, prep),
        batch_size=BATCH,
        compute=ActorPoolStrategy(size=workers),
        num_cpus=1,
        num_gpus=cfg.gpus_per_worker or None,
    )
    bar = progress.bar(cfg.progress, len(rows), f"{cfg.model} {images.split} (ray, {workers} workers)")
    pending: dict[int, tuple[list[np.ndarray], str, np.ndarray]] = {}
    order = iter(rows)
    nxt = next(order, None)
    try:
        for batch in _iterate(ds):
            n_out = len([k for k in batch if k.startswith("features")])
            for k, row in enumerate(batch["row"]):
                pending[int(row)] = (
                    [batch[f"features{j}"][k] for j in range(n_out)],
                    str(batch["error"][k] or ""),
                    batch["digest"][k],
                )
            bar.update(len(batch["row"]))
            run: list[int] = []
            while nxt is not None and nxt in pending:
                run.append(nxt)
                nxt = next(order, None)
            if run:
                yield _chunk(run, pending)
    finally:
        bar.close()
    if nxt is not None:
        raise TlfeatError(f"internal: Ray returned no result for row {nxt}")


def _iterate(ds: Any) -> Iterator[dict[str, Any]]:
    """Batches from the cluster; a task's failure becomes the one line it was raised with."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as exc:  # noqa: BLE001 - Ray wraps what its tasks raised
        cause: BaseException = exc
        while (deeper := getattr(cause, "cause", None) or cause.__cause__) is not None:
            cause = deeper
        if isinstance(cause, TlfeatError):
            raise TlfeatError(str(cause)) from exc
        text = str(exc)
        if "TlfeatError: " in text:
            raise TlfeatError(first_line(text.rsplit("TlfeatError: ", 1)[1], 1000)) from exc
        raise


def _chunk(
    run: list[int], pending: dict[int, tuple[list[np.ndarray], str, np.ndarray]]
) -> tuple[np.ndarray, list[np.ndarray], list[str], np.ndarray]:
    rows = [pending.pop(i) for i in run]
    outputs = [np.stack([r[0][k] for r in rows]) for k in range(len(rows[0][0]))]
    return np.asarray(run), outputs, [r[1] for r in rows], np.stack([r[2] for r in rows])
