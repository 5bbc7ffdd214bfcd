"""Two feature sets of one model that differ only in `--pool`: told apart when loaded, fitted and
reported (a ViT's class token and its mean token are different features)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlfeat import extract, load_features
from tlfeat.cache import CacheMismatch
from tlfeat.config import ExtractConfig, FitConfig
from tlfeat.fitting import fit
from tlfeat.records import variants

from . import hubs


@pytest.mark.slow
def test_pool_variants_are_selected_and_labelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hubs.all_hubs(tmp_path / "hf", tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    small = dict(model="timm:test_vit", data="digits", limit=40, test_limit=20, image_size=32, cache_dir=cache_dir)
    for pool in ("cls", "mean"):
        extract(ExtractConfig(pool=pool, backend="torch", progress=False, **small))  # type: ignore[arg-type]

    with pytest.raises(CacheMismatch, match="pooling=cls or pooling=mean"):
        load_features("timm:test_vit", "digits", "test", cache_dir)
    cls = load_features("timm:test_vit", "digits", "test", cache_dir, pooling="cls")
    mean = load_features("timm:test_vit", "digits", "test", cache_dir, pooling="mean")
    assert cls.meta["pooling"] == "cls" and mean.meta["pooling"] == "mean"
    assert not (cls.X == mean.X).all()

    records = [r.record for r in fit(FitConfig(clf="logreg", C=1.0, cache_dir=cache_dir, results_dir=results))]
    labels = variants(records)
    assert sorted(labels[id(r)] for r in records) == ["pooling cls", "pooling mean"]
