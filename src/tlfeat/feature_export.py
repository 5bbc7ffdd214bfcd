"""`tlfeat export`: a cached feature set as files any tool reads (R, Julia, a spreadsheet).

`npy`: `{split}_features.npy` (float32, n x d), `{split}_labels.npy` (int64) and `{split}_ids.csv` (id,
label, class). `parquet`: `{split}.parquet` with columns id, label, class, f0000... (one row group per
block). `csv`: `{split}.csv` with the same columns. Rows are read from the HDF5 file a block at a time
(`FeatureSet.iter_batches` on a lazy set) and written as they come, so a set larger than memory
exports in flat memory. Each file is written under a temporary name and renamed when whole; `meta.json`
lists, per format exported into the folder, the files written and where their features came from
(model, layer, weights, dataset, the source HDF5 file and its sha256, class names; `limit` null for
a whole split).

`--out` is a new or empty folder, or one an earlier export or analysis made (it carries tlfeat's
marker, which lists the files tlfeat wrote there); a file of the same name that tlfeat did not write
is never replaced. Names are kept exactly: in CSV, a cell of `id` or `class` that a spreadsheet would
run as a formula (it starts with = + - @, a tab or CR) gets a leading `'`, as in the report's CSVs;
a folder name that is not valid UTF-8 is written as its own bytes (CSV), or, in Parquet, makes its
column `binary` (the name's bytes) instead of `string`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfeat import cache, catalog, datasets, fsio
from tlfeat.errors import TlfeatError, formula_safe
from tlfeat.offline import sha256_file

if TYPE_CHECKING:
    from tlfeat.config import ExportConfig

log = logging.getLogger(__name__)


def export(cfg: ExportConfig) -> list[Path]:
    """Write the selected feature set's splits in `cfg.format` under `cfg.out`; returns the files written."""
    from tlfeat.extraction import load_features

    dataset = datasets.canonical(cfg.data)
    cached = sorted(
        {str(e.attrs.get("split")) for e in catalog.scan(cfg.cache_dir) if e.status == "ok" and e.attrs.get("model") == cfg.model and e.attrs.get("dataset") == dataset}
    )  # fmt: skip
    splits = list(cfg.splits or cached)
    if not splits:
        raise TlfeatError(
            f"no cached features of {cfg.model} on {datasets.short_name(dataset)} in {cfg.cache_dir}; "
            f"run `tlfeat extract --model {cfg.model} --data {cfg.data}` first"
        )
    from tlfeat.extraction import refuse_inside

    out = Path(cfg.out)
    refuse_inside(dataset, out, "--out")
    names = [name.format(split=split) for split in splits for name in FILES[cfg.format]]
    fsio.take(out, [*names, "meta.json"], "tlfeat export")
    written: list[Path] = []
    entry: dict[str, Any] = {"files": names, "splits": {}}
    meta: dict[str, Any] = {"formats": {**_earlier_formats(out / "meta.json"), cfg.format: entry}}
    for split in splits:
        fs = load_features(
            cfg.model, cfg.data, split, cfg.cache_dir, layer=cfg.layer, weights_id=cfg.weights_id,
            image_size=cfg.image_size, limit=cfg.limit, test_limit=cfg.test_limit, subset_seed=cfg.subset_seed,
            lazy=True,
        )  # fmt: skip
        paths = [out / name.format(split=split) for name in FILES[cfg.format]]
        WRITERS[cfg.format](fs, paths, cfg.block_rows)
        written += paths
        entry["splits"][split] = {
            "rows": len(fs),
            "features": int(fs.X.shape[1]),
            "source": str(fs.path),
            "source_file_sha256": sha256_file(fs.path)
            if fs.path and Path(fs.path).is_file()
            else None,  # `sha256sum` of the HDF5 file above
            "content_sha256": fs.sha256,  # the cache's own digest of its rows and index (its `sha256` attribute)
            **{k: fs.meta.get(k) for k in ("model", "layer", "weights_id", "dataset", "image_size")},
            "limit": fs.meta.get("limit") or None,  # stored as 0 in the cache: the whole split
        }
        meta["class_names"] = list(fs.class_names)
    fsio.atomic_write(out / "meta.json", json.dumps(meta, indent=2, default=str))
    return [*written, out / "meta.json"]


def _earlier_formats(path: Path) -> dict[str, Any]:
    """What earlier exports into this folder (in other formats) wrote, so meta.json describes every file in it."""
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    formats = earlier.get("formats") if isinstance(earlier, dict) else None
    if isinstance(formats, dict):
        return {k: v for k, v in formats.items() if k in FILES and isinstance(v, dict)}
    if isinstance(earlier, dict) and earlier.get("format") in FILES and isinstance(earlier.get("splits"), dict):
        fmt, splits = earlier["format"], earlier["splits"]  # tlfeat 0.x: one format per meta.json
        return {fmt: {"files": [n.format(split=s) for s in splits for n in FILES[fmt]], "splits": splits}}
    return {}


def _names(d: int) -> list[str]:
    width = max(4, len(str(d - 1)))
    return [f"f{i:0{width}d}" for i in range(d)]


def _npy(fs: cache.FeatureSet, paths: list[Path], block: int) -> None:
    n, d = len(fs), int(fs.X.shape[1])
    features, labels, ids = paths
    with fsio.atomic_path(features) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
        start = 0
        for X, _ in fs.iter_batches(block):
            array[start : start + len(X)] = X
            start += len(X)
        array.flush()
        del array
    with fsio.atomic_path(labels) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(fs.y, dtype=np.int64))
    _ids_csv(fs, ids)


def _ids_csv(fs: cache.FeatureSet, path: Path) -> None:
    with fsio.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "class"])
        for i, label in zip(fs.ids, fs.y.tolist(), strict=True):
            writer.writerow([formula_safe(i), label, formula_safe(fs.class_names[label])])


def _csv(fs: cache.FeatureSet, paths: list[Path], block: int) -> None:
    (path,) = paths
    d = int(fs.X.shape[1])
    with fsio.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "class", *_names(d)])
        start = 0
        for X, y in fs.iter_batches(block):
            text = np.char.mod("%.9g", X)  # 9 significant digits give back the same float32
            for i, row in enumerate(text):
                label = int(y[i])
                writer.writerow([formula_safe(fs.ids[start + i]), label, formula_safe(fs.class_names[label]), *row])
            start += len(X)


def _utf8(values: list[str]) -> bool:
    """Are these names valid UTF-8 (not file-name bytes kept by surrogateescape)?"""
    try:
        "".join(values).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_column(values: list[str], as_bytes: bool) -> Any:
    import pyarrow as pa

    if as_bytes:  # the name's own bytes, exactly as the file system holds them
        return pa.array([v.encode("utf-8", "surrogateescape") for v in values], pa.binary())
    return pa.array(values, pa.string())


def _parquet(fs: cache.FeatureSet, paths: list[Path], block: int) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TlfeatError("--format parquet needs pyarrow: pip install 'tlfeat[parquet]' (or use npy or csv)") from None
    (path,) = paths
    names = _names(int(fs.X.shape[1]))
    ids_bytes, classes_bytes = not _utf8(list(fs.ids)), not _utf8(list(fs.class_names))
    text = {True: pa.binary(), False: pa.string()}
    schema = pa.schema(
        [("id", text[ids_bytes]), ("label", pa.int64()), ("class", text[classes_bytes])]
        + [(n, pa.float32()) for n in names]
    )
    with fsio.atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            start = 0
            for X, y in fs.iter_batches(block):
                ids = fs.ids[start : start + len(X)]
                columns = [
                    _text_column(list(ids), ids_bytes),
                    pa.array(y, pa.int64()),
                    _text_column([fs.class_names[v] for v in y.tolist()], classes_bytes),
                ]
                columns += [pa.array(X[:, j]) for j in range(X.shape[1])]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
                start += len(X)


FILES = {
    "npy": ("{split}_features.npy", "{split}_labels.npy", "{split}_ids.csv"),
    "csv": ("{split}.csv",),
    "parquet": ("{split}.parquet",),
}
WRITERS = {"npy": _npy, "csv": _csv, "parquet": _parquet}
