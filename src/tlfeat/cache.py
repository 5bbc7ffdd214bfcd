"""The feature cache: one self-describing HDF5 file per (model, weights, layer, preprocessing,
dataset, split, limit).

A file holds `features` (float32, n x d), `labels`, `ids` and `class_names`, and its provenance
as attributes. It is written under a `.partial` name in chunks (so an interrupted extraction
resumes) and renamed when complete, so a file with the final name is always whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.errors import CacheMismatch, TlfeatError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIX = ".h5"
PARTIAL = ".partial"


@dataclass
class FeatureSet:
    """Features of one split, with everything needed to trace them back."""

    X: np.ndarray  # float32 (n_samples, n_features)
    y: np.ndarray  # int64 (n_samples,)
    ids: list[str]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reused: bool = False  # True when the cache already held these features

    @property
    def model(self) -> str:
        return str(self.meta.get("model", ""))

    @property
    def split(self) -> str:
        return str(self.meta.get("split", ""))

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (
            f"FeatureSet(model={self.model!r}, dataset={self.meta.get('dataset')!r}, split={self.split!r}, "
            f"X={self.X.shape}, classes={len(self.class_names)})"
        )


def cache_key(key_fields: dict[str, Any]) -> str:
    blob = json.dumps(key_fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(cache_dir: Path, model: str, slug: str, split: str, key: str) -> Path:
    return Path(cache_dir) / f"{model}__{slug}__{split}__{key}{SUFFIX}"


def _features_digest(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features, dtype=np.float32).tobytes()).hexdigest()


class Writer:
    """Appends feature rows to a `.partial` file and renames it once complete.

    Reopening the same partial file with the same key resumes after its last flushed row.
    """

    def __init__(
        self,
        final: Path,
        key: str,
        attrs: dict[str, Any],
        labels: np.ndarray,
        ids: list[str],
        class_names: list[str],
        flush_every: int = 1024,
    ) -> None:
        import h5py

        self.final = Path(final)
        self.partial = self.final.with_name(self.final.name + PARTIAL)
        self.n = len(labels)
        self.flush_every = flush_every
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.done = 0
        if self.partial.exists():
            try:
                self.h5 = h5py.File(self.partial, "a")
                same = self.h5.attrs.get("key") == key and int(self.h5.attrs.get("n_images", -1)) == self.n
                if same:
                    self.done = int(self.h5.attrs.get("n_done", 0))
                    log.info("resuming %s after %d of %d images", self.partial.name, self.done, self.n)
                else:
                    self.h5.close()
                    self.partial.unlink()
            except OSError:
                log.warning("discarding unreadable partial file %s", self.partial)
                self.partial.unlink()
        if not self.partial.exists():
            self.h5 = h5py.File(self.partial, "w")
            for name, value in attrs.items():
                self.h5.attrs[name] = _attr(value)
            self.h5.attrs["key"] = key
            self.h5.attrs["n_images"] = self.n
            self.h5.attrs["n_done"] = 0
            self.h5.attrs["complete"] = False
            self.h5.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            self.h5.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
            self.h5.create_dataset("class_names", data=np.asarray(class_names, dtype=object), dtype=h5py.string_dtype())
        self._since_flush = 0

    def append(self, feats: np.ndarray) -> None:
        if "features" not in self.h5:
            dim = feats.shape[1]
            self.h5.create_dataset(
                "features",
                shape=(self.n, dim),
                dtype=np.float32,
                chunks=(max(1, min(self.n, max(1, 2**20 // (4 * dim)))), dim),
            )
        start = self.done
        self.h5["features"][start : start + len(feats)] = feats.astype(np.float32, copy=False)
        self.done += len(feats)
        self._since_flush += len(feats)
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        self.h5.attrs["n_done"] = self.done
        self.h5.flush()
        self._since_flush = 0

    def finish(self, extra_attrs: dict[str, Any]) -> Path:
        if self.done != self.n:
            raise TlfeatError(f"internal: wrote {self.done} of {self.n} feature rows")
        for name, value in extra_attrs.items():
            self.h5.attrs[name] = _attr(value)
        self.h5.attrs["features_sha256"] = _features_digest(self.h5["features"][...])
        self.h5.attrs["n_done"] = self.done
        self.h5.attrs["complete"] = True
        self.h5.close()
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        """Keep what was computed so far (flushed) for the next run to resume."""
        if self.h5.id.valid:
            self.flush()
            self.h5.close()


def _attr(value: Any) -> Any:
    """HDF5 attributes take plain str/int/float/bool; None becomes ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # str subclasses such as torch's TorchVersion
    return value


def read_attrs(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as h5:
        return {k: _plain(v) for k, v in h5.attrs.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def read(path: Path, verify: bool = True) -> FeatureSet:
    """Load a complete cache file; a damaged or incomplete one is an error that says so."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            meta = {k: _plain(v) for k, v in h5.attrs.items()}
            if not meta.get("complete"):
                raise TlfeatError(f"{path} is incomplete; run the same `tlfeat extract` again to finish it")
            X = h5["features"][...]
            y = h5["labels"][...]
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in h5["ids"][...]]
            names = [s.decode() if isinstance(s, bytes) else str(s) for s in h5["class_names"][...]]
    except (OSError, KeyError) as exc:
        raise TlfeatError(f"{path} is damaged ({exc}); delete it and run `tlfeat extract` again") from exc
    if verify and meta.get("features_sha256") and _features_digest(X) != meta["features_sha256"]:
        raise TlfeatError(f"{path} is damaged (features checksum differs); delete it and extract again")
    return FeatureSet(X=X, y=y, ids=ids, class_names=names, meta=meta, path=path)


@dataclass(frozen=True)
class Entry:
    """One cache file as `tlfeat ls` shows it."""

    path: Path
    attrs: dict[str, Any]
    status: str  # "ok", "partial", "damaged"


def scan(cache_dir: Path) -> list[Entry]:
    """Every cache file (complete or partial) under `cache_dir`, newest first."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    entries = []
    for path in sorted(cache_dir.glob(f"*{SUFFIX}*")):
        if not (path.name.endswith(SUFFIX) or path.name.endswith(SUFFIX + PARTIAL)):
            continue
        try:
            attrs = read_attrs(path)
            status = "ok" if attrs.get("complete") and path.name.endswith(SUFFIX) else "partial"
        except OSError:
            attrs, status = {}, "damaged"
        entries.append(Entry(path, attrs, status))
    entries.sort(key=lambda e: str(e.attrs.get("created", "")), reverse=True)
    return entries


# Options a user can pass to narrow down which cached set to load, and their attribute names.
SELECTORS = ("layer", "weights_id", "image_size", "limit")


def find(cache_dir: Path, model: str, dataset_id: str, split: str, **selectors: Any) -> Path:
    """The one complete cache file matching (model, dataset, split) and any given selectors."""
    candidates = [
        e
        for e in scan(cache_dir)
        if e.status == "ok"
        and e.attrs.get("model") == model
        and e.attrs.get("dataset") == dataset_id
        and e.attrs.get("split") == split
    ]
    if not candidates:
        raise CacheMismatch(
            f"no cached features for model {model!r}, dataset {dataset_id!r}, split {split!r} in {cache_dir}; "
            f"run `tlfeat extract --model {model} --data {dataset_id}` first"
        )
    wanted = {k: v for k, v in selectors.items() if v is not None}
    matching = [e for e in candidates if all(_same(e.attrs.get(k), v) for k, v in wanted.items())]
    if len(matching) == 1:
        return matching[0].path
    describe = "; ".join(", ".join(f"{k}={e.attrs.get(k) or '-'}" for k in SELECTORS) for e in (matching or candidates))
    if not matching:
        raise CacheMismatch(
            f"cached features for {model}/{dataset_id}/{split} exist but none has "
            f"{', '.join(f'{k}={v}' for k, v in wanted.items())}; stored: {describe}"
        )
    raise CacheMismatch(
        f"{len(matching)} cached feature sets match {model}/{dataset_id}/{split}; pick one with "
        f"layer=, weights_id=, image_size= or limit=. Stored: {describe}"
    )


def _same(stored: Any, wanted: Any) -> bool:
    if stored in ("", None):
        stored = None
    return stored == wanted or str(stored) == str(wanted)
