"""`tlfeat models`: every backbone, its feature dimension and whether its weights are here."""

from __future__ import annotations

import json

import click

from tlfeat_cli.main import user_errors
from tlfeat_cli.options import json_option, table


@click.command("models")
@click.option("--all", "show_all", is_flag=True, help="Every torchvision classifier, not only the studied ones.")
@click.option("--layers", "layers_of", metavar="MODEL", help="List the layer names MODEL accepts for --layer.")
@click.option("--nodes", is_flag=True, help="With --layers: every graph node, not only the named blocks.")
@json_option
@user_errors()
def command(show_all: bool, layers_of: str | None, nodes: bool, as_json: bool) -> None:
    """List backbones: feature dim, layer used, weights entry, weights found locally."""
    from tlfeat import backbones, modelinfo, weights

    if layers_of:
        model = backbones.build(layers_of, device="meta")
        names = backbones.graph_nodes(model) if nodes else backbones.layer_names(model)
        click.echo(json.dumps(names) if as_json else "\n".join(names))
        return
    rows = []
    for name in backbones.available_models() if show_all else backbones.STUDIED:
        fam = backbones.family(name)
        wid = backbones.default_weights_id(name)
        path, source = weights.locate(name, wid, verify=True)
        if path is not None:
            local = source
        elif source.startswith("registry:"):
            local = f"{source} (fetched on first use)"
        elif source.startswith("corrupt"):
            local = source
        else:
            local = "no (download, --weights FILE or --untrained)"
        dim = modelinfo.models()[name].feature_dim
        rows.append(
            {
                "model": name,
                "feature_dim": dim,
                "layer": f"input of {fam.head}",
                "weights_id": wid,
                "weights_local": local,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(table([list(r.values()) for r in rows], ["model", "dim", "layer", "weights", "weights found locally"]))
    if not show_all:
        click.echo(f"\n{len(backbones.available_models())} models in all: `tlfeat models --all`.")
