"""tlfeat: transfer learning on images with frozen pretrained CNN features, cached to HDF5."""

from __future__ import annotations

__version__ = "0.1.0"

from tlfeat.cache import FeatureSet  # noqa: E402
from tlfeat.config import ExtractConfig  # noqa: E402
from tlfeat.errors import TlfeatError  # noqa: E402
from tlfeat.extraction import extract, load_features  # noqa: E402

__all__ = ["ExtractConfig", "FeatureSet", "TlfeatError", "__version__", "extract", "load_features"]
