"""`tlfeat models`: the backbones of each source, their feature dimension and whether their weights are here."""

from __future__ import annotations

import fnmatch
import json

import click

from tlfeat_cli.main import user_errors
from tlfeat_cli.options import json_option, table

DETAILED = 40  # a listing this long or shorter shows each model's weights (more would read every config)


@click.command("models")
@click.option("--all", "show_all", is_flag=True, help="Every torchvision classifier, not only the studied ones.")
@click.option(
    "--source",
    "source_name",
    default="torchvision",
    show_default=True,
    help="torchvision, timm, open_clip, hf (models in the Hugging Face cache) or custom.",
)
@click.option("--filter", "pattern", metavar="PATTERN", help="Only names matching PATTERN (a substring or a glob).")
@click.option("--layers", "layers_of", metavar="MODEL", help="List the layer names MODEL accepts for --layer.")
@click.option("--nodes", is_flag=True, help="With --layers: every graph node, not only the named blocks.")
@json_option
@user_errors()
def command(
    show_all: bool, source_name: str, pattern: str | None, layers_of: str | None, nodes: bool, as_json: bool
) -> None:
    """List backbones: feature dim, layer used, weights entry, weights found locally."""
    from tlfeat import backbones

    if layers_of:
        names = backbones.resolve(layers_of).layer_names(nodes=nodes)
        click.echo(json.dumps(names) if as_json else "\n".join(names))
        return
    src = backbones.source(source_name)
    if src.prefix == "custom":
        click.echo(
            "custom models are not listed: name one as custom:MODULE:FUNCTION, a function of an importable "
            "module returning (model, preprocessing dict), e.g. custom:mypackage.models:make (see the README)."
        )
        return
    if src.prefix == "torchvision":
        names = list(backbones.available_models() if show_all or pattern else backbones.STUDIED)
    else:
        src.require()
        names = [src.spell(n) for n in src.names()]
    if pattern:
        glob = any(c in pattern for c in "*?[")
        names = [n for n in names if (fnmatch.fnmatch(n, pattern) if glob else pattern.lower() in n.lower())]
    if not names:
        if as_json:
            click.echo("[]")
            return
        click.echo(_none_found(src.prefix, pattern))
        return
    rows = [_row(name) for name in names] if len(names) <= DETAILED or src.prefix == "torchvision" else []
    if as_json:
        click.echo(json.dumps(rows or [{"model": n} for n in names], indent=2))
        return
    if rows:
        header = ["model", "dim", "layer", "weights", "weights found locally"]
        click.echo(table([list(r.values()) for r in rows], header))
    else:
        click.echo("\n".join(names))
        click.echo(f"\n{len(names)} models; narrow them with --filter PATTERN to see each one's weights.")
    if src.prefix == "torchvision":
        if not show_all and not pattern:
            click.echo(f"\n{len(backbones.available_models())} models in all: `tlfeat models --all`.")
        click.echo(f"table: {backbones.models_origin()}")
        others = ", ".join(p for p in backbones.SOURCES if p != "torchvision")
        click.echo(f"other sources: {others} (`tlfeat models --source timm --filter convnext`).")


def _none_found(prefix: str, pattern: str | None) -> str:
    """The one line `tlfeat models` prints when nothing is listed."""
    from tlfeat import config

    matching = f" matching {pattern!r}" if pattern else ""
    if prefix == "hf":
        return (
            f"no hf models{matching} in the Hugging Face cache at {config.hf_hub_cache()}; name a hub id "
            "(hf:ORG/NAME, fetched once with internet) or a folder written by save_pretrained (hf:PATH)."
        )
    return f"no {prefix} models{matching}; a substring or a glob (*, ?, [abc]) matches names."


def _row(name: str) -> dict[str, object]:
    from tlfeat import backbones, weights

    bb = backbones.resolve(name)
    wid = bb.default_weights
    path, source = weights.locate(name, wid, verify=True)
    if path is not None:
        local = source
    elif source.startswith("registry:"):
        local = f"{source} (fetched on first use)"
    elif source.startswith("corrupt"):
        local = source
    else:
        local = "no (download, --weights FILE or --untrained)"
    if bb.source.prefix == "torchvision":
        layer = f"input of {backbones.family(name).head}"
    else:
        layer = f"{backbones.PENULTIMATE} ({bb.pooling()})"
    dim = backbones.feature_dims(name, [None])[0] if bb.source.prefix == "torchvision" or bb.info.feature_dim else "?"
    return {"model": name, "feature_dim": dim, "layer": layer, "weights_id": wid, "weights_local": local}
