"""The frozen network as a function: float32 NCHW batch in, one (n, d) float32 array per layer out.

Two runtimes. ONNX Runtime (the CPU default): the exported graph, checked against its sidecar
checksum, no torch needed once exported. The export is made once per machine (the model cache),
in another process, while this one starts decoding. torch: channels_last, inference mode, on any device;
micro-batches of a fixed size, the last one padded, so an image's features do not depend on which
images share its batch (torch's CPU kernels change with the batch size; measured). That makes a
partial update, a resumed run and a Ray worker give the same bits as one uninterrupted pass.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import backbones, config, fsio, onnx_backend, progress
from tlfeat.errors import TlfeatError
from tlfeat.weights import ResolvedWeights

log = logging.getLogger(__name__)

CPU_MICRO_BATCH = 4  # images per torch forward pass on CPU: the activations stay in cache
ONNX_MICRO_BATCH = 16
GPU_MICRO_BATCH = 64


@dataclass(frozen=True)
class ModelSpec:
    """Which network, cut where, with which weights, at which input size: what a runner needs."""

    model: str
    layers: tuple[str | None, ...]
    weights_id: str  # torchvision entry, "file:<sha12>" or "untrained:seed<k>"
    weights_id_arg: str | None  # what the user asked for (None: the default entry)
    weights_file: Path | None
    untrained: bool
    seed: int
    image_size: int
    backend: str
    precision: str
    device: str
    cache_dir: Path
    pool: str | None = None  # transformers: how tokens are pooled (None: the model's own)

    @property
    def weights_tag(self) -> str:
        """Identifies the weights file without reading it: torchvision's hash prefix, or the id."""
        if self.untrained or self.weights_file is not None:
            return self.weights_id
        return backbones.weights_entry(self.model, self.weights_id_arg).sha_prefix or self.weights_id

    def output_names(self) -> list[str]:
        """One per layer; the pooling joins the name where it is not the model's own."""
        pooled = f"[{self.pool}]" if self.pool else ""
        return [backbones.layer_name(layer) + pooled for layer in self.layers]

    def onnx_path(self, folder: Path | None = None) -> Path:
        """The export in the model cache (or in `folder`: `<cache-dir>/onnx` is where tlfeat 0.2 kept it)."""
        return onnx_backend.export_path(
            folder or config.model_cache_dir() / "onnx",
            backbones.slug(self.model),
            self.weights_id,
            self.weights_tag,
            self.image_size,
            self.output_names(),
            self.precision,
        )

    def legacy_onnx_path(self) -> Path:
        return self.onnx_path(Path(self.cache_dir) / "onnx")


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers, read without importing them."""
    out = {}
    for name in ("torch", "torchvision", "onnxruntime"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


class TorchRunner:
    def __init__(self, spec: ModelSpec, resolved: ResolvedWeights) -> None:
        from tlfeat.weights import build_with_weights

        check_device(spec.device)
        net = build_with_weights(spec.model, resolved)
        self._setup(spec, backbones.feature_extractor(net, spec.model, list(spec.layers), spec.pool))

    @classmethod
    def from_state(cls, spec: ModelSpec, state: dict[str, Any]) -> TorchRunner:
        """The same network from the state dict of another runner's extractor (Ray replicas)."""
        runner = cls.__new__(cls)
        extractor = backbones.feature_extractor(backbones.build(spec.model), spec.model, list(spec.layers), spec.pool)
        extractor.load_state_dict(state)
        runner._setup(spec, extractor)
        return runner

    def _setup(self, spec: ModelSpec, extractor: Any) -> None:
        import torch

        for p in extractor.parameters():
            p.requires_grad_(False)
        self.device = spec.device
        self.cpu = spec.device.startswith("cpu")
        self.extractor = extractor.eval().to(spec.device, memory_format=torch.channels_last)
        self.micro = CPU_MICRO_BATCH if self.cpu else GPU_MICRO_BATCH
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.autocast = dtypes.get(spec.precision)
        if self.autocast is not None and self.cpu:
            raise TlfeatError(f"--precision {spec.precision} is for GPUs (autocast); on the CPU use fp32")
        self.backend, self.version = "torch", torch.__version__

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        if not self.cpu:
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self.start(x).result()

    def start(self, x: Any) -> Pending:
        """Queue the network on a float32 NCHW tensor already on this runner's device; `.result()` waits.

        On a GPU the outputs are copied into pinned host memory without blocking, so the caller can
        prepare the next batch while this one runs.
        """
        import torch

        n = len(x)
        pad = (-n) % self.micro
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        parts: list[list[Any]] = []
        with (
            torch.inference_mode(),
            torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None),
        ):
            for i in range(0, len(x), self.micro):
                out = self.extractor(x[i : i + self.micro].contiguous(memory_format=torch.channels_last))
                outs = out if isinstance(out, tuple) else (out,)
                parts.append([o.float() for o in outs])
            outputs = [torch.cat([p[k] for p in parts])[:n] for k in range(len(parts[0]))]
        return Pending(outputs)


class Pending:
    """Outputs of a batch on their way to host memory (at once on the CPU; copied asynchronously from a GPU)."""

    def __init__(self, outputs: list[Any]) -> None:
        import torch

        self.event = None
        if outputs[0].device.type == "cuda":
            host = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outputs]
            for h, o in zip(host, outputs, strict=True):
                h.copy_(o, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            outputs = host
        self.outputs = outputs

    def result(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [o.cpu().numpy() for o in self.outputs]


class OnnxRunner:
    """Fixed-size micro-batches here too (the last one padded): the features of an image never
    depend on how many images were computed with it."""

    def __init__(self, path: Path | bytes, meta: dict[str, Any]) -> None:
        # The decoding workers share these cores, so ONNX Runtime's idle threads must not spin.
        self.session = onnx_backend.Session(path, spin=False)
        self.meta = meta
        self.backend, self.version = "onnxruntime", self.session.version

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        n = len(batch)
        parts = []
        for start in range(0, n, ONNX_MICRO_BATCH):
            x = batch[start : start + ONNX_MICRO_BATCH]
            if len(x) < ONNX_MICRO_BATCH:
                x = np.concatenate([x, np.zeros((ONNX_MICRO_BATCH - len(x), *x.shape[1:]), dtype=x.dtype)])
            parts.append(self.session(x))
        return [np.concatenate([p[k] for p in parts])[:n] for k in range(len(parts[0]))]


def check_device(device: str) -> None:
    """A device torch can use here, or one line saying why not."""
    if device.startswith("cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TlfeatError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu")
        indices = device.split(":", 1)[1].split(",") if ":" in device else ["0"]
        if max(int(i) for i in indices) >= torch.cuda.device_count():
            raise TlfeatError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0..)")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TlfeatError("--device mps: the Metal backend is not available here; use --device cpu")


def load(spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """A runner for `spec` and the weights' provenance (id, source, sha256).

    ONNX Runtime with a verified export needs no torch. Without one, the export is made in another
    process while the caller starts decoding: the runner's first batch waits for it, and the
    provenance is filled in then. torch builds the network here.
    """
    if spec.backend == "onnxruntime":
        path = spec.onnx_path()
        meta = onnx_backend.verified(path)
        if meta is not None:
            return OnnxRunner(path, meta), weights_meta(meta)
        pending = PendingOnnxRunner(spec)
        return pending, pending.weights
    resolved = _resolve(spec)
    return TorchRunner(spec, resolved), _weights_meta(resolved)


def weights_meta(export_meta: dict[str, Any]) -> dict[str, Any]:
    """The weights' provenance from an export's sidecar, and which export computed the features."""
    out = {k: export_meta.get(k, "") for k in ("weights_id", "weights_source", "weights_sha256")}
    return {**out, "onnx_export": export_meta.get("file", ""), "onnx_export_sha256": export_meta.get("sha256", "")}


def ensure_export(spec: ModelSpec) -> dict[str, Any]:
    """A verified ONNX export of `spec` in the model cache, and its weights' provenance.

    Made once per machine: found in the model cache, or copied from where tlfeat 0.2 kept it (the
    cache folder's `onnx/`), or exported in another process. Two processes never export the same
    graph at once: the second waits for the first's lock, then finds its export.
    """
    path = spec.onnx_path()
    meta = onnx_backend.verified(path)
    if meta is None:
        with fsio.lock(path):
            meta = (
                onnx_backend.verified(path, repair=True)
                or onnx_backend.adopt(spec.legacy_onnx_path(), path)
                or export_elsewhere(spec, path)
            )
    return weights_meta(meta)


def export_elsewhere(spec: ModelSpec, path: Path) -> dict[str, Any]:
    """Export in a fresh process, so this one never imports torch nor holds a torch model beside the
    ONNX Runtime session (the export's memory is given back when that process ends)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    progress.status(f"exporting {spec.model} at {spec.image_size} px to ONNX (once per machine, into {path.parent})")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_export, spec, path).result()


def take_export_wait(runner: Any) -> float:
    """Seconds the first batch of `runner` waited for the model's ONNX export, reported once (the
    runner serves every split of a run, and only the first paid for the export)."""
    waited = float(getattr(runner, "export_wait", 0.0))
    if waited:
        runner.export_wait = 0.0
    return waited


class PendingOnnxRunner:
    """An ONNX Runtime runner whose export is being made (in another process, by a thread of this one).

    Decoding starts at once; the first batch waits for the export. Errors of the export (it cannot
    be made: `--backend torch` is the way out) are raised there, in the caller's thread.
    """

    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.weights: dict[str, Any] = {}  # filled in before the first batch is computed
        self.runner: OnnxRunner | None = None
        self.error: BaseException | None = None
        self.export_wait = 0.0  # how long the first batch waited for the export, once
        self.thread = threading.Thread(target=self._export, name="tlfeat-onnx-export", daemon=True)
        self.thread.start()

    def _export(self) -> None:
        try:
            self.weights.update(ensure_export(self.spec))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc

    def ready(self) -> OnnxRunner:
        if self.runner is None:
            t0 = time.perf_counter()
            self.thread.join()
            self.export_wait = time.perf_counter() - t0
            if self.error is not None:
                raise self.error
            self.runner = OnnxRunner(self.spec.onnx_path(), self.weights)
        return self.runner

    @property
    def version(self) -> str:
        return self.ready().version

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.ready()(batch)


def _resolve(spec: ModelSpec) -> ResolvedWeights:
    from tlfeat.weights import resolve

    return resolve(spec.model, spec.weights_id_arg, spec.weights_file, untrained=spec.untrained, seed=spec.seed)


def _weights_meta(resolved: ResolvedWeights) -> dict[str, Any]:
    return {
        "weights_id": resolved.weights_id,
        "weights_source": resolved.source,
        "weights_sha256": resolved.sha256 or "",
    }


def _export(spec: ModelSpec, path: Path) -> dict[str, Any]:
    from tlfeat.weights import build_with_weights

    resolved = _resolve(spec)
    layers = spec.output_names()
    provenance = {
        "model": spec.model,
        "layers": layers,
        "image_size": spec.image_size,
        **_weights_meta(resolved),
        "precision": "fp32",
    }
    net = build_with_weights(spec.model, resolved)
    extractor = backbones.feature_extractor(net, spec.model, list(spec.layers), spec.pool)
    with _stderr_silenced():  # torch prints its whole IR graph when an operator has no ONNX form
        return onnx_backend.export(extractor, path, spec.image_size, layers, provenance)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptors 1 and 2 to /dev/null (torch's C++ logger writes there directly); the exception
    says what failed. Only in the export's own process."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
