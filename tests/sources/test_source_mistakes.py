"""Mistakes with models of every source: refused before any work in one line, or run another way
with one warning, and never a wrong suggestion (review round 3)."""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from tlfeat import backbones, config, fitting, fsio, onnx_backend
from tlfeat.config import ExtractConfig, FitConfig
from tlfeat.errors import TlfeatError
from tlfeat.extraction import choose_backend

from ..robustness.helpers import assert_one_clear_line, cli, env
from . import hubs

SMALL = ["--data", "digits", "--limit", "40", "--test-limit", "30", "--image-size", "32", "-q"]


@pytest.mark.slow
def test_layers_of_different_poolings_concatenate(tmp_path: Path) -> None:
    """A timm stage pools by global average, its penultimate layer is the pre-logits: one extraction."""
    where = ["--cache-dir", tmp_path / "cache", "--results-dir", tmp_path / "results"]
    model = ["--model", "timm:resnet18", "--untrained"]
    extracted = cli("extract", *model, *SMALL, "--layer", "layer3,penultimate", "--cache-dir", tmp_path / "cache")
    assert extracted.returncode == 0, extracted.stderr[-2000:]
    fitted = cli(
        "fit", "--clf", "logreg", "--C", "1", "--model", "timm:resnet18", "--layer", "layer3+penultimate", *where
    )
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("record.json")]
    assert record["layer"] == "layer3+penultimate"
    parts = record["provenance"]["features"]["train"]["parts"]
    assert [(p["layer"], p["pooling"]) for p in parts] == [("layer3", "global-average"), ("penultimate", "pre-logits")]


def test_open_clip_at_another_image_size_is_refused_before_any_work(tmp_path: Path) -> None:
    models = tmp_path / "models"
    proc = cli(
        "extract", "--model", "open_clip:ViT-B-32/openai", "--untrained", *SMALL[:-3], "--image-size", "64",
        env=env(TLFEAT_MODEL_CACHE=str(models), TLFEAT_BACKEND="auto"),
    )  # fmt: skip
    assert_one_clear_line(proc, "224x224", "--image-size 224")
    assert "export" not in proc.stderr and not models.exists()


def test_pool_on_a_cnn_is_refused_before_the_export_and_leaves_no_lock(tmp_path: Path) -> None:
    models = tmp_path / "models"
    proc = cli(
        "extract", "--model", "timm:resnet18", "--untrained", *SMALL, "--pool", "cls+mean",
        env=env(TLFEAT_MODEL_CACHE=str(models), TLFEAT_BACKEND="auto"),
    )  # fmt: skip
    assert_one_clear_line(proc, "--pool applies to transformer tokens", "timm:resnet18")
    assert "exporting" not in proc.stderr and not models.exists(), proc.stderr


def test_a_failed_locked_block_removes_its_lock_file_and_a_waiter_locks_anew(tmp_path: Path) -> None:
    final = tmp_path / "x.onnx"
    with pytest.raises(RuntimeError), fsio.lock(final):
        assert final.with_name("x.onnx.lock").is_file()
        raise RuntimeError("export failed")
    assert not list(tmp_path.iterdir())
    stale = open(final.with_name("x.onnx.lock"), "a+")  # noqa: SIM115 - a waiter's handle on a removed file
    final.with_name("x.onnx.lock").unlink()
    assert not fsio._same_file(stale, final.with_name("x.onnx.lock"))
    stale.close()
    with fsio.lock(final):
        final.write_text("done")
    assert final.read_text() == "done"


def _hf_folder(tmp_path: Path) -> Path:
    _, _, folder = hubs.hf_dinov2(tmp_path / "hf", tmp_path)
    return Path(folder)


def test_hf_folder_with_damaged_or_missing_weights_is_one_line(tmp_path: Path) -> None:
    good = _hf_folder(tmp_path)
    cut = good.rename(tmp_path / "a folder")  # a space: any command shown must be quoted
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = cli("extract", "--model", f"hf:{cut}", *SMALL)
    line = assert_one_clear_line(proc, f"{cut / 'model.safetensors'} is damaged")
    assert "internal error" not in proc.stderr and line.count("error") == 1
    (cut / "model.safetensors").unlink()
    proc = cli("extract", "--model", f"hf:{cut}", *SMALL)
    line = assert_one_clear_line(proc, f"{cut} has no weights file (model.safetensors or pytorch_model.bin)")
    assert "none" not in line.split("(")[0] and "models--" not in line and "internet" not in line, line


def test_hf_vit_at_another_image_size_runs(tmp_path: Path) -> None:
    """transformers resamples the position embedding (interpolate_pos_encoding): 48 px on a 32 px model."""
    folder = _hf_folder(tmp_path)
    proc = cli("extract", "--model", f"hf:{folder}", *SMALL[:-2], "48", "-q", "--cache-dir", tmp_path / "c")
    assert proc.returncode == 0 and proc.stdout.count(" x 32 ") == 2, proc.stderr[-2000:]


def test_an_unwritable_model_cache_runs_on_torch_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not onnx_backend.available():
        pytest.skip("ONNX Runtime is not installed: torch is chosen anyway")
    a_file = tmp_path / "models"
    a_file.write_text("not a folder")
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(a_file))
    cfg = ExtractConfig(model="mobilenet_v2", data="digits", backend="auto")
    with caplog.at_level(logging.WARNING):
        assert choose_backend(cfg) == "torch"
        assert choose_backend(cfg) == "torch"
    said = [r.getMessage() for r in caplog.records if "TLFEAT_MODEL_CACHE" in r.getMessage()]
    assert len(said) == 1 and "is a file" in said[0] and "runs on torch" in said[0], said
    with pytest.raises(TlfeatError, match="set TLFEAT_MODEL_CACHE to a writable folder"):
        choose_backend(ExtractConfig(model="mobilenet_v2", data="digits", backend="onnxruntime"))
    # A read-only filesystem (not available to root in every container): statvfs says so.
    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(folder))
    monkeypatch.setattr(onnx_backend.os, "statvfs", lambda p: SimpleNamespace(f_flag=os.ST_RDONLY))
    assert "read-only" in str(onnx_backend.folder_problem(config.model_cache_dir() / "onnx"))
    assert choose_backend(cfg) == "torch"
    (folder / "onnx").mkdir()  # a read-only model cache that holds this model's export still serves it
    (folder / "onnx" / "mobilenet_v2__224px__0123456789abcdef.onnx").write_bytes(b"an export")
    assert choose_backend(cfg, 224) == "onnxruntime" and choose_backend(cfg, 112) == "torch"


def test_damaged_exports_keep_one_copy_and_a_missing_sidecar_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "m.onnx"
    for n in range(3):
        path.write_bytes(b"graph %d" % n)
        with caplog.at_level(logging.WARNING):
            assert onnx_backend.verified(path, repair=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.damaged"]
    assert (tmp_path / "m.onnx.damaged").read_bytes() == b"graph 2"
    said = [r.getMessage() for r in caplog.records]
    assert all("m.onnx.json is missing" in m and "checksum" not in m for m in said), said
    path.write_bytes(b"graph")
    onnx_backend.sidecar(path).write_text(json.dumps({"sha256": "0" * 64}))
    with caplog.at_level(logging.WARNING):
        onnx_backend.verified(path, repair=True)
    assert "failed its checksum" in caplog.records[-1].getMessage()


def test_model_untrained_is_accepted_by_extract_fit_and_results(tmp_path: Path) -> None:
    cfg = ExtractConfig(model="timm:resnet18:untrained", data="digits")
    assert (cfg.model, cfg.untrained) == ("timm:resnet18", True)
    assert backbones.selects("timm:resnet18:untrained", "timm:resnet18", "untrained:seed3")
    assert not backbones.selects("timm:resnet18:untrained", "timm:resnet18", "in1k")
    assert backbones.selects("timm:resnet18", "timm:resnet18", "untrained:seed0")
    with pytest.raises(TlfeatError) as info:
        fitting.pairs(FitConfig(model="timm:resnet18:untrained", data="digits", cache_dir=tmp_path))
    hint = str(info.value).split("`")[1]
    assert shlex.split(hint) == ["tlfeat", "extract", "--model", "timm:resnet18", "--data", "digits", "--untrained"]
    proc = cli("results", "--model", "timm:resnet18:untrained", "--results-dir", tmp_path)
    assert proc.returncode == 0 and "no results in" in proc.stdout


def test_the_offline_timm_weights_tag_is_accepted_and_listed() -> None:
    bb = backbones.resolve("timm:tf_efficientnet_lite0.pypi_in1k")
    assert bb.default_weights == "pypi_in1k"
    assert type(bb.build(device="meta")).__name__ == "EfficientNet"
    with pytest.raises(TlfeatError, match="valid: pypi_in1k, in1k"):
        backbones.resolve("timm:tf_efficientnet_lite0.nope")


def test_unknown_sources_are_named() -> None:
    with pytest.raises(TlfeatError, match=r"unknown model source 'foo'; valid: timm, open_clip, hf, custom"):
        backbones.resolve("foo:bar")
    with pytest.raises(TlfeatError, match="use timm:resnet18"):
        backbones.resolve("Timm:resnet18")
    with pytest.raises(TlfeatError, match="unknown model 'resnet18:frozen'"):
        backbones.resolve("resnet18:frozen")  # a torchvision model with a suffix: not a source


def test_models_listing_messages(tmp_path: Path) -> None:
    fresh = env(TLFEAT_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hf"))
    timm = cli("models", "--source", "timm", "--filter", "lite0", env=fresh)
    assert timm.returncode == 0 and "reading timm's model list" in timm.stderr, timm.stderr
    assert "timm:tf_efficientnet_lite0 " in timm.stdout and "pypi_in1k" in timm.stdout
    again = cli("models", "--source", "timm", "--filter", "lite0", env=fresh)
    assert "reading timm's model list" not in again.stderr
    bracket = cli("models", "--source", "timm", "--filter", "[", env=fresh)
    assert bracket.stdout.strip().splitlines() == [bracket.stdout.strip()], bracket.stdout
    assert bracket.stdout.startswith("no timm models matching '['")
    custom = cli("models", "--source", "custom", env=fresh)
    assert "custom:MODULE:FUNCTION" in custom.stdout and len(custom.stdout.strip().splitlines()) == 1
    hf = cli("models", "--source", "hf", env=fresh)
    assert f"in the Hugging Face cache at {tmp_path / 'hf'}" in hf.stdout, hf.stdout
