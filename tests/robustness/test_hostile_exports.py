"""What `export` and `analyze` write, against hostile names and folders of the user's (the review of
analyze and export).

One tiny image tree whose class names are a formula, a matplotlib formula and bytes that are not
UTF-8, extracted once (random ResNet-18 at 16 px); every test reads copies of its cache.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from tlfeat import ExtractConfig, extract

from ..conftest import make_tree
from .helpers import assert_one_clear_line
from .test_hostile_outputs import run

LATIN1 = os.fsdecode(b"caf\xe9")  # a folder name that is not UTF-8, kept by surrogateescape
CLASSES = ("=1+2", r"$\nope^$", LATIN1)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("exports")
    tree = make_tree(root / "tree", per_class=4, classes=CLASSES, size=24)
    extract(
        ExtractConfig(
            model="resnet18", data=str(tree), untrained=True, image_size=16, workers=0, cache_dir=root / "cache",
            progress=False,
        )
    )  # fmt: skip
    return tree, root / "cache"


def export(tree: Path, cache: Path, out: Path, fmt: str = "csv", **kw: Any) -> Any:
    return run("export", "-m", "resnet18", "-d", tree, "--format", fmt, "--cache-dir", cache, "--out", out, **kw)


def analyze(what: str, tree: Path, cache: Path, out: Path, *extra: str) -> Any:
    return run(
        "analyze", what, "--model", "resnet18:untrained", "--data", tree, "--split", "test", "--image-size", "16",
        "--cache-dir", cache, "--out", out, *extra,
    )  # fmt: skip


# --------------------------------------------------------------------------- items 1, 2: the user's files


def test_export_and_analyze_write_only_into_folders_they_made(made: tuple[Path, Path], tmp_path: Path) -> None:
    tree, cache = made
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "test.csv").write_text("my numbers")
    (mine / "index.json").write_text("my index")
    assert_one_clear_line(export(tree, cache, mine), "tlfeat did not make", ".tlfeat-report")
    assert_one_clear_line(analyze("cka", tree, cache, mine), "tlfeat did not make")
    assert sorted(p.name for p in mine.iterdir()) == ["index.json", "test.csv"]
    assert (mine / "test.csv").read_text() == "my numbers" and (mine / "index.json").read_text() == "my index"

    out = tmp_path / "out"  # new: made and marked; run again, it replaces only its own files
    for _ in range(2):
        proc = export(tree, cache, out, "npy")
        assert proc.returncode == 0, proc.stderr
    (out / "test.csv").write_text("my numbers")  # dropped into tlfeat's folder: not listed as tlfeat's
    assert_one_clear_line(export(tree, cache, out, "csv"), "already holds test.csv", "tlfeat did not write")
    assert (out / "test.csv").read_text() == "my numbers" and not (out / "train.csv").exists()
    (out / "notes.txt").write_text("mine")  # any other file is simply left alone
    assert analyze("cka", tree, cache, out).returncode == 0
    assert (out / "notes.txt").read_text() == "mine"
    listed = json.loads((out / ".tlfeat-report").read_text())["files"]
    assert "index.json" in listed and "test_features.npy" in listed and "test.csv" not in listed

    for proc in (export(tree, cache, tree / "exported"), analyze("cka", tree, cache, tree / "val" / "an")):
        assert_one_clear_line(proc, "--out", "inside the dataset folder")
    assert sorted(p.name for p in tree.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in (tree / "val").iterdir()) == sorted(CLASSES)


# --------------------------------------------------------------------------- items 3, 5: names in plots and CSVs


def test_analyses_draw_and_write_any_class_name(made: tuple[Path, Path], tmp_path: Path) -> None:
    tree, cache = made
    out = tmp_path / "an"
    for what, extra in (("embed", ["--methods", "pca"]), ("neighbours", ["--queries", "2", "--k", "3"])):
        proc = analyze(what, tree, cache, out, *extra)
        assert proc.returncode == 0, proc.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    with open(next(out.glob("embed-*.csv")), encoding="utf-8", errors="surrogateescape", newline="") as fh:
        classes = {row["class"] for row in csv.DictReader(fh)}
    assert classes == {"'=1+2", r"$\nope^$", LATIN1}  # the formula guarded, the bytes kept
    with open(next(out.glob("neighbours-*.csv")), encoding="utf-8", errors="surrogateescape", newline="") as fh:
        assert {row["query_class"] for row in csv.DictReader(fh)} <= classes


# --------------------------------------------------------------------------- items 4, 5, 6: the exported files


def test_export_keeps_every_name_and_guards_formulas(made: tuple[Path, Path], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    tree, cache = made
    proc = export(tree, cache, tmp_path / "pq", "parquet")
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(tmp_path / "pq" / "test.parquet")
    assert str(table.schema.field("class").type) == "binary"  # the names' own bytes
    assert set(table.column("class").to_pylist()) == {b"=1+2", rb"$\nope^$", b"caf\xe9"}
    assert str(table.schema.field("id").type) == "binary" and len(table) == 12
    meta = json.loads((tmp_path / "pq" / "meta.json").read_text())
    assert meta["formats"]["parquet"]["splits"]["test"]["limit"] is None and sorted(meta["class_names"]) == sorted(
        CLASSES
    )

    for fmt, name in (("csv", "test.csv"), ("npy", "test_ids.csv")):
        proc = export(tree, cache, tmp_path / fmt, fmt)
        assert proc.returncode == 0, proc.stderr
        with open(tmp_path / fmt / name, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert {r["class"] for r in rows} == {"'=1+2", r"$\nope^$", LATIN1}
        assert all(not r["id"].startswith(("=", "+", "-", "@")) for r in rows)
    assert (tmp_path / "csv" / "test.csv").read_bytes().count(b"caf\xe9") >= 4


def test_a_stale_export_names_the_command_that_updates_it(made: tuple[Path, Path], tmp_path: Path) -> None:
    tree, cache = made
    copy, cache_copy = tmp_path / "tree", tmp_path / "cache"
    shutil.copytree(tree, copy)
    extract(
        ExtractConfig(
            model="resnet18", data=str(copy), untrained=True, image_size=16, workers=0, cache_dir=cache_copy,
            progress=False,
        )
    )  # fmt: skip
    shutil.copy(copy / "val" / CLASSES[0] / "1.png", copy / "val" / CLASSES[0] / "9.png")
    line = assert_one_clear_line(export(copy, cache_copy, tmp_path / "out"), "changed since it was extracted")
    assert "allow_stale" not in line and "same options" not in line
    command = shlex.split(line.split("`")[1])
    assert command[:2] == ["tlfeat", "extract"] and "--untrained" in command and str(cache_copy) in command
    assert run(*command[1:]).returncode == 0  # the command it names updates the features
    proc = export(copy, cache_copy, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- item 7: the kNN caption


def test_the_knn_caption_names_the_k_its_table_shows() -> None:
    from tlfeat.report.findings import knn_caption

    small = knn_caption(["10", "20", "30"])  # 30 training images: 100 and 200 capped at 30
    assert "k = 10, 20, 30:" in small and "capped" in small and "four" not in small
    assert "capped" not in knn_caption(["5", "10", "20", "100", "200"])
