"""The one error type users see.

Every mistake a user can make (unknown model, missing data, mismatched cache...) raises
`TlfeatError` with one line that says what is wrong and how to fix it. The CLI prints that line
and exits with code 2; Python callers catch it like any other exception.
"""

from __future__ import annotations


class TlfeatError(Exception):
    """A user-facing error: one line, what is wrong and how to fix it."""

    exit_code = 2


class WeightsNotFound(TlfeatError):
    """No pretrained weights file could be found or fetched."""


class ExportFailed(TlfeatError):
    """torch.onnx cannot export this network (an operator it lacks); it runs on torch instead."""


class DatasetNotFound(TlfeatError):
    """A named dataset is not on disk and could not be fetched."""


class CacheMismatch(TlfeatError):
    """A cache file disagrees with what was asked for."""


class CacheDamaged(TlfeatError):
    """A cache file is truncated, edited, incomplete or from an older tlfeat; `extract` rebuilds it."""


class StaleFeatures(TlfeatError):
    """The images a cache file was made from have changed since; `extract` updates it."""


class TooFewClasses(TlfeatError):
    """Training features with fewer than two classes: no classifier can be fitted on them."""


class WriteFailed(TlfeatError):
    """The disk is full or the destination is not writable; nothing complete was touched."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error message (the type's name when there is none)."""
    text = exc if isinstance(exc, str) else str(exc)
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:limit]
    return "" if isinstance(exc, str) else type(exc).__name__


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: "\\t"}


def printable(text: str) -> str:
    """`text` safe to print on any terminal, on one line: the bytes of a file name that are not UTF-8
    as `\\xe9`, control characters (a newline in a folder name) as escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # a name read from the file system: its own bytes
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROL)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def formula_safe(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: a string starting like a formula gets a leading quote."""
    return "'" + text if text.startswith(_FORMULA) else text
