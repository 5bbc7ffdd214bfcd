"""The cache folder as a catalogue: every file with its state (ok, partial, damaged, set aside), and
finding the one set a request names among several variants."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlfeat.cache import DAMAGED, PARTIAL, SUFFIX, check, read_attrs
from tlfeat.errors import CacheDamaged, CacheMismatch


@dataclass(frozen=True)
class Entry:
    """One cache file as `tlfeat ls` shows it."""

    path: Path
    attrs: dict[str, Any]
    status: str  # "ok", "partial", "damaged", "set aside" (and "stale", once compared with the dataset)
    problem: str = ""


MANIFEST = "manifest.json"
SHOWN = ("model", "dataset", "split", "layer", "weights_id", "pretrained", "image_size", "limit", "backend")


def read_manifest(partial: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((partial / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def finished_rows(partial: Path) -> int:
    """How many rows the contiguous run of whole blocks from row 0 covers."""
    row, found = 0, {}
    for path in partial.glob("*.npz"):
        try:
            start, stop = (int(x) for x in path.stem.split("-"))
        except ValueError:
            continue
        found[start] = stop
    while row in found:
        row = found[row]
    return row


def scan(cache_dir: Path, verify: bool = False) -> list[Entry]:
    """Every cache file (complete, partial or damaged) under `cache_dir`, newest first.

    A `.partial` folder left by a run killed after its file was complete (same index as the
    file) is not listed: the next `extract` removes it.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    entries = []
    for path in sorted(cache_dir.glob(f"*{SUFFIX}*")):
        name = path.name
        if name.endswith(SUFFIX):
            try:
                entries.append(Entry(path, check(path, verify=verify), "ok"))
            except CacheDamaged as exc:
                entries.append(Entry(path, _attrs_or_empty(path), "damaged", str(exc)))
        elif name.endswith(SUFFIX + PARTIAL) and path.is_dir():
            manifest = read_manifest(path) or {}
            final = path.with_name(name[: -len(PARTIAL)])
            if final.is_file() and _finished(final, manifest):
                continue
            attrs = {**key_attrs(name), **manifest.pop("attrs", {}), **manifest, "n_done": finished_rows(path)}
            problem = "run the same `tlfeat extract` again to finish it"
            entries.append(Entry(path, attrs, "partial", problem))
        elif DAMAGED in name and path.is_file():
            entries.append(
                Entry(path, _attrs_or_empty(path), "set aside", "damaged; extract rebuilt or will rebuild it")
            )
    entries.sort(key=lambda e: str(e.attrs.get("created", "")), reverse=True)
    return entries


def _finished(final: Path, manifest: dict[str, Any]) -> bool:
    try:
        attrs = read_attrs(final)
    except OSError:
        return False
    return attrs.get("key") == manifest.get("key") and attrs.get("listing_sha256") == manifest.get("listing")


def _attrs_or_empty(path: Path) -> dict[str, Any]:
    try:
        return {**key_attrs(path.name), **read_attrs(path)}
    except OSError:
        return key_attrs(path.name)


def key_attrs(name: str) -> dict[str, Any]:
    """model, dataset slug and split from a cache file name, for files whose attributes are unreadable."""
    parts = name.split(SUFFIX)[0].split("__")
    return dict(zip(("model", "dataset", "split"), parts[:3], strict=False))


# Options that narrow down which cached set to load, and their attribute names.
SELECTORS = ("layer", "weights_id", "image_size", "limit", "subset_seed", "backend")


def matches(attrs: dict[str, Any], **selectors: Any) -> bool:
    return all(_same(attrs.get(k), v) for k, v in selectors.items() if v is not None)


def find(
    cache_dir: Path, model: str, dataset_id: str, split: str, prefer: dict[str, Any] | None = None, **selectors: Any
) -> Path:
    """The one complete cache file matching (model, dataset, split) and any given selectors.

    Where several match, `prefer` (the defaults of the selectors not given: the weights' own image
    size, no limit...) picks the one `tlfeat extract` makes without options, if it is among them.
    """
    entries = scan(cache_dir)
    candidates = [
        e
        for e in entries
        if e.status == "ok"
        and e.attrs.get("model") == model
        and e.attrs.get("dataset") == dataset_id
        and e.attrs.get("split") == split
    ]
    from tlfeat.backbones.base import slug
    from tlfeat.datasets import dataset_slug

    prefix = f"{slug(model)}__{dataset_slug(dataset_id)}__{split}__"
    damaged = [e for e in entries if e.status == "damaged" and e.path.name.startswith(prefix)]
    if not candidates and damaged:
        raise CacheDamaged(damaged[0].problem)
    if not candidates:
        raise CacheMismatch(
            f"no cached features for model {model!r}, dataset {dataset_id!r}, split {split!r} in {cache_dir}; "
            f"run `tlfeat extract --model {model} --data {dataset_id}` first"
        )
    wanted = {k: v for k, v in selectors.items() if v is not None}
    matching = [e for e in candidates if matches(e.attrs, **wanted)]
    defaults = {"limit": None, **(prefer or {})}  # no limit asked: the whole split, where cached
    for key, value in defaults.items():  # each default not asked for narrows, where some variant has it
        usual = [e for e in matching if _shown(e.attrs, key) == _shown({key: value}, key)]
        if key not in wanted and len(matching) > 1 and usual:
            matching = usual
    if len(matching) == 1:
        return matching[0].path
    if not matching:
        describe = "; ".join(describe_variant(e.attrs) for e in candidates)
        raise CacheMismatch(
            f"cached features for {model}/{dataset_id}/{split} exist but none has "
            f"{', '.join(f'{k}={_shown({k: v}, k)}' for k, v in wanted.items())}; stored: {describe}"
        )
    differ = {k: sorted({_shown(e.attrs, k) for e in matching}) for k in SELECTORS}
    choices = ", and ".join(" or ".join(f"{k}={v}" for v in values) for k, values in differ.items() if len(values) > 1)
    raise CacheMismatch(
        f"{len(matching)} cached feature sets match {model}/{dataset_id}/{split}; add "
        f"{choices or 'a selector'} to pick one (stored: {'; '.join(describe_variant(e.attrs) for e in matching)})"
    )


def _shown(attrs: dict[str, Any], key: str) -> str:
    """A selector's value as a user writes it: no limit (stored as 0) is `None`."""
    value = attrs.get(key)
    if value in (None, "") or (key == "limit" and value == 0):
        return "None"
    return str(value)


def describe_variant(attrs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_shown(attrs, k)}" for k in SELECTORS)


def _same(stored: Any, wanted: Any) -> bool:
    if stored in ("", None):
        stored = None
    return stored == wanted or str(stored) == str(wanted)
