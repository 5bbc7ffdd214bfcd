"""What one extraction produces, shared by the planner (`extraction`) and the engines (`engine`):
a `Target` (one cache file: a split at a layer), its `State` against the images now, and the
attributes (`provenance`) a file describes itself with."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tlfeat import __version__, cache, datasets, fingerprint
from tlfeat.backbones.base import layer_name
from tlfeat.config import ExtractConfig
from tlfeat.datasets import ImageSplit


@dataclass
class Target:
    """One cache file to produce: a split at a layer."""

    split: str
    layer: str | None
    path: Path
    key_fields: dict[str, Any]
    key: str


@dataclass
class State:
    """What a target's file holds compared with the images now."""

    target: Target
    fs: cache.FeatureSet | None = None  # the file's features, when they can be returned as they are
    changes: fingerprint.Changes | None = None  # how the images differ, when the file is stale
    old: Path | None = None  # the stale file, to carry rows over from


def provenance(
    cfg: ExtractConfig, target: Target, images: ImageSplit, weights: dict[str, Any], runtime: dict[str, str]
) -> dict[str, Any]:
    """The attributes a cache file describes itself with."""
    import json

    from tlfeat.inference import versions

    prep = target.key_fields["preprocessing"]
    installed = versions()
    return {
        "tlfeat_version": __version__,
        "format": cache.FORMAT_VERSION,
        "model": cfg.model,
        "weights_id": weights.get("weights_id") or target.key_fields["weights_id"],
        "weights_source": weights.get("weights_source", ""),
        "weights_sha256": weights.get("weights_sha256", ""),
        "pretrained": not str(target.key_fields["weights_id"]).startswith("untrained:"),
        "layer": layer_name(target.layer),
        "pooling": target.key_fields["pooling"],
        "preprocessing": json.dumps(prep, sort_keys=True),
        "image_size": prep["crop_size"],
        "fast_decode": bool(prep.get("fast_decode", False)),
        "dataset": images.dataset,
        "dataset_source": images.source,
        "source_files": json.dumps(list(images.source_files)),
        "split": target.split,
        "limit": cfg.split_limit(target.split) or 0,
        "train_limit": cfg.limit or 0,
        "test_limit": cfg.test_limit or 0,
        "subset_seed": cfg.subset_seed if cfg.split_limit(target.split) is not None else 0,
        "data_dir": str(cfg.data_dir) if images.dataset in datasets.named_datasets() else "",
        "label_field": cfg.label_field,
        "split_seed": datasets.SPLIT_SEED,
        "backend": target.key_fields["backend"],
        "precision": cfg.precision,
        "engine": cfg.engine,
        "runtime_version": runtime.get("version", ""),
        "device": cfg.device,
        "torch_version": installed["torch"],
        "torchvision_version": installed["torchvision"],
        "onnxruntime_version": installed["onnxruntime"],
        "python_version": platform.python_version(),
        "key_fields": json.dumps(target.key_fields, sort_keys=True, default=str),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
