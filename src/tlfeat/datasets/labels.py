"""Class labels read from files (a tar shard's `.cls` member, a Parquet column), checked by type and value.

A label is an integer or a short line of text. Text that is a whole number is that number (`"7"`
and `7` are one class, as WebDataset writes them); a float, or text that spells one (`"1.0"`,
`"nan"`), is taken only when it is a whole number (`1.0`, as pandas writes an integer column with
gaps), so `"1"` and `"1.0"` are one class. The same rules hold for tar and Parquet labels. NaN, infinities, fractions, nested
values, bytes that are not UTF-8, control characters and absurdly long labels are one error line
naming the sample, never a class.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from tlfeat.errors import TlfeatError, printable

MAX_LABEL = 256  # characters of a text label (and bytes of a `.cls` member, times 4)
_INTEGER = re.compile(r"-?\d{1,30}")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", re.IGNORECASE)


def _shown(value: Any) -> str:
    text = repr(value)
    return printable(text if len(text) <= 60 else text[:57] + "...")


def class_label(value: Any, where: str) -> int | str:
    """`value` as a class label (an int or a str), or TlfeatError naming `where` and what is wrong."""
    fix = "every sample needs one class label: an integer or a short line of text"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        if len(str(abs(value))) > 30:
            raise TlfeatError(f"{where}: label {_shown(value)} has more than 30 digits; {fix}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TlfeatError(f"{where}: label is {value}; {fix}")
        if not value.is_integer():
            raise TlfeatError(f"{where}: label {value!r} is a fraction, not a class; {fix}")
        return class_label(int(value), where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) > 4 * MAX_LABEL:
            raise TlfeatError(f"{where}: label of {len(raw):,} bytes is longer than {MAX_LABEL} characters; {fix}")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TlfeatError(f"{where}: label {_shown(raw)} is not UTF-8 text; {fix}") from exc
    if not isinstance(value, str):
        raise TlfeatError(f"{where}: label {_shown(value)} is a {type(value).__name__}; {fix}")
    text = value.strip()
    if not text:
        raise TlfeatError(f"{where}: label is empty; {fix}")
    if len(text) > MAX_LABEL:
        raise TlfeatError(f"{where}: label of {len(text):,} characters is longer than {MAX_LABEL}; {fix}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise TlfeatError(f"{where}: label {_shown(text)} holds control characters; {fix}")
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):  # "1.0", "nan", "inf" as text: the same rules as a float label
        return class_label(float(text), where)
    return text


def class_names(values: list[int | str]) -> list[str]:
    """The sorted class names of checked labels: numbers in numeric order, then text."""
    unique = sorted(set(values), key=lambda v: (isinstance(v, str), v if isinstance(v, int) else 0, str(v)))
    return [str(v) for v in unique]
