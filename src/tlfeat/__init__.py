"""tlfeat: transfer learning on images with frozen pretrained CNN features, cached to HDF5.

Importing tlfeat is cheap (no torch): the public names below load their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "ExtractConfig": "tlfeat.config",
    "FitConfig": "tlfeat.config",
    "FinetuneConfig": "tlfeat.config",
    "CompareConfig": "tlfeat.config",
    "FeatureSet": "tlfeat.cache",
    "TlfeatError": "tlfeat.errors",
    "extract": "tlfeat.extraction",
    "load_features": "tlfeat.extraction",
}

if TYPE_CHECKING:
    from tlfeat.cache import FeatureSet
    from tlfeat.config import CompareConfig, ExtractConfig, FinetuneConfig, FitConfig
    from tlfeat.errors import TlfeatError
    from tlfeat.extraction import extract, load_features


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tlfeat' has no attribute {name!r}")


__all__ = [
    "CompareConfig",
    "ExtractConfig",
    "FeatureSet",
    "FinetuneConfig",
    "FitConfig",
    "TlfeatError",
    "__version__",
    "extract",
    "load_features",
]
