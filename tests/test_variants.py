"""Variants of one model on one dataset (image size, limit, layer, weights) read differently everywhere:
load_features picks what `tlfeat extract` makes without options and otherwise names the selector to
add; fit's lines and `tlfeat results` name the image size, the weights and the limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tlfeat import ExtractConfig, extract, load_features
from tlfeat.errors import CacheMismatch
from tlfeat_cli.main import cli


def _extract(tree: Path, cache: Path, **kw: object) -> None:
    base: dict[str, object] = dict(model="resnet18", data=str(tree), untrained=True, workers=0, progress=False)
    extract(ExtractConfig(**{**base, "cache_dir": cache, **kw}))  # type: ignore[arg-type]


def test_load_features_after_a_64_px_comparison_takes_the_default_or_names_the_selector(
    tree: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _extract(tree, cache)  # the README's extract: the weights' own 224 px, every image
    _extract(tree, cache, image_size=64, limit=6)  # what a compare at 64 px with --limit leaves beside it
    train = load_features("resnet18", str(tree), cache_dir=cache)
    assert train.meta["image_size"] == 224 and train.X.shape[0] == 12
    small = load_features("resnet18", str(tree), cache_dir=cache, image_size=64)
    assert small.meta["image_size"] == 64 and small.X.shape[0] == 6

    # Without the default among them: one line naming the selector and its values, no `limit=0` for no limit.
    _extract(tree, cache, image_size=48)
    _extract(tree, cache, image_size=32)
    (train.path or Path()).unlink()
    with pytest.raises(CacheMismatch) as err:
        load_features("resnet18", str(tree), cache_dir=cache)
    message = str(err.value)
    assert "add image_size=32 or image_size=48 to pick one" in message, message
    assert "limit=0" not in message and "limit=None" in message, message


def test_fit_lines_and_results_name_the_image_size_weights_and_limit(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _extract(tree, cache, image_size=32)
    _extract(tree, cache, image_size=48, limit=6)
    fitted = CliRunner().invoke(cli, ["fit", "--clf", "logreg", "--C", "1", "--cache-dir", str(cache)])
    assert fitted.exit_code == 0, fitted.output
    lines = [line for line in fitted.output.splitlines() if line.startswith("logreg resnet18/")]
    assert len(lines) == 2 and lines[0] != lines[1].replace("48 px", "32 px")
    assert any("32 px" in line and "[image size 32, limit -]" in line for line in lines), lines
    assert any("48 px" in line and "[image size 48, limit 6]" in line for line in lines), lines

    shown = CliRunner().invoke(cli, ["results"])
    assert shown.exit_code == 0, shown.output
    header, _, *rows = shown.output.splitlines()
    assert "weights" in header.split() and "limit" in header.split()
    assert sorted(" 48 " in r and " 6 " in r and "untrained:seed0" in r for r in rows) == [False, True], rows
