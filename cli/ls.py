"""`tlfeat ls`: cached feature sets with their provenance: ok, STALE, partial, DAMAGED."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tlfeat.config import ExtractConfig
from tlfeat_cli.main import user_errors
from tlfeat_cli.options import from_config, json_option, table


@click.command("ls")
@json_option
@click.option(
    "--quick", is_flag=True, help="Skip checksums and the comparison with the images (structure is still checked)."
)
@click.option("--skipped", "show_skipped", is_flag=True, help="List the images each set skipped (--on-error skip).")
@from_config(ExtractConfig, "verify_content", "cache_dir", "data_dir")
@user_errors()
def command(as_json: bool, quick: bool, show_skipped: bool, **options: Any) -> None:
    """List cached feature sets with their provenance; stale and damaged ones are marked.

    A set is STALE when its images changed since it was extracted (the same `extract` updates it).
    """
    from tlfeat import catalog, config, freshness
    from tlfeat.errors import printable

    cache_dir = options["cache_dir"] or config.default_cache_dir()
    entries = catalog.scan(cache_dir, verify=not quick)
    states = {}
    if not quick:
        for e in entries:
            if e.status == "ok":
                states[e.path] = freshness.status(e, options["data_dir"], bool(options["verify_content"]))
    skipped = {e.path: _skipped(e.path) for e in entries if e.status == "ok" and e.attrs.get("n_skipped")}
    if as_json:
        out = []
        for e in entries:
            f = states.get(e.path)
            changes = f.changes if f else None
            out.append(
                {
                    "path": str(e.path),
                    "status": "stale" if f and f.state == "stale" else e.status,
                    "problem": e.problem,
                    "changes": changes.summary() if changes else "",
                    **e.attrs,
                    "skipped": skipped.get(e.path, []),
                }
            )
        click.echo(json.dumps(out, indent=2, default=str))
        return
    if not entries:
        click.echo(f"no cached features in {cache_dir}; run `tlfeat extract --model mobilenet_v2 --data digits`")
        return
    from tlfeat.datasets import display_names

    names = display_names(str(e.attrs.get("dataset", "?")) for e in entries)  # two folders named "data" are two
    rows = [_row(e, states.get(e.path), names) for e in entries]
    header = [
        "model",
        "dataset",
        "split",
        "images",
        "skipped",
        "layer",
        "weights",
        "size",
        "backend",
        "limit",
        "status",
        "MB",
        "created",
        "file",
    ]
    click.echo(table(rows, header))
    for e in entries:
        if e.status == "damaged":
            click.echo(f"DAMAGED: {e.problem}")
        elif e.status == "partial" and e.problem != catalog.RESUME:
            click.echo(f"partial: {e.path.name}: {e.problem}")
    for path, state in states.items():
        if state.state == "stale" and state.changes is not None:
            click.echo(f"STALE: {path.name}: {state.changes.summary()}; run the same `tlfeat extract` to update it")
    if show_skipped:
        for path, items in skipped.items():
            click.echo(f"{path.name}: {len(items)} skipped")
            for item in items:
                click.echo(f"  {printable(item['id'])}: {printable(item['error'])}")


def _row(e: Any, state: Any, names: dict[str, str]) -> list[Any]:
    a = e.attrs
    wid = str(a.get("weights_id", "?"))
    status = e.status.upper() if e.status == "damaged" else e.status
    if state is not None:
        status = state.describe()
    return [
        a.get("model", "?"),
        names[str(a.get("dataset", "?"))],
        a.get("split", "?"),
        a.get("n_done", "?") if e.status != "ok" else a.get("n_images", "?"),
        a.get("n_skipped") or "-",
        a.get("layer", "?"),
        wid if a.get("pretrained", True) else f"{wid} (UNTRAINED)",
        a.get("image_size", "?"),
        a.get("backend", "?"),
        a.get("limit") or "-",
        status,
        f"{_size(e.path) / 1e6:.1f}",
        str(a.get("created", ""))[:19],
        e.path.name,
    ]


def _skipped(path: Path) -> list[dict[str, str]]:
    """The skipped images of a set, read from its index (never its features)."""
    from tlfeat import cache

    try:
        index = cache.stored_index(path)
    except (OSError, KeyError, ValueError):
        return []
    return [
        {"id": index.ids[i], "error": e} for i, e in zip(index.skipped_index.tolist(), index.skipped_error, strict=True)
    ]


def _size(path: Path) -> int:
    """Bytes on disk of a file or a `.partial` folder (0 where it cannot be read)."""
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return path.stat().st_size
    except OSError:
        return 0
