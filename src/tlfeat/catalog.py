"""The cache folder as a catalogue: every file with its state (ok, partial, damaged, set aside), and
finding the one set a request names among several variants."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlfeat.cache import DAMAGED, PARTIAL, SUFFIX, check, read_attrs
from tlfeat.errors import CacheDamaged, CacheMismatch
from tlfeat.images import file_kind


@dataclass(frozen=True)
class Entry:
    """One cache file as `tlfeat ls` shows it."""

    path: Path
    attrs: dict[str, Any]
    status: str  # "ok", "partial", "damaged", "set aside" (and "stale", once compared with the dataset)
    problem: str = ""


MANIFEST = "manifest.json"
RESUME = "run the same `tlfeat extract` again to finish it"  # the problem of every healthy partial set
SHOWN = ("model", "dataset", "split", "layer", "weights_id", "pretrained", "image_size", "limit", "backend")


def read_manifest(partial: Path) -> dict[str, Any] | None:
    """A `.partial` folder's manifest, or None when it is missing, unreadable or not a JSON object."""
    if not (partial / MANIFEST).is_file():  # missing, or a FIFO that would be waited on
        return None
    try:
        value = json.loads((partial / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _in_progress(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What `ls` shows of a run in progress, from its manifest; None when the manifest is malformed."""
    attrs = manifest.get("attrs", {})
    if not isinstance(attrs, dict) or not isinstance(manifest.get("key", ""), str):
        return None
    plain = (str, int, float, bool)
    checked = {**attrs, **manifest}.items()
    if any(not isinstance(v, plain) for k, v in checked if k in SHOWN or k in ("n_images", "format", "listing")):
        return None
    own = ("key", "n_images", "format", "listing")
    return {**{k: v for k, v in attrs.items() if k in SHOWN}, **{k: manifest[k] for k in own if k in manifest}}


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
    file) is not listed: the next `extract` removes it. An entry that cannot be read (a malformed
    manifest, a link loop, something that is not a file) is one entry with its problem; the
    others are listed as usual.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    entries = []
    for path in sorted(cache_dir.glob(f"*{SUFFIX}*")):
        entry = _entry(path, verify)
        if entry is not None:
            entries.append(entry)
    entries.sort(key=lambda e: str(e.attrs.get("created", "")), reverse=True)
    return entries


def _entry(path: Path, verify: bool) -> Entry | None:
    """The catalogue entry of one name in the cache folder, or None when it is no cache file."""
    name = path.name
    kinds = [name.endswith(SUFFIX), name.endswith(SUFFIX + PARTIAL), DAMAGED in name]
    if not any(kinds):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return Entry(path, key_attrs(name), "damaged", f"{path} cannot be read ({exc.strerror or exc}); move it away")
    if kinds[1]:  # a run in progress; a file of that name is a tlfeat 0.1 partial file, which extract removes
        return _partial(path) if stat.S_ISDIR(mode) else None
    if not stat.S_ISREG(mode):
        return Entry(path, key_attrs(name), "damaged", f"{path} is {file_kind(mode)}, not a cache file; move it away")
    if kinds[0]:
        try:
            return Entry(path, check(path, verify=verify), "ok")
        except CacheDamaged as exc:
            return Entry(path, _attrs_or_empty(path), "damaged", str(exc))
    if kinds[2]:
        return Entry(path, _attrs_or_empty(path), "set aside", "damaged; extract rebuilt or will rebuild it")
    return None


def _partial(path: Path) -> Entry | None:
    name = path.name
    manifest = read_manifest(path)
    shown = _in_progress(manifest) if manifest is not None else None
    final = path.with_name(name[: -len(PARTIAL)])
    if shown is not None and final.is_file() and _finished(final, shown):
        return None
    try:
        done = finished_rows(path)
    except OSError:
        done = 0
    attrs = {**key_attrs(name), **(shown or {}), "n_done": done}
    if shown is None:
        problem = f"its {MANIFEST} is missing or malformed; the next `tlfeat extract` of this set starts it over"
    else:
        problem = RESUME
    return Entry(path, attrs, "partial", problem)


def _finished(final: Path, manifest: dict[str, Any]) -> bool:
    try:
        attrs = read_attrs(final)
    except Exception:  # noqa: BLE001 - h5py raises several types for a damaged file: then it is not finished
        return False
    return attrs.get("key") == manifest.get("key") and attrs.get("listing_sha256") == manifest.get("listing")


def _attrs_or_empty(path: Path) -> dict[str, Any]:
    try:
        return {**key_attrs(path.name), **read_attrs(path)}
    except Exception:  # noqa: BLE001 - h5py raises several types for a damaged file
        return key_attrs(path.name)


def key_attrs(name: str) -> dict[str, Any]:
    """model, dataset slug and split from a cache file name, for files whose attributes are unreadable."""
    parts = name.split(SUFFIX)[0].split("__")
    return dict(zip(("model", "dataset", "split"), parts[:3], strict=False))


# Options that narrow down which cached set to load, and their attribute names.
SELECTORS = ("layer", "pooling", "weights_id", "image_size", "limit", "subset_seed", "backend")


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
            f"run `{extract_command(model, dataset_id, split, selectors)}` first"
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
            f"{', '.join(f'{_option(k, split)}={_shown({k: v}, k)}' for k, v in wanted.items())}; stored: {describe}; "
            f"`{extract_command(model, dataset_id, split, selectors)}` makes them"
        )
    differ = {k: sorted({_shown(e.attrs, k) for e in matching}) for k in SELECTORS}
    choices = ", and ".join(
        " or ".join(f"{_option(k, split)}={v}" for v in values) for k, values in differ.items() if len(values) > 1
    )
    raise CacheMismatch(
        f"{len(matching)} cached feature sets match {model}/{dataset_id}/{split}; add "
        f"{choices or 'a selector'} to pick one (stored: {'; '.join(describe_variant(e.attrs) for e in matching)})"
    )


def extract_command(model: str, dataset_id: str, split: str, selectors: dict[str, Any]) -> str:
    """The `tlfeat extract` command that makes the features asked for: random weights as MODEL:untrained,
    and the selectors given as its options (weights from a file, and pooling, are left to the user)."""
    import shlex

    from tlfeat.backbones.base import PENULTIMATE, UNTRAINED

    wid = str(selectors.get("weights_id") or "")
    spec = model
    options = []
    if wid.startswith(UNTRAINED + ":"):
        spec = model if model.endswith(":" + UNTRAINED) else f"{model}:{UNTRAINED}"
    elif wid and not wid.startswith("file:"):
        options += ["--weights-id", wid]
    if selectors.get("layer") not in (None, PENULTIMATE):
        options += ["--layer", str(selectors["layer"])]
    if selectors.get("image_size") is not None:
        options += ["--image-size", str(selectors["image_size"])]
    if selectors.get("limit") is not None:
        options += ["--limit" if split == "train" else "--test-limit", str(selectors["limit"])]
    if selectors.get("subset_seed") is not None:
        options += ["--subset-seed", str(selectors["subset_seed"])]
    if selectors.get("backend") is not None:
        options += ["--backend", str(selectors["backend"])]
    return shlex.join(["tlfeat", "extract", "--model", spec, "--data", dataset_id, *options])


def _shown(attrs: dict[str, Any], key: str) -> str:
    """A selector's value as a user writes it: no limit (stored as 0) is `None`."""
    value = attrs.get(key)
    if value in (None, "") or (key == "limit" and value == 0):
        return "None"
    return str(value)


def _option(key: str, split: Any) -> str:
    """A selector's name as the user gives it: an evaluation split's `limit` is its --test-limit."""
    return "test_limit" if key == "limit" and split not in (None, "train") else key


def describe_variant(attrs: dict[str, Any]) -> str:
    return ", ".join(f"{_option(k, attrs.get('split'))}={_shown(attrs, k)}" for k in SELECTORS)


def _same(stored: Any, wanted: Any) -> bool:
    if stored in ("", None):
        stored = None
    return stored == wanted or str(stored) == str(wanted)
