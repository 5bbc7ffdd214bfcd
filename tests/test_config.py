"""One place per option: configs declare each field's role and bounds; the cache key follows from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tlfeat import constraints
from tlfeat.config import CompareConfig, ExtractConfig, FinetuneConfig, FitConfig
from tlfeat.errors import TlfeatError
from tlfeat.extraction import KEY_RESOLVERS, plan


@pytest.mark.parametrize("config", [ExtractConfig, FitConfig, FinetuneConfig, CompareConfig])
def test_every_field_says_whether_it_changes_the_numbers(config: type) -> None:
    assert constraints.unclassified(config) == [], "declare each new field with key(...) or setting(...)"


# A different value for every key field of ExtractConfig (the test fails for a key field missing here).
CHANGED: dict[str, Any] = {
    "model": "resnet18",
    "data": "PLACEHOLDER",  # another folder, filled in below
    "layer": "layer3",
    "pool": "cls",
    "weights_id": "IMAGENET1K_V2",
    "weights_file": "PLACEHOLDER",
    "untrained": True,
    "seed": 1,
    "image_size": 48,
    "limit": 5,
    "test_limit": 5,
    "subset_seed": 3,
    "label_field": "label",
    "fast_decode": False,
    "precision": "bf16",
    "backend": "torch",
    "device": "cuda",
    "decode": "device",
}


def test_every_key_field_reaches_the_cache_key(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing any `key` field changes some file's key; no `setting` changes any."""
    import torch

    from tlfeat import backbones

    monkeypatch.setattr(backbones, "feature_dims", lambda *a, **k: [1])  # no model is built: only keys are compared
    other = tree.parent / "other"
    other.mkdir()
    (other / "train").symlink_to(tree / "train")
    (other / "val").symlink_to(tree / "val")
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    values = {**CHANGED, "data": str(other), "weights_file": weights}
    keys = constraints.key_fields(ExtractConfig(model="resnet50", data=str(tree)))
    assert sorted(values) == sorted(keys), "a new key field needs a changed value in CHANGED"
    base = dict(model="resnet50", data=str(tree), backend="onnxruntime", cache_dir=tmp_path)

    def files(**change: Any) -> set[str]:
        if change.get("label_field"):  # the label field only matters for shards: a shard spec of the same folder
            return {"label-field"}
        cfg = ExtractConfig(**{**base, **change})  # type: ignore[arg-type]
        return {t.path.name for t in plan(cfg)}

    # Fields that only matter together with another: the seed of random weights, the seed of a subset.
    context: dict[str, dict[str, Any]] = {
        "seed": {"untrained": True},
        "subset_seed": {"limit": 5},
        "device": {"backend": "torch"},
        "precision": {"backend": "torch"},
        "pool": {"model": "timm:test_vit"},  # token pooling: a transformer's
    }
    for name, value in values.items():
        if name == "label_field":
            continue
        extra = context.get(name, {})
        assert files(**extra, **{name: value}) != files(**extra), f"{name} does not reach the cache key"
    for f in dataclasses.fields(ExtractConfig):
        if constraints.role(f) == "setting" and f.name not in ("splits", "cache_dir"):
            assert f.name not in KEY_RESOLVERS


def test_the_label_field_of_shards_is_in_the_key(tmp_path: Path) -> None:
    import io
    import tarfile

    from PIL import Image

    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as t:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buf, "PNG")
            for name, data in ((f"{i}.png", buf.getvalue()), (f"{i}.cls", str(i % 2).encode()), (f"{i}.label", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    names = {
        cfg: {
            t.path.name
            for t in plan(ExtractConfig(model="resnet18", data=str(tar), label_field=cfg, cache_dir=tmp_path))
        }
        for cfg in ("cls", "label")
    }
    assert names["cls"] != names["label"]


@pytest.mark.parametrize(
    ("config", "kw", "message"),
    [
        (ExtractConfig, {"batch_size": 0}, "--batch-size must be an integer between 1 and 65536, got 0"),
        (ExtractConfig, {"workers": 300}, "--workers must be an integer between 0 and 256, got 300"),
        (ExtractConfig, {"image_size": 8}, "--image-size must be an integer between 16 and 2048, got 8"),
        (
            ExtractConfig,
            {"device": "tpu"},
            "--device must be cpu, cuda, cuda:N or mps, or several GPUs as cuda:0,1,..., got 'tpu'",
        ),
        (ExtractConfig, {"data": ""}, "--data must be a non-empty name without control characters, got ''"),
        (FitConfig, {"C": float("nan")}, "--C must be a finite number in (0, 1e+06], got nan"),
        (FitConfig, {"cv_folds": 1}, "--cv-folds must be an integer between 2 and 20, got 1"),
        (FinetuneConfig, {"lr": -1.0}, "--lr must be a finite number in (0, 1e+06], got -1.0"),
        (
            FinetuneConfig,
            {"augment": "mirror"},
            "--augment must be one of auto, none, flip, crop, standard, got 'mirror'",
        ),
        (CompareConfig, {"repeats": 0}, "--repeats must be an integer between 1 and 1000, got 0"),
    ],
)
def test_bounds_live_in_the_configs(config: type, kw: dict[str, Any], message: str) -> None:
    required = {"model": "resnet18", "data": "digits"} if config in (ExtractConfig, FinetuneConfig) else {}
    if config is CompareConfig:
        required = {"models": ("resnet18",), "datas": ("digits",)}
    with pytest.raises(TlfeatError) as info:
        config(**{**required, **kw})
    assert str(info.value) == message


def test_scratch_gets_its_own_recipe_and_transfer_keeps_its_own() -> None:
    scratch = FinetuneConfig(model="resnet18", data="digits", strategy="scratch")
    transfer = FinetuneConfig(model="resnet18", data="digits", strategy="full")
    assert (scratch.optimizer, scratch.schedule, scratch.epochs, scratch.precise_bn) == ("sgd", "cosine", 50, 20)
    assert (transfer.optimizer, transfer.schedule, transfer.epochs, transfer.precise_bn) == ("adam", "step", 25, 0)
    mine = FinetuneConfig(model="resnet18", data="digits", strategy="scratch", optimizer="adam", lr=0.01)
    assert (mine.optimizer, mine.lr, mine.schedule) == ("adam", 0.01, "cosine")  # what the user sets wins
