"""Inputs at the limits (the second hostile round, issue 19): links, labels, patterns, special files, names.

Each test names the item of the issue it guards. Library calls where the listing is what matters;
real processes where the exit code, the one line or a hang is the point.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tlfeat import datasets
from tlfeat.errors import TlfeatError

from ..conftest import make_tree
from .helpers import FAST, assert_one_clear_line, env

SRC = Path(datasets.__file__).resolve().parents[1]  # the tlfeat package under test


def run(*args: str | Path, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess[str]:
    """`tlfeat ARGS` as a real process that may not run past `timeout` (a hang fails the test)."""
    return subprocess.run(
        [sys.executable, "-m", "tlfeat_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(**extra),
    )


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12), value, dtype=np.uint8)).save(path)


def _tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> Path:
    """A WebDataset shard: KEY.png + KEY.cls for each (key, image bytes, label bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            for name, payload in ((f"{key}.png", image), (f"{key}.cls", label)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, labels: Any, n: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = labels if isinstance(labels, pa.Array) else pa.array(labels)
    pq.write_table(pa.table({"png": [_png_bytes(10 * i) for i in range(n)], "cls": column}), path)
    return path


def _listing(root: Path) -> dict[str, list[tuple[str, str]]]:
    """(id, class) of every image of each split."""
    out = {}
    for split in ("train", "test"):
        s = datasets.load_split(str(root), split)
        out[split] = [(i, s.class_names[int(y)]) for i, y in zip(s.ids, s.labels, strict=True)]
    return out


# --------------------------------------------------------------------------- item 2: links


def test_item2_a_link_up_the_tree_lists_no_image_twice_and_relabels_none(tmp_path: Path) -> None:
    ds = make_tree(tmp_path / "ds", per_class=5, classes=("c0", "c1"), splits=("",))
    (ds / "c0" / "loop").symlink_to("..")  # the case: every c1 image again, as c0/loop/c1/*
    (ds / "c1" / "up").symlink_to(tmp_path)  # a folder holding the dataset
    listing = _listing(ds)
    every = listing["train"] + listing["test"]
    assert sorted(i for i, _ in every) == sorted(f"{c}/{f.name}" for c in ("c0", "c1") for f in (ds / c).glob("*.*"))
    assert all(i.split("/")[0] == label for i, label in every)  # no image under another class
    assert not {i for i, _ in listing["train"]} & {i for i, _ in listing["test"]}


def test_item2_links_between_splits_never_leak_test_images_into_train(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", per_class=4, classes=("ants", "bees"))
    (root / "train" / "ants" / "more").symlink_to(root / "val" / "ants")  # back into the tree
    os.link(root / "val" / "bees" / "1.png", root / "train" / "bees" / "hard.png")  # one file, two names
    outside = tmp_path / "shared"
    _png(outside / "x.png", 200)
    (root / "train" / "ants" / "shared").symlink_to(outside)
    (root / "train" / "bees" / "shared-again").symlink_to(outside)  # the same outside folder twice
    (root / "train" / "ants" / "bee.png").symlink_to(root / "train" / "bees" / "0.jpg")  # a link to another class
    listing = _listing(root)
    train, test = dict(listing["train"]), dict(listing["test"])
    assert not any(i.startswith("train/ants/more/") for i in train)
    assert "train/bees/hard.png" in train and "val/bees/1.png" not in test  # one image, kept where it comes first
    assert [i for i in train if i.endswith("/x.png")] == ["train/ants/shared/x.png"]  # followed once
    assert "train/ants/bee.png" not in train and train["train/bees/0.jpg"] == "bees"  # where it really is
    inodes: dict[tuple[int, int], str] = {}
    for split in ("train", "test"):
        for ref in datasets.load_split(str(root), split).refs:
            st = os.stat(ref)
            assert inodes.setdefault((st.st_dev, st.st_ino), ref) == ref  # no file twice, across the splits


def test_item2_split_folders_that_are_one_folder_are_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", per_class=3, splits=("train",))
    (root / "test").symlink_to(root / "train")
    with pytest.raises(TlfeatError, match="is the same folder as"):
        datasets.load_split(str(root), "train")


# --------------------------------------------------------------------------- item 3: labels


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        ([0.0, 1.0, float("nan"), 1.0], "label is nan"),
        ([0.0, 1.0, float("inf"), 1.0], "label is inf"),
        ([0.0, 1.5, 1.0, 0.0], "is a fraction"),
        ([[1, 2], [3], [1], [2]], "of type list"),
        ([{"a": 1}, {"a": 2}, {"a": 1}, {"a": 2}], "of type struct"),
        (["cat", "dog", "x" * 5000, "cat"], "longer than 256"),
        (["cat", "dog", "bad\nline", "cat"], "control characters"),
        ([b"cat", b"dog", b"\xff\xfe", b"cat"], "not UTF-8"),
    ],
)
def test_item3_parquet_labels_are_checked_by_type_and_value(tmp_path: Path, labels: Any, needle: str) -> None:
    path = _parquet(tmp_path / "part.parquet", labels)
    with pytest.raises(TlfeatError, match=needle):
        datasets.load_split(str(path), "train")


def test_item3_parquet_labels_that_are_classes(tmp_path: Path) -> None:
    import pyarrow as pa

    cases = {
        "floats": ([0.0, 1.0, 1.0, 0.0], ["0", "1"]),  # as pandas writes an integer column
        "booleans": ([True, False, True, False], ["false", "true"]),
        "bytes": ([b"cat", b"dog", b"cat", b"dog"], ["cat", "dog"]),
        "huge ints": (pa.array([2**63 - 1, 0, 0, 2**63 - 1], pa.uint64()), ["0", str(2**63 - 1)]),
        "text and numbers": (["7", " 7", "12", "12"], ["7", "12"]),  # numeric order, "7" and " 7" one class
    }
    for name, (labels, classes) in cases.items():
        path = _parquet(tmp_path / f"{name}.parquet", labels)
        assert list(datasets.load_split(str(path), "train").class_names) == classes, name


def test_item3_tar_labels_are_checked_and_refused_in_one_line(tmp_path: Path) -> None:
    png = _png_bytes(50)
    bad = {
        "nan-free but huge": b"9" * 100_000,  # int() of it raises in Python; a label it is not
        "not utf-8": b"\xff\xfe",
        "control": b"a\x00b",
    }
    for name, label in bad.items():
        shard = _tar(tmp_path / f"{name.replace(' ', '_')}.tar", [("a", png, b"0"), ("b", png, label)])
        with pytest.raises(TlfeatError, match="sample b"):
            datasets.load_split(str(shard), "train")
    shard = _tar(tmp_path / "numbers.tar", [(str(i), png, str(i % 2).encode()) for i in range(6)])
    proc = run("extract", "--data", tmp_path / "not_utf-8.tar", *FAST, "--cache-dir", tmp_path / "cache")
    assert_one_clear_line(proc, "not UTF-8")
    assert datasets.load_split(str(shard), "train").class_names == ("0", "1")


# --------------------------------------------------------------------------- item 7: shard specs are paths


def test_item7_a_relative_shard_spec_is_keyed_by_where_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = _png_bytes(30)
    ids = []
    for where in ("one", "two"):
        _tar(tmp_path / where / "sh" / "a.tar", [(f"{where}{i}", png, str(i % 2).encode()) for i in range(4)])
        monkeypatch.chdir(tmp_path / where)
        ids += [datasets.canonical("shards:sh/a.tar"), datasets.canonical("sh/a.tar")]
    assert ids[0] == ids[1] == f"shards:{tmp_path / 'one' / 'sh' / 'a.tar'}"
    assert ids[2] == ids[3] == f"shards:{tmp_path / 'two' / 'sh' / 'a.tar'}"
    assert datasets.dataset_slug(ids[0]) != datasets.dataset_slug(ids[2])


# --------------------------------------------------------------------------- items 8 and 12: brace patterns


def test_item8_braces_hold_commas_in_patterns_lists_and_split_mappings(tmp_path: Path) -> None:
    from tlfeat.config import CompareConfig

    png = _png_bytes(90)
    for name, label in (("a", b"0"), ("b", b"1"), ("c", b"0")):
        _tar(tmp_path / "sh1" / f"{name}.tar", [(f"{name}{i}", png, label) for i in range(5)])
    pattern = str(tmp_path / "sh1" / "{a,b}.tar")
    mapping = f"train={tmp_path}/sh1/{{a,b}}.tar,test={tmp_path}/sh1/{{c,b}}.tar"
    assert datasets.canonical(pattern) == f"shards:{pattern}"
    assert datasets.splits(mapping) == ("train", "test")
    assert len(datasets.load_split(mapping, "test")) == 10
    cfg = CompareConfig(models="resnet18", datas=f"digits,{pattern},{mapping},mnist", methods="logreg")
    assert cfg.datas == ("digits", pattern, mapping, "mnist")
    proc = run("extract", "--data", pattern, *FAST, "--cache-dir", tmp_path / "cache", "--split", "train")
    assert proc.returncode == 0, proc.stderr
    assert " 8 x 512" in proc.stdout  # 80% of the 10 samples of a.tar and b.tar


def test_item12_a_pattern_of_too_many_names_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    from tlfeat.datasets.spec import MAX_NAMES, braceexpand, count

    assert count("s/{0..999999}{0..999999}{a,b}.tar") == 2 * 10**12
    assert len(braceexpand("s/{0..999}{0..999}.tar")) == MAX_NAMES
    assert braceexpand("{a,{b,c}}{5..3}") == ["a5", "a4", "a3", "b5", "b4", "b3", "c5", "c4", "c3"]
    assert braceexpand("{a}{00..02}") == ["{a}00", "{a}01", "{a}02"]
    proc = run("extract", "--data", tmp_path / "s/{0..999999}{0..999999}.tar", *FAST, timeout=60)
    assert_one_clear_line(proc, "expands to 1,000,000,000,000 names")
    deep = "{a," * 40 + "}" * 40 + ".tar"
    proc = run("extract", "--data", tmp_path / deep, *FAST, timeout=60)
    assert_one_clear_line(proc, "nests braces")


# --------------------------------------------------------------------------- item 9: only regular files


def test_item9_special_files_named_like_images_never_hang_and_are_skipped_or_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4, classes=("ants", "bees"))
    os.mkfifo(tree / "train" / "bees" / "zz_fifo.jpg")
    (tree / "train" / "bees" / "zz_zero.png").symlink_to("/dev/zero")
    (tree / "train" / "bees" / "zz_folder.jpg").mkdir()  # a folder named like an image: a folder
    big = tree / "train" / "bees" / "zzz_big.png"  # 88 kB
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)).save(big)
    common = ["--data", tree, *FAST, "--split", "train", "--cache-dir", tmp_path / "cache"]
    proc = run("extract", *common, timeout=120, TLFEAT_MAX_IMAGE_MB="0.05")
    assert_one_clear_line(proc, "zz_fifo.jpg", "a FIFO (named pipe), not a regular file")
    proc = run("extract", *common, "--on-error", "skip", timeout=120, TLFEAT_MAX_IMAGE_MB="0.05")
    assert proc.returncode == 0, proc.stderr
    assert "train: 8 x 512" in proc.stdout and "skipped 3 unreadable" in proc.stdout  # the folder lists none
    listed = run("ls", "--skipped", "--cache-dir", tmp_path / "cache", "--quick").stdout
    assert "a FIFO (named pipe), not a regular file" in listed and "a character device" in listed
    assert "above the limit of 0.05 MB per image (raise it with TLFEAT_MAX_IMAGE_MB)" in listed


def test_item9_a_shard_that_is_no_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sh").mkdir()
    os.mkfifo(tmp_path / "sh" / "a.tar")
    with pytest.raises(TlfeatError, match="is a FIFO"):
        datasets.load_split(str(tmp_path / "sh" / "a.tar"), "train")


# --------------------------------------------------------------------------- item 17: names that are not what they look like


def test_item17_split_folders_that_differ_in_case_are_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", per_class=3)
    make_tree(tmp_path / "tree", per_class=2, splits=("Train",))
    with pytest.raises(TlfeatError, match="has both Train/ and train/"):
        datasets.load_split(str(root), "train")


def test_item17_a_path_that_exists_is_the_folder_even_when_named_like_a_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_tree(tmp_path / "Digits", per_class=3, classes=("a", "b"), splits=("",))
    (tmp_path / "mnist").mkdir()  # an empty folder: still the folder, with a way to the named one
    assert datasets.canonical("Digits") == str(tmp_path / "Digits")
    assert datasets.canonical("./Digits") == str(tmp_path / "Digits")
    assert datasets.canonical("named:Digits") == "digits" and datasets.canonical("digits") == "digits"
    assert datasets.load_split("Digits", "train").class_names == ("a", "b")
    with pytest.raises(TlfeatError, match="write --data named:mnist"):
        datasets.load_split("mnist", "train")
    proc = run("datasets")
    assert "named:" in proc.stdout


def test_item17_weights_that_are_no_file_are_named_as_such(tmp_path: Path) -> None:
    common = ["extract", "--data", "digits", "--model", "resnet18", "--cache-dir", tmp_path, "-q"]
    proc = run(*common, "--weights", "/dev/null")
    line = assert_one_clear_line(proc, "/dev/null", "not a regular file")
    assert "does not exist" not in line
    proc = run(*common, "--weights", tmp_path / "none.pt")
    assert_one_clear_line(proc, "does not exist")


# --------------------------------------------------------------------------- issue 21: the datasets package has no import cycle


def test_the_datasets_modules_import_each_other_without_a_cycle() -> None:
    modules = {p.stem: p for p in (SRC / "datasets").glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlfeat.datasets"):
                target = node.module.removeprefix("tlfeat.datasets").lstrip(".")
                found |= {target} if target else {a.name for a in node.names}
        edges[name] = found & set(modules)
    assert "shards" not in edges["base"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    assert not [m for m in modules if reaches(m, m, set())]


# --------------------------------------------------------------------------- item 13: our own hostile search


def test_item13_a_tree_thousands_of_folders_deep_is_listed(tmp_path: Path) -> None:
    deep = tmp_path / "ds" / "c0"
    deep.mkdir(parents=True)
    for _ in range(1500):  # deeper than Python's recursion limit (made level by level: mkdir recurses too)
        deep = deep / "d"
        deep.mkdir()
    _png(deep / "x.png", 10)
    _png(tmp_path / "ds" / "c1" / "y.png", 200)
    _png(tmp_path / "ds" / "c1" / "z.png", 100)
    _png(tmp_path / "ds" / "c0" / "w.png", 50)
    try:
        ids = [i for split in ("train", "test") for i in datasets.load_split(str(tmp_path / "ds"), split).ids]
        assert sorted(ids) == sorted(["c0/w.png", "c0" + "/d" * 1500 + "/x.png", "c1/y.png", "c1/z.png"])
    finally:  # pytest's own clean-up (shutil.rmtree) recurses per level: take the chain down first
        (deep / "x.png").unlink()
        while deep.name == "d":
            deep.rmdir()
            deep = deep.parent


def test_item13_names_that_break_lines_or_look_like_patterns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlfeat.config import CompareConfig

    tree = make_tree(tmp_path / "tree", per_class=2, classes=("a", "b"))
    _png(tree / "val" / "new\nclass" / "x.png", 10)  # a class train lacks, named across two lines
    proc = run("extract", "--data", tree, *FAST, "--split", "test", "--cache-dir", tmp_path / "cache")
    assert_one_clear_line(proc, "class(es) new\\nclass that", "has none of")
    png = _png_bytes(20)
    literal = _tar(tmp_path / "a[1]{x}.tar", [(str(i), png, str(i % 2).encode()) for i in range(6)])
    assert len(datasets.load_split(str(literal), "train")) + len(datasets.load_split(str(literal), "test")) == 6
    for spec, needle in (("shards:", "the pattern is empty"), ("shards:train=a.tar,test=", "split 'test' is empty")):
        with pytest.raises(TlfeatError, match=needle):
            datasets.canonical(spec)
    monkeypatch.chdir(tmp_path)
    make_tree(tmp_path / "x=1", per_class=2, splits=("",))
    make_tree(tmp_path / "y=2", per_class=2, splits=("",))
    cfg = CompareConfig(models="resnet18", datas="x=1,y=2,train=a.tar,test=b.tar", methods="logreg")
    assert cfg.datas == ("x=1", "y=2", "train=a.tar,test=b.tar")


def test_item13_a_named_dataset_whose_label_file_names_no_class(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((4, 28, 28), np.uint8)
    (raw / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes()
    )
    labels = bytes([0, 1, 200, 3])  # 200: no MNIST class
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + labels)
    with pytest.raises(TlfeatError, match="gives sample 2 the label 200, but mnist has 10 classes"):
        datasets.load_split("mnist", "train", tmp_path / "data")


def test_item13_a_shard_member_over_the_size_limit_is_skipped_like_any_unreadable_image(tmp_path: Path) -> None:
    big = np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")  # 88 kB
    shard = _tar(
        tmp_path / "s.tar",
        [*[(f"k{i}", _png_bytes(20 * i), str(i % 2).encode()) for i in range(8)], ("zz", buf.getvalue(), b"1")],
    )
    common = ["--data", shard, *FAST, "--split", "train", "--cache-dir", tmp_path / "cache"]
    proc = run("extract", *common, "--on-error", "skip", TLFEAT_MAX_IMAGE_MB="0.05")
    assert proc.returncode == 0 and "skipped 1 unreadable" in proc.stdout, proc.stderr
    assert "above the limit of 0.05 MB per image" in proc.stdout


# --------------------------------------------------------------------------- round 3: train/test overlap


def _record(results: Path) -> dict[str, Any]:
    import json

    (path,) = results.glob("fits/*/record.json")
    return dict(json.loads(path.read_text()))


def test_round3_a_test_set_inside_train_is_refused_and_a_partial_overlap_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    samples = [(f"k{i:02d}", _png_bytes(20 * i), str(i % 2).encode()) for i in range(12)]
    a = _tar(tmp_path / "a.tar", samples[:8])
    b = _tar(tmp_path / "b.tar", samples[6:])  # k06 and k07 are in both
    cache = ["--cache-dir", tmp_path / "cache"]
    tree = make_tree(tmp_path / "tree", per_class=2, splits=("train",))
    import shutil

    shutil.copytree(tree / "train", tree / "test")  # a folder copied into both splits: other ids, same bytes
    for data, needle in ((f"train={a},test={a}", "same ids"), (str(tree), "same image bytes")):
        assert run("extract", "--data", data, *FAST, *cache).returncode == 0
        proc = run("fit", "--data", data, "--model", "resnet18", *cache)
        assert_one_clear_line(proc, "every test image", "is also a training image", needle, "not in train")
    data = f"train={a},test={b}"
    assert run("extract", "--data", data, *FAST, *cache).returncode == 0
    proc = run("fit", "--data", data, "--model", "resnet18", *cache)
    assert proc.returncode == 0, proc.stderr
    assert "2 of 6 test images" in proc.stderr and "also training images" in proc.stderr
    assert _record(tmp_path / "results")["details"]["train_test_overlap"] == {
        "test_images_in_train": 2,
        "test_images_checked": 6,
        "same_ids": 2,
    }


# --------------------------------------------------------------------------- round 3: a folder named like a dataset


def test_round3_a_folder_named_digits_leaves_the_named_digits_cache_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tlfeat
    from tlfeat import ExtractConfig, catalog, extract, freshness

    cache = tmp_path / "cache"
    extract(ExtractConfig(model="resnet18", data="digits", untrained=True, image_size=16, limit=30, test_limit=20,
                          workers=0, cache_dir=cache, progress=False))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    make_tree(tmp_path / "digits", per_class=3, classes=("a", "b"), splits=("",))  # `digits` here is this folder
    entries = [e for e in catalog.scan(cache) if e.status == "ok"]
    assert len(entries) == 2
    assert {freshness.status(e).state for e in entries} == {"fresh"}
    assert len(tlfeat.load_features("resnet18", "named:digits", "train", cache_dir=cache, limit=30)) == 30
    proc = run("ls", "--cache-dir", cache)
    assert proc.returncode == 0 and "digits" in proc.stdout and "STALE" not in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- round 3: truncated shards, tar labels


def test_round3_a_truncated_tar_shard_is_refused_naming_it(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "whole.tar", [(f"k{i}", _png_bytes(20 * i), str(i % 2).encode()) for i in range(8)])
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert len(datasets.load_split(str(shard), "train")) + len(datasets.load_split(str(shard), "test")) == 8
    cuts = {
        "boundary": members[6].offset,  # at a member's header: tarfile alone reads 3 samples and stops
        "header": members[6].offset + 100,  # inside a header
        "member": members[5].offset_data + 10,  # inside an image
        "no end block": members[-1].offset_data + 512,  # every member, but no end-of-archive block
    }
    for name, cut in cuts.items():
        cut_shard = tmp_path / f"{name.replace(' ', '_')}.tar"
        cut_shard.write_bytes(data[:cut])
        with pytest.raises(TlfeatError, match=f"{cut_shard.name} is truncated.*copy the shard again"):
            datasets.load_split(str(cut_shard), "train")
    proc = run("extract", "--data", tmp_path / "boundary.tar", *FAST, "--cache-dir", tmp_path / "cache")
    assert_one_clear_line(proc, "boundary.tar is truncated")


def test_round3_tar_labels_follow_the_parquet_rules(tmp_path: Path) -> None:
    png = _png_bytes(50)
    for label, needle in ((b"nan", "label is nan"), (b"-inf", "label is -inf"), (b"0.5", "is a fraction")):
        shard = _tar(tmp_path / "bad.tar", [("a", png, b"0"), ("b", png, label)])
        with pytest.raises(TlfeatError, match=f"sample b.*{needle}"):
            datasets.load_split(str(shard), "train")
    shard = _tar(tmp_path / "mixed.tar", [(str(i), png, [b"1", b"1.0", b"0", b"0.0"][i % 4]) for i in range(8)])
    assert datasets.load_split(str(shard), "train").class_names == ("0", "1")
    path = _parquet(tmp_path / "mixed.parquet", ["1", "1.0", "0", "0.00"])
    assert datasets.load_split(str(path), "train").class_names == ("0", "1")


# --------------------------------------------------------------------------- round 3: messages that say what happened


def test_round3_brace_steps_and_letter_ranges_expand_as_in_bash() -> None:
    from tlfeat.datasets.spec import braceexpand, count

    cases = {
        "s{0..10..2}": ["s0", "s2", "s4", "s6", "s8", "s10"],
        "s{10..0..3}": ["s10", "s7", "s4", "s1"],
        "{00..10..5}.tar": ["00.tar", "05.tar", "10.tar"],
        "{a..c}.tar": ["a.tar", "b.tar", "c.tar"],
        "{E..A..2}": ["E", "C", "A"],
        "x{1..2}{a..b}": ["x1a", "x1b", "x2a", "x2b"],
    }
    for pattern, names in cases.items():
        assert braceexpand(pattern) == names and count(pattern) == len(names), pattern
    with pytest.raises(TlfeatError, match="within one case"):
        braceexpand("{a..C}")


def test_round3_misleading_input_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shard = _tar(tmp_path / "a.tar", [(f"k{i}", _png_bytes(20 * i), str(i % 2).encode()) for i in range(6)])
    with pytest.raises(TlfeatError, match="the pattern matches no file"):
        datasets.load_split(str(tmp_path / "none" / "*.tar"), "train")
    with pytest.raises(TlfeatError, match="1 of 2 file.s. missing"):
        datasets.load_split(str(tmp_path / "{a,b}.tar"), "train")
    with pytest.raises(TlfeatError, match="unknown split 'tset'. Did you mean test"):
        datasets.canonical(f"train={shard},tset={shard}")
    for data in ("digits", f"train={shard},test={shard}", str(make_tree(tmp_path / "tree", per_class=2))):
        with pytest.raises(TlfeatError, match="no (split )?'tset'( split)?.*Did you mean test"):
            datasets.load_split(data, "tset")
    import gzip

    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    for data in ("a.tar.gz", f"train={shard},test=a.tar.gz", "sh/*.tgz"):
        with pytest.raises(TlfeatError, match="compressed tar files.*decompress them to .tar"):
            datasets.canonical(data)
    for bad in ("abc", "-1", "0", "nan"):
        proc = run("extract", "--data", shard, *FAST, "--cache-dir", tmp_path / "cache", TLFEAT_MAX_IMAGE_MB=bad)
        assert_one_clear_line(proc, f"TLFEAT_MAX_IMAGE_MB='{bad}' is not a positive number")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5"))


# --------------------------------------------------------------------------- round 3: Parquet columns and ids


def test_round3_parquet_ids_are_relative_paths_and_two_image_columns_are_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        _parquet(tmp_path / where / "x.parquet", [0, 1, 0, 1])
    both = datasets.load_split(str(tmp_path / "{a,b}" / "x.parquet"), "train")
    one = datasets.load_split(str(tmp_path / "a" / "x.parquet"), "train")
    every = both.ids + datasets.load_split(str(tmp_path / "{a,b}" / "x.parquet"), "test").ids
    assert sorted(every) == sorted(f"{w}/x.parquet/0/{r}" for w in "ab" for r in range(4))
    assert all(i.startswith("x.parquet/0/") for i in one.ids)  # ids of one folder are as before: caches stay valid
    table = pa.table({"png": [_png_bytes(1)] * 4, "image": [_png_bytes(2)] * 4, "cls": [0, 1, 0, 1]})
    pq.write_table(table, tmp_path / "two.parquet")
    with pytest.raises(TlfeatError, match=r"2 columns that could hold the images \(png, image\)"):
        datasets.load_split(str(tmp_path / "two.parquet"), "train")
