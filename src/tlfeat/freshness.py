"""Do cached features still describe the images they were made from?

`status` lists the dataset a cache file came from as it is now and compares it with the file's
fingerprints (see `fingerprint.compare`). A set whose images changed is STALE: `tlfeat ls` says
so, `fit` refuses it (naming the fix), `extract` updates it. A set whose images are gone (deleted
after extraction, a dataset on another machine) is not stale: there is nothing to compare with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlfeat import catalog, datasets, fingerprint
from tlfeat.errors import StaleFeatures, TlfeatError, printable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Freshness:
    state: str  # "fresh", "stale", "unknown" (the images are not here to compare)
    changes: fingerprint.Changes | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.state == "stale" and self.changes is not None:
            return f"STALE: {self.changes.summary()}"
        if self.state == "unknown":
            return f"ok (images not found: {self.reason})"
        return "ok"


def _missing_sources(attrs: dict[str, Any]) -> str | None:
    """Why the images cannot be compared now, or None when they are here."""
    dataset = str(attrs.get("dataset", ""))
    try:
        files = json.loads(str(attrs.get("source_files") or "[]"))
    except ValueError:
        files = []
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        return f"{printable(missing[0])} is gone"
    if dataset.startswith("/") and not Path(dataset).is_dir():
        return f"{printable(dataset)} is gone"
    return None


def status(entry: catalog.Entry, data_dir: Path | None = None, verify_content: bool = False) -> Freshness:
    """How the cache file of `entry` compares with its images now."""
    attrs = entry.attrs
    gone = _missing_sources(attrs)
    if gone is not None:
        return Freshness("unknown", reason=gone)
    split = str(attrs.get("split"))
    try:
        images = datasets.load_split(
            datasets.data_of(str(attrs["dataset"])),
            split,
            data_dir or (Path(attrs["data_dir"]) if attrs.get("data_dir") else None),
            int(attrs.get("limit") or 0) or None,
            subset_seed=int(attrs.get("subset_seed") or 0),
            label_field=str(attrs.get("label_field") or "cls"),
        )
    except (TlfeatError, KeyError, ValueError) as exc:
        return Freshness("unknown", reason=str(exc).split(";")[0])
    changes = fingerprint.compare_file(entry.path, attrs, images, verify_content)
    return Freshness("stale", changes) if changes.stale else Freshness("fresh")


def require_fresh(
    entries: list[catalog.Entry], data_dir: Path | None = None, allow_stale_hint: str | None = "--allow-stale"
) -> None:
    """Raise StaleFeatures for the first entry whose images changed since it was extracted, naming the exact
    `tlfeat extract` command that updates it (and `allow_stale_hint`, where the caller has such an option)."""
    from tlfeat.extraction import extract_command

    seen: set[Path] = set()
    for entry in entries:
        if entry.path in seen:
            continue
        seen.add(entry.path)
        found = status(entry, data_dir)
        if found.state == "stale" and found.changes is not None:
            command = extract_command(entry.attrs, str(entry.attrs.get("split")), cache_dir=entry.path.parent)
            raise StaleFeatures(
                f"the images behind {entry.path.name} changed since it was extracted ({found.changes.summary()}); "
                f"run `{command}` to update the features"
                + (f" (or pass {allow_stale_hint})" if allow_stale_hint else "")
            )
