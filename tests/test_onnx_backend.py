"""The ONNX Runtime backend: same features as torch (1e-4 relative), exported once, chosen by auto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tlfeat import ExtractConfig, extract, onnx_backend
from tlfeat.errors import TlfeatError
from tlfeat.extraction import choose_backend

pytestmark = pytest.mark.skipif(not onnx_backend.available(), reason="onnxruntime not installed (pip install '.[dev]')")


def assert_close_to_torch(onnx: np.ndarray, torch: np.ndarray) -> None:
    """Each feature within 1e-4 of torch's relative, plus 1e-5 of the largest feature (features near zero).

    Measured on these images: at most 2.2e-6 of the largest feature apart, and 5.7e-5 relative for
    every feature above 1% of the largest (MobileNetV2, ResNet-50, DenseNet-121, ResNet-50 layer3).
    """
    scale = float(np.abs(torch).max())
    excess = np.abs(onnx - torch) - (1e-4 * np.abs(torch) + 1e-5 * scale)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, f"feature {worst}: onnx {onnx[worst]}, torch {torch[worst]}, largest {scale}"


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
        assert_close_to_torch(o.X, t.X)
        assert o.ids == t.ids and np.array_equal(o.y, t.y)


# First on PYTHONPATH, this is every new Python process's sitecustomize: each call of torch.onnx.export,
# in whichever process the export runs, appends that process's id to $EXPORT_LOG.
COUNTING_SITE = """
import importlib.abc, importlib.machinery, os, sys

class CountExports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.onnx":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            export = module.export
            def counted(*args, **kwargs):
                with open(os.environ["EXPORT_LOG"], "a") as fh:
                    fh.write(f"{os.getpid()}\\n")
                return export(*args, **kwargs)
            module.export = counted
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, CountExports())
"""


def _exports(log: Path) -> list[int]:
    return [int(pid) for pid in log.read_text().split()] if log.exists() else []


def test_export_is_made_once_and_auto_reuses_other_backends(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    site, log = tmp_path / "site", tmp_path / "exports.log"
    site.mkdir()
    (site / "sitecustomize.py").write_text(COUNTING_SITE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("EXPORT_LOG", str(log))
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(tmp_path / "models"))  # no export is there yet
    cache_dir = tmp_path / "c"
    extract(_cfg(tree, cache_dir, "onnxruntime", model="resnet18", untrained=True))
    [pid] = _exports(log)  # one export, seen by the counter...
    assert pid != os.getpid()  # ...in a process of its own
    [export] = [*cache_dir.rglob("*.onnx"), *(tmp_path / "models").rglob("*.onnx")]
    stamp = (export.stat().st_ino, export.stat().st_mtime_ns)

    second = extract(_cfg(tree, cache_dir, "onnxruntime", model="resnet18", untrained=True, splits=("train",), limit=6))
    assert _exports(log) == [pid], "the second run exported again"
    assert (export.stat().st_ino, export.stat().st_mtime_ns) == stamp and not second[0].reused

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
    assert_close_to_torch(o.X, t.X)


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
