"""timm, Hugging Face and open_clip models (random weights in their hubs' own layouts) through the CLI:
extract, fit, fine-tune and compare, ONNX Runtime where the network exports and torch where it does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tlfeat import cache, catalog

from ..robustness.helpers import assert_one_clear_line, cli, env
from . import hubs

SMALL = ["--data", "digits", "--limit", "60", "--test-limit", "30", "--image-size", "32"]
MODELS = {"timm:test_vit": 7, "hf:tiny/dinov2": 4, "open_clip:hf-hub:tiny/clip": 4}  # model -> its blocks


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli_sources")
    hubs.all_hubs(root / "hf", root)
    return {"root": root, "env": env(HF_HUB_CACHE=str(root / "hf"), TLFEAT_HOME=str(root / "home"))}


def run(world: dict[str, Any], *args: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env={**world["env"], **extra})


@pytest.mark.slow
def test_compare_extracts_fits_and_fine_tunes_every_source(world: dict[str, Any]) -> None:
    out = world["root"] / "report"
    proc = run(
        world, "compare", "--models", ",".join(MODELS), *SMALL, "--methods", "logreg,finetune:freeze:1",
        "--epochs", "1", "--out", out, "--cache-dir", world["root"] / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "failures.json").read_text())["failures"] == {}
    listed = json.loads((out / "compare.json").read_text())["records"]  # in the one result store
    records = [json.loads((out / p).read_text()) for p in listed]
    assert {(r["model"], r["method"]) for r in records} == {
        (m, k) for m in MODELS for k in ("logreg", "finetune:freeze:1")
    }
    for r in records:
        if r["kind"] == "finetune":  # blocks counted by the source; the first one frozen
            assert r["details"]["n_blocks"] == MODELS[r["model"]], r["model"]
            assert 0 < r["details"]["trainable_params"] < r["details"]["total_params"]
        else:
            assert r["n_train"] == 60 and r["n_test"] == 30
    assert "timm:test_vit" in (out / "report.md").read_text()


@pytest.mark.slow
def test_extract_fit_finetune_commands_with_a_timm_model(world: dict[str, Any]) -> None:
    cache_dir, results = world["root"] / "cache1", world["root"] / "results1"
    extracted = run(world, "extract", "--model", "timm:test_vit", *SMALL, "-q", "--cache-dir", cache_dir)
    assert extracted.returncode == 0 and extracted.stdout.count(" x 64 ") == 2, extracted.stderr[-2000:]
    fitted = run(world, "fit", "--clf", "logreg", "--C", "1", "--cache-dir", cache_dir, "--results-dir", results)
    assert fitted.returncode == 0 and "timm:test_vit" in fitted.stdout, fitted.stderr[-2000:]
    tuned = run(
        world, "finetune", "--model", "timm:test_vit", *SMALL, "--strategy", "discriminative", "--epochs", "1",
        "--results-dir", results, "-q",
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    [record] = [json.loads(p.read_text()) for p in (results / "finetunes").rglob("record.json")]
    lrs = record["details"]["param_group_lrs"]
    assert len(lrs) == 8 and lrs["block0"] < lrs["block6"] < lrs["head"]  # the source's 7 blocks, then the head


def _features(folder: Path, split: str) -> np.ndarray:
    [entry] = [e for e in catalog.scan(folder) if e.attrs["split"] == split]
    return cache.read(entry.path).X


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hf:tiny/dinov2", "open_clip:hf-hub:tiny/clip"])
def test_onnx_runtime_features_equal_torch(world: dict[str, Any], model: str) -> None:
    base = world["root"] / f"onnx-{model.replace(':', '-').replace('/', '-')}"
    for backend in ("torch", "onnxruntime"):
        proc = run(
            world, "extract", "--model", model, *SMALL, "-q", "--backend", backend, "--cache-dir", base / backend
        )
        assert proc.returncode == 0 and f"[{backend}]" in proc.stdout, proc.stderr[-2000:]
    np.testing.assert_allclose(
        _features(base / "onnxruntime", "test"), _features(base / "torch", "test"), rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_a_network_onnx_cannot_export_says_so_once_and_runs_on_torch(world: dict[str, Any]) -> None:
    """timm's ViT at another image size resamples its position embedding with an antialiased bicubic
    interpolation, which torch.onnx cannot export."""
    args = ["extract", "--model", "timm:test_vit", *SMALL, "-q", "--cache-dir", world["root"] / "auto"]
    first = run(world, *args, TLFEAT_BACKEND="auto")
    assert first.returncode == 0 and first.stdout.count("[torch]") == 2, first.stderr[-2000:]
    said = [line for line in first.stderr.splitlines() if "runs on torch" in line]
    assert len(said) == 1 and "_upsample_bicubic2d_aa" in said[0], first.stderr[-2000:]
    assert "graph(" not in first.stderr and "Traceback" not in first.stderr
    again = run(world, *args, TLFEAT_BACKEND="auto")
    assert again.stdout.count("cached, no work done") == 2 and "runs on torch" not in again.stderr, again.stderr


def test_models_lists_each_source(world: dict[str, Any]) -> None:
    timm = run(world, "models", "--source", "timm", "--filter", "test_vit")
    assert timm.returncode == 0 and "timm:test_vit " in timm.stdout and "hf-cache" in timm.stdout, timm.stderr
    hf = run(world, "models", "--source", "hf")
    assert "hf:tiny/dinov2 " in hf.stdout and "hf:tiny/dinov2-reg4" in hf.stdout, hf.stdout + hf.stderr
    clip = run(world, "models", "--source", "open_clip", "--filter", "hf-hub")
    assert "open_clip:hf-hub:tiny/clip" in clip.stdout, clip.stdout + clip.stderr
    layers = run(world, "models", "--layers", "open_clip:hf-hub:tiny/clip")
    assert layers.stdout.split() == ["pre-projection", "transformer.resblocks.0", "transformer.resblocks.1"]


BLOCK_TIMM = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "timm":
            raise ModuleNotFoundError("No module named 'timm' (blocked for this test)")
        return None
sys.meta_path.insert(0, Blocker())
from tlfeat_cli.main import cli
cli(sys.argv[1:], prog_name="tlfeat")
"""


def test_a_missing_source_package_is_one_clear_line(world: dict[str, Any], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TIMM, "extract", "--model", "timm:test_vit", "--data", "digits"],
        capture_output=True,
        text=True,
        env={**world["env"], "TLFEAT_HOME": str(tmp_path / "fresh")},
        timeout=300,
    )
    assert_one_clear_line(proc, "timm package", "pip install 'tlfeat[timm]'")
