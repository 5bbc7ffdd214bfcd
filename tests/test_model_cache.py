"""ONNX exports live in one per-user model cache: made once per machine, shared by every cache folder,
made by one process at a time, found where tlfeat 0.2 left them, and made while decoding starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tlfeat import ExtractConfig, cache, catalog, config, extract, inference, onnx_backend, pool

from .conftest import make_tree
from .robustness.helpers import env
from .robustness.test_interrupt import wait_until_stopped

pytestmark = pytest.mark.skipif(not onnx_backend.available(), reason="onnxruntime not installed (pip install '.[dev]')")

# Runs `tlfeat ARGS`, noting in EXPORT_LOG every export this process makes; with STOP_IN_EXPORT it
# stops itself (SIGSTOP) while holding the export's lock, just before exporting.
EXPORTING_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from tlfeat import inference
    original = inference.export_elsewhere
    def export_elsewhere(spec, path):
        with open(os.environ["EXPORT_LOG"], "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        if os.environ.get("STOP_IN_EXPORT"):
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(spec, path)
    inference.export_elsewhere = export_elsewhere
    from tlfeat_cli.main import cli
    cli(sys.argv[1:], prog_name="tlfeat")
    """
)
ARGS = ["--model", "resnet18", "--untrained", "--image-size", "32", "--backend", "onnxruntime", "--workers", "0"]


def _cfg(tree: Path, cache_dir: Path, **kw: Any) -> ExtractConfig:
    base: dict[str, Any] = dict(
        model="resnet18", untrained=True, data=str(tree), image_size=32, workers=0, backend="onnxruntime"
    )
    return ExtractConfig(**{**base, "cache_dir": cache_dir, "progress": False, **kw})


def _exports(folder: Path) -> list[Path]:
    return sorted((folder / "onnx").glob("*.onnx"))


def _no_export(*args: Any) -> Any:
    raise AssertionError("exported again")


def test_two_processes_make_one_export_the_second_waits_for_it(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=3)
    models, log = tmp_path / "models", tmp_path / "exports.log"
    run_env = env(TLFEAT_MODEL_CACHE=str(models), EXPORT_LOG=str(log), TLFEAT_BACKEND="auto")

    def start(cache_dir: Path, *more: str, **extra: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-c", EXPORTING_CHILD, "extract", "--data", str(tree), *ARGS, *more]
        cmd += ["--cache-dir", str(cache_dir)]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**run_env, **extra}
        )

    first = start(tmp_path / "c1", STOP_IN_EXPORT="1")  # without -q: it says what it waits for
    wait_until_stopped(first.pid)  # holding the export's lock, nothing exported yet
    second = start(tmp_path / "c2", "-q")  # another cache folder: the same export
    assert second.stderr is not None
    seen = []
    for line in second.stderr:  # blocks until the line comes, or the process ends without it
        seen.append(line)
        if "waiting for it" in line:
            break
    assert seen and "waiting for it" in seen[-1] and ".onnx" in seen[-1], seen
    assert second.poll() is None and not _exports(models), "the second process must wait, not export"
    os.kill(first.pid, signal.SIGCONT)
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert "tlfeat: exporting resnet18 at 32 px to ONNX (once per machine" in err1, err1
    assert "tlfeat: exporting" not in err2  # -q: no status lines (and it made no export)
    assert log.read_text().split() == [str(first.pid)], "exactly one export, by the first process"
    assert len(_exports(models)) == 1 and "[onnxruntime]" in out2
    a, b = (sorted(catalog.scan(tmp_path / c), key=lambda e: e.path.name) for c in ("c1", "c2"))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(cache.read(x.path).X, cache.read(y.path).X)


def test_exports_are_shared_by_cache_folders_and_found_where_tlfeat_0_2_left_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(tmp_path / "models"))
    tree = make_tree(tmp_path / "tree", per_class=3)
    [made, _] = extract(_cfg(tree, tmp_path / "c1"))
    [export] = _exports(config.model_cache_dir())
    assert not (tmp_path / "c1" / "onnx").exists(), "exports no longer go to the cache folder"

    monkeypatch.setattr(inference, "export_elsewhere", _no_export)
    [shared, _] = extract(_cfg(tree, tmp_path / "c2"))  # another cache folder (another project): no export
    assert np.array_equal(shared.X, made.X)

    # A cache folder of tlfeat 0.2 kept its export in <cache-dir>/onnx/: it is copied, not made again.
    legacy = tmp_path / "old-project" / "onnx"
    legacy.mkdir(parents=True)
    for path in (export, onnx_backend.sidecar(export)):
        shutil.move(path, legacy / path.name)
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(tmp_path / "fresh-models"))
    [adopted, _] = extract(_cfg(tree, tmp_path / "old-project"))
    assert np.array_equal(adopted.X, made.X)
    assert [p.name for p in _exports(tmp_path / "fresh-models")] == [export.name]
    assert (legacy / export.name).is_file(), "the old cache folder's file is left where it was"

    # A damaged old export is not adopted: it is made again (here refused, so the error shows it was tried).
    for path in _exports(tmp_path / "fresh-models"):
        path.unlink()
    (legacy / export.name).write_bytes(b"damaged")
    for h5 in (tmp_path / "old-project").glob("*.h5"):
        h5.unlink()
    with pytest.raises(AssertionError, match="exported again"):
        extract(_cfg(tree, tmp_path / "old-project"))


def test_decoding_starts_while_the_export_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run does not wait for the export before decoding: the export here can only finish
    once a batch has been decoded (a run that exported first would never get there)."""
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(tmp_path / "models"))  # no export yet
    tree = make_tree(tmp_path / "tree", per_class=3)
    decoded = threading.Event()
    original_decode, original_export = pool.decode_batch, inference.export_elsewhere

    def decode_batch(*args: Any) -> Any:
        out = original_decode(*args)
        decoded.set()
        return out

    joined = threading.Event()

    class Thread(threading.Thread):  # the first batch has begun to wait for the export
        def join(self, timeout: float | None = None) -> None:
            if self.name == "tlfeat-onnx-export":
                joined.set()
            super().join(timeout)

    def export_elsewhere(spec: inference.ModelSpec, path: Path) -> dict[str, Any]:
        if not decoded.wait(timeout=300):
            raise AssertionError("nothing was decoded while the export was being made")
        joined.wait(timeout=300)
        threading.Event().wait(0.3)  # the batch waits at least this long: kept out of the extraction's time
        return original_export(spec, path)

    monkeypatch.setattr(pool, "decode_batch", decode_batch)
    monkeypatch.setattr(inference, "export_elsewhere", export_elsewhere)
    monkeypatch.setattr(inference.threading, "Thread", Thread)
    train, test = extract(_cfg(tree, tmp_path / "c"))
    waited = train.meta["onnx_export_wait_seconds"]
    assert waited >= 0.3 and "onnx_export_wait_seconds" not in test.meta  # paid once, by the first split
    assert train.meta["extract_seconds"] == train.meta["run_seconds"]  # the extraction's own time, not the export's
    assert train.meta["backend"] == "onnxruntime" and train.meta["weights_id"] == "untrained:seed0"
    [export] = _exports(config.model_cache_dir())
    assert train.meta["weights_source"] == "untrained" and train.meta["onnx_export"] == export.name
    assert train.meta["onnx_export_sha256"] == onnx_backend.verified(export)["sha256"]  # which export computed it


def test_an_export_that_fails_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlfeat.errors import TlfeatError

    def fails(*args: Any) -> Any:
        raise TlfeatError("could not export this model to ONNX (RuntimeError: boom); use --backend torch")

    monkeypatch.setattr(inference, "export_elsewhere", fails)
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(tmp_path / "models"))
    with pytest.raises(TlfeatError, match="use --backend torch"):
        extract(_cfg(make_tree(tmp_path / "tree", per_class=3), tmp_path / "c"))
    assert not list((tmp_path / "c").glob("*.h5"))
