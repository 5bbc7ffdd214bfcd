"""Listing Parquet files of images: one row per image, the image bytes in a binary column (or a
struct with a `bytes` field, as Hugging Face datasets write it), the label in the `--label-field`
column (default `cls`, else `label`), the id in `__key__`, `key` or `id` where there is one.

The label column is checked by its arrow type before a value is read: integers, whole-number
floats, booleans and text are labels; lists, structs, maps, decimals and dates are not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tlfeat.datasets.labels import class_label
from tlfeat.errors import TlfeatError, printable

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
KEY_COLUMNS = ("__key__", "key", "id")


def _label_type_ok(kind: Any) -> bool:
    import pyarrow.types as t

    if t.is_dictionary(kind):
        return _label_type_ok(kind.value_type)
    return bool(
        t.is_integer(kind)
        or t.is_floating(kind)
        or t.is_boolean(kind)
        or t.is_string(kind)
        or t.is_large_string(kind)
        or t.is_binary(kind)
        or t.is_large_binary(kind)
        or t.is_fixed_size_binary(kind)
        or t.is_null(kind)
        or str(kind) in ("string_view", "binary_view")
    )


def _key_type_ok(kind: Any) -> bool:
    import pyarrow.types as t

    return bool(t.is_integer(kind) or t.is_string(kind) or t.is_large_string(kind) or str(kind) == "string_view")


def samples(path: str, label_field: str, root: str = "") -> list[tuple[str, Any, Any, int]]:
    """(key, label, ref, size) of every row of one Parquet file; ref is (path, row group, row, column).

    Rows without a key column are keyed by the file's path relative to `root` (the folder its
    pattern starts from), row group and row: unique across files of one name in different folders."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise TlfeatError("reading Parquet needs pyarrow: `pip install 'tlfeat[parquet]'`") from exc
    name = printable(path)
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise TlfeatError(f"{name} is not a readable Parquet file ({exc})") from exc
    names = schema.names
    shown = printable(", ".join(names)[:300])
    candidates = [c for c in IMAGE_COLUMNS if c in names]
    if not candidates:
        raise TlfeatError(f"{name} has no image column (looked for {', '.join(IMAGE_COLUMNS)}; it has {shown})")
    if len(candidates) > 1:  # never a silent pick: the other column may hold the images meant
        raise TlfeatError(
            f"{name} has {len(candidates)} columns that could hold the images ({', '.join(candidates)}); "
            "write the file with one of them (tlfeat has no option to choose yet)"
        )
    column = candidates[0]
    field = label_field if label_field in names else ("label" if "label" in names and label_field == "cls" else None)
    if field is None:
        raise TlfeatError(
            f"{name} has no label column {printable(label_field)!r} (it has {shown}); choose it with --label-field"
        )
    kind = schema.field(field).type
    if not _label_type_ok(kind):
        raise TlfeatError(
            f"{name}: label column {printable(field)!r} is of type {printable(str(kind))[:80]}, not a class label "
            "(integers or text); choose another column with --label-field"
        )
    key_column = next((c for c in KEY_COLUMNS if c in names and _key_type_ok(schema.field(c).type)), None)
    out = []
    where_in = os.path.relpath(path, root) if root else Path(path).name
    try:
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=[field] + ([key_column] if key_column else []))
            labels = table.column(field).to_pylist()
            keys = table.column(key_column).to_pylist() if key_column else None
            for row, label in enumerate(labels):
                key = keys[row] if keys else f"{where_in}/{group}/{row}"
                where = f"{name}: row {row} of row group {group}"
                if key is None or not str(key).strip():
                    raise TlfeatError(f"{where} has no {key_column} (sample id); give every row one")
                key = str(key)
                if label is None or (isinstance(label, str) and not label.strip()):
                    raise TlfeatError(
                        f"sample {printable(key)} of {name} has no label (column {printable(field)!r} is empty "
                        "there); label it or remove the row"
                    )
                out.append(
                    (key, class_label(label, f"{where} (sample {printable(key)[:80]})"), (path, group, row, column), 0)
                )
    except TlfeatError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged row group
        raise TlfeatError(f"{name} is not a readable Parquet file ({exc})") from exc
    return out
