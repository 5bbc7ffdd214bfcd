"""The ONNX Runtime backend: same features as torch (1e-4 relative), exported once, chosen by auto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tlfeat import ExtractConfig, config, extract, onnx_backend
from tlfeat.errors import TlfeatError
from tlfeat.extraction import choose_backend

pytestmark = pytest.mark.skipif(not onnx_backend.available(), reason="onnxruntime not installed (pip install '.[dev]')")


def _cfg(tree: Path, cache_dir: Path, backend: str, **kw: object) -> ExtractConfig:
    base: dict[str, object] = dict(
        data=str(tree), workers=0, batch_size=5, cache_dir=cache_dir, progress=False, backend=backend, image_size=96
    )
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "model_kw",
    [{"model": "mobilenet_v2"}, {"model": "resnet50", "untrained": True}, {"model": "densenet121", "untrained": True}],
    ids=["mobilenet_v2-imagenet", "resnet50-untrained", "densenet121-untrained"],
)
def test_features_match_the_torch_backend(tree: Path, tmp_path: Path, model_kw: dict[str, object]) -> None:
    torch_sets = extract(_cfg(tree, tmp_path / "c", "torch", **model_kw))
    ort_sets = extract(_cfg(tree, tmp_path / "c", "onnxruntime", **model_kw))
    for t, o in zip(torch_sets, ort_sets, strict=True):
        assert o.meta["backend"] == "onnxruntime" and t.meta["backend"] == "torch" and o.path != t.path
        assert o.meta["onnxruntime_version"]
        scale = np.abs(t.X).max()
        assert np.abs(o.X - t.X).max() <= 1e-4 * scale, np.abs(o.X - t.X).max() / scale
        assert o.ids == t.ids and np.array_equal(o.y, t.y)


def test_export_is_made_once_and_auto_reuses_other_backends(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(tmp_path / "models"))
    cache_dir = tmp_path / "c"
    extract(_cfg(tree, cache_dir, "onnxruntime", model="resnet18", untrained=True))
    [export] = list((config.model_cache_dir() / "onnx").glob("*.onnx"))
    mtime = export.stat().st_mtime_ns

    calls = []
    monkeypatch.setattr("torch.onnx.export", lambda *a, **k: calls.append(a))
    second = extract(_cfg(tree, cache_dir, "onnxruntime", model="resnet18", untrained=True, splits=("train",), limit=6))
    assert not calls and export.stat().st_mtime_ns == mtime and not second[0].reused

    # auto picks onnxruntime on CPU, but reuses features torch already computed instead of recomputing
    assert choose_backend(_cfg(tree, cache_dir, "auto", model="resnet18")) == "onnxruntime"
    [torch_set] = extract(_cfg(tree, cache_dir, "torch", model="resnet18", untrained=True, splits=("train",), seed=3))
    [auto_set] = extract(_cfg(tree, cache_dir, "auto", model="resnet18", untrained=True, splits=("train",), seed=3))
    assert auto_set.reused and auto_set.path == torch_set.path


def test_backend_errors_are_one_clear_line(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TlfeatError, match="runs on the CPU"):
        choose_backend(_cfg(tree, tmp_path, "onnxruntime", model="resnet18", device="cuda"))
    with pytest.raises(TlfeatError, match="GPU autocast in torch"):
        choose_backend(_cfg(tree, tmp_path, "onnxruntime", model="resnet18", precision="bf16"))
    assert choose_backend(_cfg(tree, tmp_path, "auto", model="resnet18", precision="bf16")) == "torch"
    assert choose_backend(_cfg(tree, tmp_path, "auto", model="resnet18", layer="layer3")) == "onnxruntime"
    assert choose_backend(_cfg(tree, tmp_path, "auto", model="resnet18", device="cuda")) == "torch"
    monkeypatch.setattr(onnx_backend, "available", lambda: False)
    with pytest.raises(TlfeatError, match="pip install onnxruntime"):
        choose_backend(_cfg(tree, tmp_path, "onnxruntime", model="resnet18"))
    assert choose_backend(_cfg(tree, tmp_path, "auto", model="resnet18")) == "torch"


def test_an_earlier_layer_runs_under_onnx_runtime_and_equals_torch(tree: Path, tmp_path: Path) -> None:
    """The graph cut at layer3 (torchvision's create_feature_extractor) exports and runs under ONNX Runtime."""
    kw = dict(model="resnet50", untrained=True, layer="layer3", splits=("train",))
    [t] = extract(_cfg(tree, tmp_path / "c", "torch", **kw))
    [o] = extract(_cfg(tree, tmp_path / "c", "onnxruntime", **kw))
    assert o.meta["layer"] == "layer3" and o.X.shape == t.X.shape == (12, 1024)
    assert np.abs(o.X - t.X).max() <= 1e-4 * np.abs(t.X).max()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_several_layers_in_one_pass_equal_one_pass_each(tree: Path, tmp_path: Path, backend: str) -> None:
    kw = dict(model="resnet18", untrained=True, splits=("train",))
    together = extract(_cfg(tree, tmp_path / "one", backend, layer="layer1,layer3,penultimate", **kw))
    assert [fs.meta["layer"] for fs in together] == ["layer1", "layer3", "penultimate"]
    assert len({fs.path for fs in together}) == 3  # one file (and key) per layer
    for fs in together:
        layer = None if fs.meta["layer"] == "penultimate" else fs.meta["layer"]
        [alone] = extract(_cfg(tree, tmp_path / "each", backend, layer=layer, **kw))
        assert np.array_equal(fs.X, alone.X) and alone.path is not None and fs.path is not None
        assert alone.path.name == fs.path.name  # the same key whichever way it was made
