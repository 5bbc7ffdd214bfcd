"""Broken files in a folder dataset: stop naming the file (keeping finished blocks), or skip and record them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tlfeat import cache, catalog

from ..conftest import make_tree
from .helpers import FAST, assert_one_clear_line, cli, env


def _break(tree: Path) -> dict[str, Path]:
    """Three kinds of broken files, in the last class folder so good blocks come before them."""
    folder = tree / "train" / "disc"
    good = (folder / "0.jpg").read_bytes()
    bad = {
        "empty": folder / "zz_empty.jpg",
        "truncated": folder / "zz_truncated.jpg",
        "not an image": folder / "zz_notes.png",
    }
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(good[: len(good) // 3])
    bad["not an image"].write_text("lab notes, not a picture\n")
    (folder / "README.txt").write_text("ignored: not an image extension\n")
    return bad


def test_broken_images_fail_naming_the_file_and_keep_finished_blocks(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8)
    bad = _break(tree)
    cache_dir = tmp_path / "cache"
    proc = cli(
        "extract", "--data", tree, *FAST, "--split", "train", "--cache-dir", cache_dir, env=env(TLFEAT_FLUSH_EVERY="4")
    )
    line = assert_one_clear_line(proc, "cannot decode image")
    assert any(str(path) in line for path in bad.values()), line
    [partial] = catalog.scan(cache_dir)
    assert partial.status == "partial" and partial.attrs["n_done"] >= 16  # the ants and bees blocks


def test_skip_records_every_broken_file_in_the_cache_ls_fit_and_report(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8)
    bad = _break(tree)
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    proc = cli("extract", "--data", tree, *FAST, "--on-error", "skip", "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "train: 24 x 512" in proc.stdout and "skipped 3 unreadable image(s)" in proc.stdout

    [train] = [cache.read(e.path) for e in catalog.scan(cache_dir) if e.attrs["split"] == "train"]
    assert len(train) == 24 and np.isfinite(train.X).all()
    assert {Path(item["id"]).name for item in train.meta["skipped"]} == {path.name for path in bad.values()}
    assert not any(Path(i).name.startswith("zz_") for i in train.ids)

    listing = cli("ls", "--skipped", "--cache-dir", cache_dir)
    assert listing.returncode == 0, listing.stderr
    for path in bad.values():
        assert path.name in listing.stdout
    as_json = json.loads(cli("ls", "--json", "--cache-dir", cache_dir).stdout)
    assert sorted(e["n_skipped"] for e in as_json) == [0, 3]

    fitted = cli("fit", "--clf", "logreg", "--C", "1", "--json", "--cache-dir", cache_dir, "--results-dir", results)
    assert fitted.returncode == 0, fitted.stderr
    [record] = json.loads(fitted.stdout)
    assert record["details"]["n_skipped"] == {"train": 3, "test": 0} and record["n_train"] == 24

    out = tmp_path / "cmp"
    compared = cli(
        "compare", "--models", "resnet18:untrained", "--data", tree, "--methods", "logreg", "--image-size", "64",
        "--cache-dir", tmp_path / "fresh-cache", "--out", out, "--on-error", "skip",
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    report = (out / "report.md").read_text()
    assert "3 unreadable image(s) skipped" in report
