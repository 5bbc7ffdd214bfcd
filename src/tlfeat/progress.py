"""Progress bars on stderr (tqdm), one helper for extraction, training and comparisons."""

from __future__ import annotations

from typing import Any


def bar(enabled: bool, total: int, desc: str, unit: str = "img", **kw: Any) -> Any:
    """A tqdm bar that disappears when done; `enabled=False` (-q) shows nothing."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False, file=sys.stderr, **kw
    )
