"""`tlfeat analyze`: representation analyses of cached features, and what each layer of a network sees."""

from __future__ import annotations

from typing import Any

import click

from tlfeat.config import AnalyzeConfig, LayerViewConfig
from tlfeat_cli.main import OneLineGroup, user_errors
from tlfeat_cli.options import from_config, given

SELECTORS = ("weights_id", "image_size", "limit", "test_limit", "subset_seed", "cache_dir")
COMMON = ("models", "data", "layers", "split", "images", "seed", "out")


@click.group("analyze", cls=OneLineGroup)
def command() -> None:
    """Analyses of cached features: cka, rsa, embed, neighbours; and layers (filters and activation maps).

    \b
    tlfeat analyze cka --model mobilenet_v2 --data digits --layers features.6,features.13,penultimate --out an/
    tlfeat analyze rsa --model mobilenet_v2,resnet18:untrained --data digits --layers penultimate --out an/
    tlfeat analyze embed --model mobilenet_v2 --data digits --layers features.13,penultimate --out an/
    tlfeat analyze neighbours --model mobilenet_v2 --data digits --out an/
    tlfeat analyze layers --model vgg16 --image photo.jpg --out an/
    """


def _written(entries: Any) -> None:
    for entry in entries if isinstance(entries, list) else [entries]:
        click.echo(f"{entry['png']}  {entry['csv']}  ({entry['note']})")


@command.command("cka")
@from_config(AnalyzeConfig, *COMMON, "kernel", "debiased", "threshold", *SELECTORS)
@user_errors()
def cka(**options: Any) -> None:
    """CKA between every two (model, layer) representations of the same images: heat map + CSV."""
    from tlfeat.analysis.study import similarity_command

    _written(similarity_command(AnalyzeConfig(**given(options)), "cka"))


@command.command("rsa")
@from_config(AnalyzeConfig, *COMMON, "distance", *SELECTORS)
@user_errors()
def rsa(**options: Any) -> None:
    """RSA (Spearman between dissimilarity matrices) between every two representations: heat map + CSV."""
    from tlfeat.analysis.study import similarity_command

    _written(similarity_command(AnalyzeConfig(**given(options)), "rsa"))


@command.command("embed")
@from_config(AnalyzeConfig, *COMMON, "methods", *SELECTORS)
@user_errors()
def embed(**options: Any) -> None:
    """2-D embeddings (PCA, t-SNE, UMAP) of each layer's features, coloured by class."""
    from tlfeat.analysis.study import embed_command

    _written(embed_command(AnalyzeConfig(**given(options))))


@command.command("neighbours")
@from_config(AnalyzeConfig, *COMMON, "queries", "k", *SELECTORS, "data_dir")
@user_errors()
def neighbours(**options: Any) -> None:
    """For a few test images, the k most similar training images in feature space, as a gallery."""
    from tlfeat.analysis.study import neighbours_command

    _written(neighbours_command(AnalyzeConfig(**given(options))))


@command.command("layers")
@from_config(
    LayerViewConfig, "model", "image", "weights_id", "weights_file", "untrained", "image_size", "channels", "out"
)
@user_errors()
def layers(**options: Any) -> None:
    """The first layer's filters as an image grid, and the activation maps of a photo at each block."""
    from tlfeat.analysis.views import layer_views

    views = layer_views(LayerViewConfig(**given(options)))
    click.echo(f"{views.filters}  (first-layer filters)")
    click.echo(f"{views.activations}  (activation maps per block)")
    for name, shape in views.blocks:
        click.echo(f"  block {name}: {' x '.join(map(str, shape))}")
