"""Reading one stored image in place: a byte range of a tar shard, a cell of a Parquet file.

Both `ImageSplit` (in the main process) and Ray's decoding tasks read through these; neither
needs to know how the listing was made. Sizes are checked before anything is read: a member
larger than `config.max_image_bytes()` is one error line, never a read until memory runs out.
"""

from __future__ import annotations

import os
import stat
from functools import lru_cache
from typing import Any

from tlfeat import config
from tlfeat.errors import TlfeatError, printable
from tlfeat.images import file_kind, megabytes


def read_range(path: str, offset: int, size: int) -> bytes:
    """`size` bytes of the regular file `path` from `offset` (a tar member)."""
    limit = config.max_image_bytes()
    if size > limit:
        raise TlfeatError(
            f"cannot read a sample of {printable(path)}: {megabytes(size)}, above the limit of {megabytes(limit)} "
            "per image (raise it with TLFEAT_MAX_IMAGE_MB)"
        )
    try:
        with open(path, "rb", opener=_nonblocking) as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise TlfeatError(f"cannot read {printable(path)}: it is {file_kind(mode)}, not a regular file")
            fh.seek(offset)
            data = fh.read(size)
    except OSError as exc:
        raise TlfeatError(f"cannot read {printable(path)}: {exc.strerror or exc}") from exc
    if len(data) != size:
        raise TlfeatError(f"cannot read a sample of {printable(path)}: the file is shorter than its index says")
    return data


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


@lru_cache(maxsize=2)
def _row_group(path: str, group: int, column: str) -> list[Any]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column).to_pylist()


def parquet_bytes(ref: tuple[str, int, int, str]) -> bytes:
    """The image bytes of one Parquet cell: a binary column, or Hugging Face's {"bytes": ...} struct."""
    path, group, row, column = ref
    try:
        value = _row_group(path, group, column)[row]
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise TlfeatError(f"cannot read row {row} of {printable(path)}: {exc}") from exc
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise TlfeatError(f"row {row} of {printable(path)} holds no image bytes in column {column!r}")
    limit = config.max_image_bytes()
    if len(value) > limit:
        raise TlfeatError(
            f"row {row} of {printable(path)}: {megabytes(len(value))} of image bytes, above the limit of "
            f"{megabytes(limit)} per image (raise it with TLFEAT_MAX_IMAGE_MB)"
        )
    return bytes(value)
