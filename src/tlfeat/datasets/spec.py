"""The text of a `--data` value: brace patterns, split mappings, and lists of datasets.

Braces expand as in bash and WebDataset (`{00000..00127}`, `{a,b}`, nested, descending ranges,
steps `{0..10..2}`, letters `{a..e}`),
bounded: a pattern that names more than `MAX_NAMES` files is refused before anything is
expanded. Commas inside braces belong to the pattern, so `'sh/{a,b}.tar'` is one dataset and
`train=sh/{a,b}.tar,test=sh/c.tar` one dataset with two splits.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tlfeat.errors import TlfeatError, printable

MAX_NAMES = 1_000_000  # names one brace pattern may expand to
_RANGE = re.compile(r"(-?\d{1,18})\.\.(-?\d{1,18})(?:\.\.(-?\d{1,18}))?")
_LETTERS = re.compile(r"([a-zA-Z])\.\.([a-zA-Z])(?:\.\.(-?\d{1,18}))?")
_MAPPED = re.compile(r"^\s*(\w+)=")


@dataclass(frozen=True)
class _Range:
    """`{lo..hi}` or `{lo..hi..step}` as bash expands it: numbers (zero-padded to `width`) or letters."""

    lo: int
    hi: int
    width: int
    step: int = 1  # its sign is ignored, as in bash: the direction is lo to hi
    letters: bool = False

    def __len__(self) -> int:
        return abs(self.hi - self.lo) // (abs(self.step) or 1) + 1

    def __iter__(self) -> Iterator[str]:
        step = (abs(self.step) or 1) * (1 if self.hi >= self.lo else -1)
        for i in range(self.lo, self.hi + (1 if step > 0 else -1), step):
            if self.letters:
                yield chr(i)
            elif self.width:
                yield f"-{str(-i).zfill(self.width - 1)}" if i < 0 else str(i).zfill(self.width)
            else:
                yield str(i)


# A parsed pattern: literal text, and groups of alternatives (each a parsed pattern) or ranges.
Parts = list[Any]
MAX_PATTERN = 8192  # characters of one pattern (PATH_MAX is 4096)
MAX_DEPTH = 32  # braces inside braces


def _matches(text: str) -> dict[int, int]:
    """The index of the `}` matching each `{` that has one (one pass)."""
    out, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            out[stack.pop()] = i
    return out


def split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split at each `sep` outside braces."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def _parse(text: str, lo: int, hi: int, match: dict[int, int], depth: int = 0) -> Parts:
    """text[lo:hi] as parts; `match` pairs the braces of the whole text."""
    if depth > MAX_DEPTH:
        raise TlfeatError(f"the pattern {printable(text[:200])} nests braces more than {MAX_DEPTH} deep")
    parts: Parts = []
    literal, i = [], lo
    while i < hi:
        end = match.get(i, -1) if text[i] == "{" else -1
        if end < 0 or end >= hi:
            literal.append(text[i])
            i += 1
            continue
        cuts = _top_commas(text, i + 1, end, match)
        ranged = _RANGE.fullmatch(text, i + 1, end)
        letters = _LETTERS.fullmatch(text, i + 1, end)
        if letters is not None and letters.group(1).islower() != letters.group(2).islower():
            raise TlfeatError(
                f"the pattern {printable(text[:200])}: a letter range goes within one case ({{a..z}} or {{A..Z}})"
            )
        if not cuts and ranged is None and letters is None:  # `{a}` is literal text, as in bash
            literal.append(text[i])
            i += 1
            continue
        if literal:
            parts.append("".join(literal))
            literal = []
        if ranged is not None:
            a, b, step = ranged.group(1), ranged.group(2), int(ranged.group(3) or 1)
            padded = any(len(v.lstrip("-")) > 1 and v.lstrip("-").startswith("0") for v in (a, b))
            parts.append(_Range(int(a), int(b), max(len(a), len(b)) if padded else 0, step))
        elif letters is not None:
            parts.append(_Range(ord(letters.group(1)), ord(letters.group(2)), 0, int(letters.group(3) or 1), True))
        else:
            bounds = [i + 1, *[c + 1 for c in cuts]], [*cuts, end]
            parts.append([_parse(text, s, e, match, depth + 1) for s, e in zip(*bounds, strict=True)])
        i = end + 1
    if literal:
        parts.append("".join(literal))
    return parts


def _top_commas(text: str, lo: int, hi: int, match: dict[int, int]) -> list[int]:
    """Positions of the commas of text[lo:hi] outside inner braces."""
    out, i = [], lo
    while i < hi:
        if text[i] == "{" and i in match and match[i] < hi:
            i = match[i] + 1
            continue
        if text[i] == ",":
            out.append(i)
        i += 1
    return out


def _parsed(pattern: str) -> Parts:
    if len(pattern) > MAX_PATTERN:
        raise TlfeatError(f"a --data pattern of {len(pattern):,} characters is longer than {MAX_PATTERN:,}")
    return _parse(pattern, 0, len(pattern), _matches(pattern))


def _count(parts: Parts) -> int:
    total = 1
    for part in parts:
        if isinstance(part, str):
            continue
        total *= len(part) if isinstance(part, _Range) else sum(_count(p) for p in part)
    return total


def _expand(parts: Parts) -> list[str]:
    options: list[list[str]] = []
    for part in parts:
        if isinstance(part, str):
            options.append([part])
        elif isinstance(part, _Range):
            options.append(list(part))
        else:
            options.append([text for choice in part for text in _expand(choice)])
    return ["".join(combo) for combo in itertools.product(*options)]


def count(pattern: str) -> int:
    """How many names `pattern` expands to, computed without expanding it."""
    return _count(_parsed(pattern))


def braceexpand(pattern: str, limit: int = MAX_NAMES) -> list[str]:
    """`a{00..02}b` -> a00b a01b a02b; `{x,y}` -> x y; nested and repeated braces too.

    A pattern naming more than `limit` names is refused (one line) before any is made.
    """
    parts = _parsed(pattern)
    n = _count(parts)
    if n > limit:
        raise TlfeatError(
            f"the pattern {printable(pattern[:200])} expands to {n:,} names, more than {limit:,}; "
            "use fewer or narrower brace ranges (or a glob such as shards/*.tar)"
        )
    return _expand(parts)


def parts(data: str) -> dict[str, str]:
    """A shard spec's patterns by split: {"": pattern} for one pattern, else {"train": ..., "test": ...}."""
    text = data.strip()
    if not _MAPPED.match(text):
        return {"": text} if text else {}
    out: dict[str, str] = {}
    for piece in _mapping_pieces(text):
        split, _, pattern = piece.partition("=")
        split = split.strip()
        if split in out:
            raise TlfeatError(f"--data {printable(text[:200])} names split {split!r} twice")
        out[split] = pattern.strip()
    return out


def _mapping_pieces(text: str) -> list[str]:
    """`train=a,b,test=c` -> ["train=a,b", "test=c"]: a piece without `split=` continues the one before."""
    pieces: list[str] = []
    for piece in (p for chunk in split_top(text, ";") for p in split_top(chunk)):
        if _MAPPED.match(piece) or not pieces:
            pieces.append(piece)
        else:
            pieces[-1] += "," + piece
    return pieces


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated list of datasets, where a pattern keeps its braces and a split mapping
    (`train=...,test=...`) stays one dataset; a split named again starts the next mapping."""
    out: list[str] = []
    current: list[str] = []  # the pieces of the mapping being read
    names: set[str] = set()
    for piece in (p.strip() for p in split_top(value)):
        if not piece:
            continue
        mapped = None if _is_path(piece) else _MAPPED.match(piece)  # a folder named `a=b` is a folder
        if mapped and (not current or mapped.group(1) not in names):
            current.append(piece)
            names.add(mapped.group(1))
            continue
        if current:
            out.append(",".join(current))
            current, names = [], set()
        if mapped:
            current, names = [piece], {mapped.group(1)}
        else:
            out.append(piece)
    if current:
        out.append(",".join(current))
    return tuple(out)


def _is_path(text: str) -> bool:
    try:
        return os.path.exists(os.path.expanduser(text))
    except (OSError, ValueError):
        return False
