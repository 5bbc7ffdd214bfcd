"""Progress bars on stderr (tqdm), one helper for extraction, training and comparisons; and status
lines for waits that have no bar (a download, an export, a search), so no wait over a few seconds is
silent. Status lines go to the `tlfeat.status` logger: the CLI shows them, `-q` hides them."""

from __future__ import annotations

import logging
from typing import Any

STATUS = logging.getLogger("tlfeat.status")


def status(message: str) -> None:
    """Say what a wait of more than a couple of seconds is doing (the CLI prints it on stderr)."""
    STATUS.info(message)


def bar(enabled: bool, total: int, desc: str, unit: str = "img", **kw: Any) -> Any:
    """A tqdm bar that disappears when done; `enabled=False` (-q) shows nothing."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False, file=sys.stderr, **kw
    )
