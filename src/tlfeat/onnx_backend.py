"""The ONNX Runtime backend: export the cut network once, check it on every use, run it on CPU.

On a 2-core CPU ONNX Runtime's fused convolutions beat PyTorch's eager channels_last path
(`benchmarks/extract_speed.py` measures by how much). Exports live in the per-user model cache
(`<TLFEAT_MODEL_CACHE>/onnx/`, shared by every cache folder and project), named by everything that
changes the graph (model, weights file, layers, image size, opset, precision), with a sidecar
`.json` holding its sha256 and provenance: a damaged or edited export is detected before it
computes a single feature, set aside and made again. With an export in place, extraction needs
neither torch nor torchvision.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import config, fsio, offline
from tlfeat.errors import ExportFailed, TlfeatError, first_line

log = logging.getLogger(__name__)

OPSET = 17
INSTALL_HINT = "install it with `pip install onnxruntime onnx`"


def available() -> bool:
    """Are onnxruntime and onnx installed (without importing them: that costs start-up time)?"""
    import importlib.util

    try:
        return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    except (ImportError, ValueError):  # a broken installation counts as none
        return False


def require() -> None:
    if not available():
        raise TlfeatError(f"--backend onnxruntime needs the onnxruntime and onnx packages; {INSTALL_HINT}")


def folder_problem(folder: Path) -> str | None:
    """Why no export can be written under `folder` (TLFEAT_MODEL_CACHE's `onnx/`), found without
    writing anything; None where one can."""
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{probe} is on a read-only filesystem"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def export_path(
    folder: Path,
    model: str,
    weights_id: str,
    weights_tag: str,
    image_size: int,
    layers: list[str],
    precision: str = "fp32",
) -> Path:
    """Where the export of this graph lives in `folder`; `weights_tag` identifies the weights file (hash prefix)."""
    ident = json.dumps([model, weights_id, weights_tag, image_size, layers, OPSET, precision])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    suffix = "" if precision == "fp32" else f"__{precision}"
    return Path(folder) / f"{model}__{image_size}px__{digest}{suffix}.onnx"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def verified(path: Path, repair: bool = False) -> dict[str, Any] | None:
    """The provenance of a whole export, or None when there is none (or it fails its checksum).

    With `repair` (only while holding the export's lock), a damaged export is set aside so that it
    can be made again; without, nothing is touched: another process may be writing it.
    """
    if not path.is_file():
        return None
    why = "failed its checksum"
    try:
        meta = json.loads(sidecar(path).read_text())
        expected = meta["sha256"]
    except FileNotFoundError:
        meta, expected, why = {}, None, f"has no sidecar ({sidecar(path).name} is missing)"
    except (OSError, ValueError, KeyError, TypeError):
        meta, expected, why = {}, None, f"has a damaged sidecar ({sidecar(path).name})"
    if expected is not None and offline.sha256_file(path) == expected:
        return meta
    if repair:
        older = sorted(path.parent.glob(glob.escape(path.name) + ".damaged*"))
        for old in older:  # one set-aside copy per export: exports are remade, never data
            old.unlink(missing_ok=True)
        aside = fsio.set_aside(path)
        sidecar(path).unlink(missing_ok=True)
        log.warning(
            "the ONNX export %s %s; moved it to %s%s and exporting again",
            path.name,
            why,
            aside.name,
            f" (deleted {len(older)} older damaged cop{'y' if len(older) == 1 else 'ies'})" if older else "",
        )
    return None


def adopt(legacy: Path, path: Path) -> dict[str, Any] | None:
    """A verified export that tlfeat 0.2 left in a cache folder (`<cache-dir>/onnx/`), copied into the
    model cache under `path` (only while holding its lock); None when there is none. The old file
    stays where it was: it belongs to that cache folder."""
    if verified(legacy) is None:
        return None
    with fsio.atomic_path(path) as tmp:
        shutil.copyfile(legacy, tmp)
        fsio.atomic_write(sidecar(path), sidecar(legacy).read_text())  # before the export is renamed into place
    log.info("copied the ONNX export %s from %s into the model cache %s", legacy.name, legacy.parent, path.parent)
    return verified(path)


def export(
    extractor: Any, path: Path, image_size: int, outputs: list[str], provenance: dict[str, Any]
) -> dict[str, Any]:
    """Write the ONNX graph of `extractor` (batch axis dynamic) and its sidecar, once.

    The sidecar (sha256 and provenance) is written before the export is renamed into place, so an
    export under its final name always has its sidecar.
    """
    import torch

    names = [f"features{i}" for i in range(len(outputs))]
    example = torch.zeros(2, 3, image_size, image_size)
    # One thread: tracing runs the network once, and its threads would spin against the extraction
    # this export runs beside (measured on 2 busy cores: 5.6 s for MobileNetV2 with 2 threads, 1.0 s with one).
    torch.set_num_threads(1)
    log.info("exporting %s to ONNX (once; cached at %s)", provenance.get("model"), path)
    try:
        with fsio.atomic_path(path) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                extractor.cpu(),
                (example,),
                str(tmp),
                input_names=["images"],
                output_names=names,
                dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                opset_version=OPSET,
                dynamo=False,
            )
            meta = {**provenance, "outputs": outputs, "opset": OPSET, "torch": torch.__version__}
            meta.update(sha256=offline.sha256_file(tmp), file=path.name)
            fsio.atomic_write(sidecar(path), json.dumps(meta, indent=1, sort_keys=True, default=str))
    except TlfeatError:
        raise
    except Exception as exc:
        raise ExportFailed(
            f"could not export this model to ONNX ({type(exc).__name__}: {first_line(exc)}); use --backend torch"
        ) from exc
    return meta


class Session:
    """Callable like the torch extractor: float32 NCHW in, a list of (n, d) float32 arrays out.

    `spin=False` makes idle intra-op threads sleep instead of busy-waiting, which is right when
    decoding workers share the cores: measured 118 -> 130 img/s end to end for MobileNetV2.
    """

    def __init__(self, path: Path | bytes, threads: int | None = None, spin: bool = True) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or config.cores()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            model = path if isinstance(path, bytes) else str(path)  # bytes: a model sent to a Ray worker
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # passed its checksum yet unreadable: a bug or an incompatible runtime
            where = "the model sent to this worker" if isinstance(path, bytes) else str(path)
            raise TlfeatError(
                f"ONNX Runtime cannot load {where} ({first_line(exc)}); delete it to export again"
            ) from exc
        self.version = ort.__version__

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {"images": np.ascontiguousarray(batch, dtype=np.float32)}))
