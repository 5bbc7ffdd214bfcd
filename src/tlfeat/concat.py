"""Concatenated layers as one feature set: `--layer features.13+features.17+penultimate`.

A concatenation is assembled from the per-layer cache files of one extraction pass rather than
stored as a file of its own. Why: one pass already writes every layer asked for (`extract --layer
a+b+c` extracts a, b and c), so a combined file would only duplicate their rows on disk (1,696
floats per image for MobileNetV2's features.13 + features.17 + penultimate) and need its own
updates, checksums and staleness; assembled, each part keeps its own checksums, a layer sweep's
files serve every concatenation of them, and a result's key names the concatenation by its parts'
checksums (so a part that changes makes a new result). The parts must come from the same images in
the same order (same ids and labels), which one extraction pass guarantees and `read` checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np

from tlfeat import cache
from tlfeat.errors import TlfeatError

SEP = "+"


def is_concat(layer: str | None) -> bool:
    return bool(layer) and SEP in str(layer)


def parts(layer: str) -> list[str]:
    names = [p.strip() for p in layer.split(SEP)]
    if any(not p for p in names) or len(set(names)) != len(names):
        raise TlfeatError(
            f"--layer {layer!r}: a concatenation names distinct layers joined by '+', e.g. layer3+penultimate"
        )
    return names


def combined_sha(shas: list[str]) -> str:
    """What identifies a concatenation: its parts' checksums, in order."""
    return hashlib.sha256(":".join(shas).encode()).hexdigest()


def combined_attrs(layer: str, attrs: list[dict[str, Any]]) -> dict[str, Any]:
    """The attributes a concatenation shows (the first part's, its own layer, poolings, width and checksum)."""
    out = dict(attrs[0])
    pools = [str(a.get("pooling")) for a in attrs]
    out.update(
        layer=layer,
        pooling=pools[0] if len(set(pools)) == 1 else SEP.join(pools),  # each part's own, in order
        n_features=sum(int(a.get("n_features") or 0) for a in attrs),
        sha256=combined_sha([str(a.get("sha256")) for a in attrs]),
        parts=[{"layer": a.get("layer"), "pooling": a.get("pooling"), "sha256": a.get("sha256")} for a in attrs],
    )
    return out


class ConcatRows:
    """Rows of several feature matrices side by side, read on demand (each part may be a `LazyRows`)."""

    def __init__(self, blocks: list[Any]) -> None:
        self.blocks = blocks
        self.shape = (int(blocks[0].shape[0]), sum(int(b.shape[1]) for b in blocks))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.hstack([np.asarray(b[index], dtype=np.float32) for b in self.blocks])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def join(layer: str, sets: list[cache.FeatureSet]) -> cache.FeatureSet:
    """One feature set of the parts' columns side by side; an error if they are not the same images."""
    first = sets[0]
    for fs in sets[1:]:
        if fs.ids != first.ids or not np.array_equal(fs.y, first.y):
            raise TlfeatError(
                f"--layer {layer}: {fs.path} and {first.path} hold other images or another order "
                "(not one extraction pass); extract them together with `tlfeat extract --layer " + layer + "`"
            )
    in_memory = all(isinstance(fs.X, np.ndarray) for fs in sets)
    X: Any = np.hstack([fs.X for fs in sets]) if in_memory else ConcatRows([fs.X for fs in sets])
    meta = dict(first.meta)
    meta.update(combined_attrs(layer, [fs.meta for fs in sets]))
    meta["extract_seconds"] = float(first.meta.get("extract_seconds", 0.0))  # one pass made every part
    return replace(first, X=X, meta=meta)
