"""Frozen configs: what the CLI builds from its options and the library acts on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("TLFEAT_CACHE_DIR") or "features_cache")


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction request. Fields marked (key) change the numbers and are in the cache key."""

    model: str  # (key)
    data: str  # (key) a dataset name or a folder path
    splits: tuple[str, ...] | None = None  # None: every split the dataset has
    layer: str | None = None  # (key) None: the penultimate layer
    weights_id: str | None = None  # (key) None: IMAGENET1K_V1 where it exists
    weights_file: Path | None = None  # (key, through its sha256)
    untrained: bool = False  # (key)
    seed: int = 0  # (key, for untrained weights)
    image_size: int | None = None  # (key) None: the weights' own crop size
    limit: int | None = None  # (key)
    batch_size: int = 64
    workers: int | None = None  # None: chosen from the CPU count
    device: str = "cpu"
    cache_dir: Path | None = None
    data_dir: Path | None = None
    progress: bool = True
    # (key, once resolved) "torch", "onnxruntime", or "auto": the fastest available (env TLFEAT_BACKEND)
    backend: str = field(default_factory=lambda: os.environ.get("TLFEAT_BACKEND") or "auto")
    on_error: str = "fail"  # "fail": stop at an unreadable image, naming it; "skip": record it and go on

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()
