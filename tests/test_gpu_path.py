"""The GPU path (`--device cuda`, `--precision bf16|fp16`, fixed micro-batches).

What runs without a GPU is tested everywhere: a Ray driver on a CPU prepares replicas for GPU
workers. The rest runs where torch sees a CUDA GPU (skipped elsewhere, saying so).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tlfeat import ExtractConfig, extract, inference, ray_engine

from .conftest import cuda_devices, make_tree


def _spec(tmp_path: Path, **kw: object) -> inference.ModelSpec:
    base: dict[str, object] = dict(
        model="resnet18", layers=(None,), weights_id="untrained:seed0", weights_id_arg=None, weights_file=None,
        untrained=True, seed=0, image_size=32, backend="torch", precision="fp32", device="cpu", cache_dir=tmp_path,
    )  # fmt: skip
    base.update(kw)
    return inference.ModelSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_ray_driver_without_a_gpu_prepares_replicas_for_gpu_workers(tmp_path: Path, precision: str) -> None:
    """The payload is the extractor's state dict made on the driver's CPU, whatever the workers' device
    and precision; a replica rebuilt from it computes what the network built directly computes."""
    payload, meta = ray_engine.payload(_spec(tmp_path, device="cuda", precision=precision))
    assert meta["weights_id"] == "untrained:seed0"
    assert {t.device.type for t in payload["state_dict"].values()} == {"cpu"}
    cpu = _spec(tmp_path)
    batch = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    replica = ray_engine._runner_from(payload, cpu)
    direct = inference.TorchRunner(cpu, inference._resolve(cpu))
    assert np.array_equal(replica(batch)[0], direct(batch)[0])


gpu = pytest.mark.skipif(cuda_devices() == 0, reason="needs a CUDA GPU (torch sees none here)")


def _cfg(tree: Path, tmp_path: Path, **kw: object) -> ExtractConfig:
    base: dict[str, object] = dict(
        model="mobilenet_v2", data=str(tree), image_size=64, workers=0, backend="torch", splits=("train",),
        cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


@gpu
def test_gpu_features_agree_with_the_cpu_and_precisions_are_keyed(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8)
    [cpu] = extract(_cfg(tree, tmp_path))
    [cuda] = extract(_cfg(tree, tmp_path, device="cuda"))
    assert cuda.meta["device"] == "cuda" and cuda.path != cpu.path and cuda.ids == cpu.ids
    # TF32 may be on for convolutions: agreement to 1e-2 of the largest feature, not bit for bit
    assert np.allclose(cuda.X, cpu.X, rtol=1e-2, atol=1e-2 * np.abs(cpu.X).max())
    for precision in ("bf16", "fp16"):
        [half] = extract(_cfg(tree, tmp_path, device="cuda", precision=precision))
        assert half.meta["precision"] == precision and half.path not in (cpu.path, cuda.path)
        cosine = np.sum(half.X * cpu.X, 1) / np.linalg.norm(half.X, axis=1) / np.linalg.norm(cpu.X, axis=1)
        assert cosine.min() > 0.99, (precision, cosine.min())


@gpu
def test_gpu_features_do_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    """Micro-batches of a fixed size on the GPU too (the last one padded)."""
    tree = make_tree(tmp_path / "tree", per_class=30)
    sets = [extract(_cfg(tree, tmp_path / f"b{b}", device="cuda", batch_size=b))[0].X for b in (7, 64, 90)]
    assert all(np.array_equal(sets[0], other) for other in sets[1:])


@gpu
def test_a_gpu_runner_returns_cpu_float32_in_fixed_micro_batches(tmp_path: Path) -> None:
    spec = _spec(tmp_path, device="cuda")
    runner = inference.TorchRunner(spec, inference._resolve(spec))
    cpu = inference.TorchRunner(dataclasses.replace(spec, device="cpu"), inference._resolve(spec))
    batch = np.random.default_rng(0).normal(size=(70, 3, 32, 32)).astype(np.float32)
    assert runner.micro == inference.GPU_MICRO_BATCH and not runner.cpu
    [out] = runner(batch)
    assert out.shape == (70, 512) and out.dtype == np.float32
    assert np.allclose(out, cpu(batch)[0], rtol=1e-2, atol=1e-2 * np.abs(out).max())
