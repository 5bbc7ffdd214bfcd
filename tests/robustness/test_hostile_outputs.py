"""What tlfeat writes and reads back, against hostile names and edited files (the second hostile round, issue 19).

Reports (items 1, 4, 5, 6, 16), the cache folder (10), extraction (11, 14, 15) and fit (17). One small
comparison of two datasets that share a hostile folder name is made once and read by several tests.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tlfeat import ExtractConfig, extract
from tlfeat.compare import compare
from tlfeat.config import CompareConfig
from tlfeat.errors import TlfeatError
from tlfeat.report import build, rows

from ..conftest import make_tree
from .helpers import FAST, assert_one_clear_line, env

HOSTILE = '=HYPERLINK("x")<script>&%$#_{}~^\\|'  # a legal folder name that every output format must escape
CLASSES = ("=1+2", "<b>x", "a|b")


def run(*args: str | Path, timeout: float = 300, cwd: Path | None = None, **extra: str) -> Any:
    """`tlfeat ARGS` as a real process that may not run past `timeout`."""
    return subprocess.run(
        [sys.executable, "-m", "tlfeat_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env(**extra),
    )


def _cfg(tmp: Path, datas: tuple[str, ...], methods: tuple[str, ...], **kw: Any) -> CompareConfig:
    return CompareConfig(
        models=("resnet18:untrained",), datas=datas, methods=methods, image_size=16, workers=0, epochs=1,
        out=tmp / "report", results_dir=tmp / "report" / "results", cache_dir=tmp / "cache", progress=False, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A report of two different datasets in folders of the same hostile name (logreg and a fine-tune)."""
    root = tmp_path_factory.mktemp("twins")
    a = make_tree(root / "twin" / "a" / HOSTILE, per_class=5, classes=CLASSES)
    b = make_tree(root / "twin" / "b" / HOSTILE, per_class=3, classes=CLASSES[:2])
    compare(_cfg(root, (str(a), str(b)), ("logreg", "finetune:head")), echo=lambda _line: None)
    return root / "report", [str(a), str(b)]


# --------------------------------------------------------------------------- item 1: a dataset is what it is


def test_item1_two_datasets_of_one_folder_name_stay_two_everywhere(twins: tuple[Path, list[str]]) -> None:
    out, ids = twins
    found = rows(out)
    assert len({r["dataset"] for r in found}) == 2  # not one dataset "data" with the runs of both
    labels = {r["dataset_id"]: r["dataset"] for r in found}
    assert sorted(labels) == sorted(ids) and len(set(labels.values())) == 2
    assert labels[ids[0]].startswith(HOSTILE) and labels[ids[0]].endswith("(a)") and labels[ids[1]].endswith("(b)")
    assert {r["n_test"] for r in found if r["dataset_id"] == ids[0]} == {15}
    assert {r["n_test"] for r in found if r["dataset_id"] == ids[1]} == {6}
    with open(out / "summary.csv") as fh:
        summary = [r for r in csv.DictReader(fh) if r["method"] == "logreg"]
    assert sorted(r["dataset_id"] for r in summary) == sorted(ids) and {r["n_runs"] for r in summary} == {"1"}
    assert len(list((out / "plots").glob("confusion_*.png"))) == 2
    assert len(list((out / "plots").glob("history_*.png"))) == 2
    md = (out / "report.md").read_text()
    assert md.count("the most accurate is") == 2  # one recommendation per dataset
    tex = (out / "tables.tex").read_text()
    header = next(line for line in tex.splitlines() if line.startswith("Model & "))
    assert header.count(" & ") == 2  # model and two dataset columns


# --------------------------------------------------------------------------- item 16: escaping per format


def test_item16_hostile_names_are_escaped_for_each_format(twins: tuple[Path, list[str]]) -> None:
    out, _ = twins
    escaped = (
        r'=HYPERLINK("x")\textless{}script\textgreater{}\&\%\$\#\_\{\}\textasciitilde{}\textasciicircum{}'
        r"\textbackslash{}|"
    )
    table = (out / "tables.tex").read_text()
    assert escaped + " (a)" in table and "\\textbackslash\\{\\}" not in table
    assert "^" not in table.replace("\\textasciicircum{}", "") and "~" not in table.replace("\\textasciitilde{}", "")
    for name in ("rows.csv", "summary.csv"):
        with open(out / name) as fh:
            for row in csv.DictReader(fh):
                assert row["dataset"].startswith("'=HYPERLINK") and row["dataset_id"].startswith("/"), row
    raw = (out / "report.md").read_text()
    assert '\n  "models": [\n' in raw  # the config block keeps its lines
    md = re.sub(r"(?ms)^```.*?^```", "", raw)  # a fenced block shows text as it is
    assert "<script>" not in md and "<b>x" not in md and "\\<script\\>" in md
    assert "- **=HYPERLINK" in md and "\\x02" not in md  # the report's own emphasis, and only its own
    assert "| \\=1+2 |" in md or "| =1+2 |" in md  # a class name in a table cell
    assert "a\\|b" in md and "| a|b |" not in md
    html = (out / "report.html").read_text()
    assert "<script>" not in html and "<b>x" not in html and "&lt;script&gt;" in html
    assert "<li><b>=HYPERLINK" in html and "\\x02" not in html


# --------------------------------------------------------------------------- item 5: only folders tlfeat made


def test_item5_report_writes_only_into_folders_it_made(twins: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, _ = twins
    assert json.loads((out / ".tlfeat-report").read_text())["plots"]  # the marker lists the plots it wrote
    mine = tmp_path / "mine"
    (mine / "results").mkdir(parents=True)
    (mine / "plots").mkdir()
    (mine / "plots" / "holiday.png").write_bytes(b"my photo")
    (mine / "report.md").write_text("my notes")
    proc = run("report", mine)
    assert_one_clear_line(proc, "was not made by `tlfeat compare`", ".tlfeat-report")
    assert (mine / "plots" / "holiday.png").read_bytes() == b"my photo" and (
        mine / "report.md"
    ).read_text() == "my notes"
    assert_one_clear_line(run("report", "", cwd=mine), "report needs a folder")
    small = ["--image-size", "16", "--limit", "50", "--test-limit", "20", "--cache-dir", tmp_path / "cache", "-q"]
    proc = run(
        "compare", "--models", "resnet18:untrained", "--data", "digits", "--methods", "logreg", *small, "--out", mine
    )
    assert_one_clear_line(proc, "tlfeat did not make", "choose a new or empty folder")
    assert sorted(p.name for p in mine.rglob("*")) == ["holiday.png", "plots", "report.md", "results"]

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "plots" / "holiday.png").write_bytes(b"my photo")  # not listed in the marker: never removed
    marker = json.loads((copy / ".tlfeat-report").read_text())
    (copy / "plots" / "confusion_gone.png").write_bytes(b"an old plot")  # listed: tlfeat wrote it, and removes it
    (copy / ".tlfeat-report").write_text(json.dumps({**marker, "plots": [*marker["plots"], "confusion_gone.png"]}))
    build(copy)
    assert (copy / "plots" / "holiday.png").exists() and not (copy / "plots" / "confusion_gone.png").exists()
    pictures = tmp_path / "pictures"  # plots/ a link to a folder of the user's: written into, it would lose files
    pictures.mkdir()
    (pictures / "accuracy_vs_time.png").write_bytes(b"my chart")
    shutil.rmtree(copy / "plots")
    (copy / "plots").symlink_to(pictures)
    with pytest.raises(TlfeatError, match="is a link"):
        build(copy)
    assert [p.name for p in pictures.iterdir()] == ["accuracy_vs_time.png"]
    assert (pictures / "accuracy_vs_time.png").read_bytes() == b"my chart"


def test_item5_the_example_report_rebuilds_as_committed(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "docs" / "example-report"
    copy = tmp_path / "example-report"
    shutil.copytree(example, copy)
    proc = run("report", copy)
    assert proc.returncode == 0, proc.stderr
    for name in ("report.md", "rows.csv", "summary.csv", "tables.tex"):
        assert (copy / name).read_text() == (example / name).read_text(), name
    assert sorted(p.name for p in (copy / "plots").iterdir()) == sorted(p.name for p in (example / "plots").iterdir())


# --------------------------------------------------------------------------- item 6: paths read back are confined


def test_item6_no_path_read_from_a_record_or_compare_json_leads_outside(
    twins: tuple[Path, list[str]], tmp_path: Path
) -> None:
    out, _ = twins
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nSECRET-KEY-MATERIAL" * 40)
    tuned = next((copy / "results" / "finetunes").glob("*/record.json"))
    record = json.loads(tuned.read_text())
    record["details"]["plot"] = str(secret)  # an absolute path
    tuned.write_text(json.dumps(record))
    build(copy)
    html, md = (copy / "report.html").read_text(), (copy / "report.md").read_text()
    assert base64.b64encode(secret.read_bytes()).decode()[:40] not in html
    assert "Runs left out (1)" in md and "details.plot" in md
    for bad in ("../../../secret.png", "sub/../../secret.png"):
        record["details"]["plot"] = bad
        tuned.write_text(json.dumps(record))
        build(copy)
        assert "Runs left out (1)" in (copy / "report.md").read_text()
    (copy / "results" / "finetunes" / tuned.parent.name / "escape.png").symlink_to(secret)  # a link out
    record["details"]["plot"] = "escape.png"
    tuned.write_text(json.dumps(record))
    build(copy)
    assert "Runs left out (1)" in (copy / "report.md").read_text()

    # compare.json naming a record outside the results folder (absolute, or `..` out of it)
    elsewhere = tmp_path / "elsewhere" / "fits" / "x"
    elsewhere.mkdir(parents=True)
    fit = next((copy / "results" / "fits").glob("*/record.json"))
    shutil.copy(fit, elsewhere / "record.json")
    meta = json.loads((copy / "compare.json").read_text())
    meta["records"] = [str(elsewhere / "record.json"), "../elsewhere/fits/x/record.json"]
    (copy / "compare.json").write_text(json.dumps(meta))
    before = (copy / "report.md").read_text()
    with pytest.raises(TlfeatError, match="no run of the report .* could be read.*nothing in it was changed"):
        build(copy)  # nothing but those two: the report there is kept, not emptied
    assert (copy / "report.md").read_text() == before
    meta["records"].append(os.path.relpath(fit, copy))
    (copy / "compare.json").write_text(json.dumps(meta))
    build(copy)
    md = (copy / "report.md").read_text()
    assert "Runs left out (2)" in md and "leads outside" not in md and md.count("missing (looked in") == 1

    # a classifier entry naming a file outside its run's folder is never loaded
    from tlfeat.fitting import load_classifier

    data = json.loads(fit.read_text())
    outside = tmp_path / "classifier.npz"
    shutil.copy(fit.parent / data["provenance"]["classifier"]["file"], outside)
    data["provenance"]["classifier"]["file"] = str(outside)
    fit.write_text(json.dumps(data))
    with pytest.raises(TlfeatError, match="leads outside|not a relative path"):
        load_classifier(fit)


def test_item5_a_report_moved_copied_or_damaged_keeps_its_runs_or_is_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runs lie in the project's one result store (./results), not in the report folder."""
    project = tmp_path / "project"
    tree = make_tree(project / "tree", per_class=3)
    project.joinpath("cache").mkdir()
    made = run(
        "compare", "--models", "resnet18:untrained", "--data", tree, "--methods", "logreg,svm",
        "--image-size", "16", "--out", "report", "--cache-dir", "cache", "--results-dir", "results", "-q", cwd=project,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert not (project / "report" / "results").exists() and (project / "results").is_dir()
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    project.rename(moved)  # the whole project, report and result store together
    rebuilt = run("report", moved / "report", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert len(rows(moved / "report")) == 2 and "Runs left out" not in (moved / "report" / "report.md").read_text()

    alone = tmp_path / "alone"
    shutil.copytree(moved / "report", alone)  # the report folder alone: its runs are nowhere it can see
    kept = {p.name: p.read_bytes() for p in alone.rglob("*") if p.is_file()}
    assert_one_clear_line(run("report", alone, cwd=tmp_path), "no run of the report", "TLFEAT_RESULTS_DIR")
    assert {p.name: p.read_bytes() for p in alone.rglob("*") if p.is_file()} == kept  # not one file touched
    found = run("report", alone, cwd=tmp_path, TLFEAT_RESULTS_DIR=str(moved / "results"))
    assert found.returncode == 0, found.stderr
    monkeypatch.setenv("TLFEAT_RESULTS_DIR", str(moved / "results"))
    assert len(rows(alone)) == 2
    monkeypatch.undo()

    (alone / "compare.json").write_text("{")  # damaged: no list of runs, and none under alone/results
    kept = {p.name: p.read_bytes() for p in alone.rglob("*") if p.is_file()}
    assert_one_clear_line(run("report", alone, cwd=tmp_path), "no run of the report", "compare.json is unreadable")
    assert {p.name: p.read_bytes() for p in alone.rglob("*") if p.is_file()} == kept


def test_item5_a_rerun_into_the_same_out_adds_to_its_report_and_never_silently_replaces_it(tmp_path: Path) -> None:
    tree = str(make_tree(tmp_path / "tree", per_class=3))
    quiet: Any = lambda _line: None  # noqa: E731
    compare(_cfg(tmp_path, (tree,), ("logreg",)), echo=quiet)
    report = tmp_path / "report" / "report.md"
    first = report.read_text()
    with pytest.raises(
        TlfeatError, match=r"holds the report of another comparison \(--limit null there, 4 here\).*--replace"
    ):
        compare(_cfg(tmp_path, (tree,), ("logreg",), limit=4), echo=quiet)
    assert report.read_text() == first
    compare(_cfg(tmp_path, (tree,), ("logreg", "svm")), echo=quiet)  # a method added: the report covers both
    assert {r["method"] for r in rows(tmp_path / "report")} == {"logreg", "svm"}
    compare(_cfg(tmp_path, (tree,), ("logreg",), limit=4, replace=True), echo=quiet)
    assert [(r["method"], r["n_train"]) for r in rows(tmp_path / "report")] == [("logreg", 4)]


# --------------------------------------------------------------------------- item 4: outputs outside the data


def test_item4_outputs_inside_a_dataset_folder_are_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=3)
    (tmp_path / "alias").symlink_to(tree / "train")  # the same folder by another name
    common = ["compare", "--models", "resnet18:untrained", "--data", tree, "--methods", "logreg", "--image-size", "16"]
    for extra, needle in (
        (["--out", tree / "report"], "--out"),
        (["--out", tmp_path / "alias" / "report"], "--out"),
        (["--out", tmp_path / "r", "--results-dir", tree / "runs"], "--results-dir"),
        (["--out", tmp_path / "r", "--cache-dir", tree / "cache"], "--cache-dir"),
    ):
        assert_one_clear_line(run(*common, *extra), needle, "inside the dataset folder")
    proc = run("extract", "--data", tree, *FAST, "--cache-dir", tree / "val" / "cache")
    assert_one_clear_line(proc, "--cache-dir", "inside the dataset folder")
    assert sorted(p.name for p in tree.iterdir()) == ["train", "val"] and not (tmp_path / "r").exists()
    assert not any(p.name in ("report", "runs", "cache") for p in tree.rglob("*"))


# --------------------------------------------------------------------------- item 10: one bad cache entry


def _digits_pair(cache_dir: Path, **kw: Any) -> None:
    extract(
        ExtractConfig(
            model="resnet18", data="digits", untrained=True, image_size=16, workers=0, cache_dir=cache_dir,
            progress=False, test_limit=20, **kw,
        )
    )  # fmt: skip


def test_item10_one_bad_entry_in_the_cache_is_listed_and_the_rest_served(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _digits_pair(cache_dir, limit=40)
    bad = cache_dir / "resnet18__x__train__0000000000000000.h5.partial"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"attrs": [1, 2], "key": {"a": 1}}')
    other = cache_dir / "resnet18__y__train__0000000000000000.h5.partial"
    other.mkdir()
    (other / "manifest.json").write_text("not json")
    (cache_dir / "loop.h5").symlink_to("loop.h5")
    piped = cache_dir / "resnet18__w__train__0000000000000000.h5.partial"
    piped.mkdir()
    os.mkfifo(piped / "manifest.json")  # read, it would be waited on forever
    os.mkfifo(piped / "0000000000-0000000004.npz")
    os.mkfifo(cache_dir / "pipe__z__train__0000000000000000.h5")
    (cache_dir / "dir__z__test__0000000000000000.h5").mkdir()
    (cache_dir / "cut__z__test__0000000000000000.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    for quick in ([], ["--quick"]):
        proc = run("ls", "--cache-dir", cache_dir, *quick, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count(" ok ") == 2 and proc.stdout.count("DAMAGED") >= 8, proc.stdout
        assert "Too many levels of symbolic links" in proc.stdout and "is a FIFO" in proc.stdout
        assert "manifest.json is missing or malformed" in proc.stdout
    proc = run("fit", "--clf", "logreg", "--cache-dir", cache_dir, "--results-dir", tmp_path / "results", timeout=120)
    assert proc.returncode == 0 and "accuracy" in proc.stdout, proc.stderr
    _digits_pair(cache_dir, limit=40)  # extract over the same folder still works


# --------------------------------------------------------------------------- item 11: an empty split is an error


def test_item11_a_split_whose_every_image_was_skipped_writes_nothing(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=3, classes=("ants", "bees"))
    for path in (tree / "train").rglob("*.*"):
        path.write_bytes(b"not an image")
    cache_dir = tmp_path / "cache"
    proc = run("extract", "--data", tree, *FAST, "--on-error", "skip", "--cache-dir", cache_dir)
    assert_one_clear_line(proc, "every one of the 6 image(s) of split 'train'", "cannot decode image")
    assert not [p for p in cache_dir.glob("*train*") if not p.name.endswith(".lock")], list(cache_dir.iterdir())


# --------------------------------------------------------------------------- item 14: one backend per pair


@pytest.mark.slow
def test_item14_train_from_torch_then_a_plain_extract_pairs_and_fit_advice_works(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    tree = make_tree(tmp_path / "tree", per_class=4, classes=("ants", "bees"))
    auto = {"TLFEAT_BACKEND": ""}  # the default: ONNX Runtime on CPU where it is installed
    common = ["--data", tree, *FAST, "--cache-dir", tmp_path / "cache"]
    fit = ["fit", "--clf", "logreg", "--cache-dir", tmp_path / "cache", "--results-dir", tmp_path / "results"]
    assert run("extract", *common, "--backend", "torch", "--split", "train", **auto).returncode == 0
    proc = run("extract", *common, **auto)
    assert proc.returncode == 0, proc.stderr
    assert "train: 8 x 512  cached, no work done [torch]" in proc.stdout and "test: 8 x 512  computed" in proc.stdout
    assert "[onnxruntime]" not in proc.stdout
    assert run(*fit, **auto).returncode == 0

    # A test split from the other backend, asked for by name: fit names the one command that pairs them.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "cache", other, ignore=shutil.ignore_patterns("*test*"))
    common = ["--data", tree, *FAST, "--cache-dir", other]
    assert run("extract", *common, "--backend", "onnxruntime", "--split", "test", **auto).returncode == 0
    fit = ["fit", "--clf", "logreg", "--cache-dir", other, "--results-dir", tmp_path / "results"]
    line = assert_one_clear_line(run(*fit, **auto), "come from backend torch", "from onnxruntime")
    command = shlex.split(line.split("run `", 1)[1].rstrip("`"))
    assert command[:2] == ["tlfeat", "extract"] and "--backend" in command and "torch" in command
    assert run(*command[1:], **auto).returncode == 0
    proc = run(*fit, **auto)
    assert proc.returncode == 0 and "accuracy" in proc.stdout, proc.stderr


def test_item14_auto_chooses_the_backend_whose_files_cover_the_request(tmp_path: Path) -> None:
    from tlfeat.extraction import plan

    tree = make_tree(tmp_path / "tree", per_class=3, classes=("ants", "bees"))
    kw: dict[str, Any] = dict(model="resnet18", data=str(tree), untrained=True, image_size=16, cache_dir=tmp_path)
    [torch_train] = plan(ExtractConfig(backend="torch", splits=("train",), **kw))
    torch_train.path.write_bytes(b"")  # a file of that name is all the choice looks at
    assert {t.key_fields["backend"] for t in plan(ExtractConfig(backend="auto", **kw))} == {"torch"}
    assert {t.key_fields["backend"] for t in plan(ExtractConfig(backend="onnxruntime", **kw))} == {"onnxruntime"}


# --------------------------------------------------------------------------- item 15: skipped images are retried


def test_item15_an_image_skipped_once_is_read_again_once_it_reads(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=3, classes=("ants", "bees"))
    image = tree / "train" / "bees" / "1.png"
    good, st = image.read_bytes(), image.stat()
    image.write_bytes(bytes(len(good)))  # unreadable, same size
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    cfg = ExtractConfig(
        model="resnet18", data=str(tree), untrained=True, image_size=16, workers=0, splits=("train",),
        on_error="skip", cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    [first] = extract(cfg)
    assert [s["id"] for s in first.meta["skipped"]] == ["train/bees/1.png"] and len(first) == 5
    image.write_bytes(good)  # back, with the same size and time: only its content says it changed
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    [second] = extract(cfg)
    assert not second.reused and second.changes.summary() == "1 unreadable before, readable now"
    assert second.meta["skipped"] == [] and len(second) == 6 and second.meta["computed_rows"] == 1
    [third] = extract(cfg)
    assert third.reused


# --------------------------------------------------------------------------- item 17: fit variants, touched files


def test_item17_fit_over_every_variant_skips_and_names_a_one_class_variant(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _digits_pair(cache_dir, limit=40)
    _digits_pair(cache_dir, limit=1)  # one training image: one class
    proc = run("fit", "--clf", "logreg", "--cache-dir", cache_dir, "--results-dir", tmp_path / "results")
    assert proc.returncode == 0, proc.stderr
    assert "n_train 40" in proc.stdout and "n_train 1" not in proc.stdout
    assert "skipped: " in proc.stderr and "limit=1" in proc.stderr and "one class only" in proc.stderr
    proc = run("fit", "--clf", "logreg", "--limit", "1", "--cache-dir", cache_dir, "--results-dir", tmp_path / "r")
    assert_one_clear_line(proc, "one class only")  # asked for by name: an error


def test_item17_a_touched_image_is_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlfeat.datasets import ImageSplit

    tree = make_tree(tmp_path / "tree", per_class=3, classes=("ants", "bees"))
    cfg = ExtractConfig(
        model="resnet18", data=str(tree), untrained=True, image_size=16, workers=0, splits=("train",),
        cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    extract(cfg)
    for path in (tree / "train").rglob("*.*"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    hashed: list[int] = []
    real = ImageSplit.content_digest
    monkeypatch.setattr(ImageSplit, "content_digest", lambda self, i: hashed.append(i) or real(self, i))
    for expected in (6, 0, 0):
        hashed.clear()
        [fs] = extract(cfg)
        assert fs.reused and len(hashed) == expected
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tree / "train" / "ants" / "0.jpg")  # a real change
    [fs] = extract(cfg)
    assert fs.changes is not None and fs.changes.summary() == "1 modified"


# --------------------------------------------------------------------------- item 13: names at their limits


def test_item13_class_names_at_their_limits_make_a_whole_report(tmp_path: Path) -> None:
    """A `$` formula that is no formula, bytes that are not UTF-8, a 200-character name, a dash first."""
    odd = os.fsdecode(b"caf\xe9")  # a Latin-1 folder name, as an old camera card has
    tree = make_tree(tmp_path / "d", per_class=4, classes=("$\\alpha^$", odd, "x" * 200, "-rf"))
    compare(_cfg(tmp_path, (str(tree),), ("logreg",)), echo=lambda _line: None)
    out = tmp_path / "report"
    md = (out / "report.md").read_text()
    assert "caf\\\\xe9" in md and "\\$\\\\alpha^\\$" in md and "x" * 200 in md
    assert (out / "plots" / "confusion_d.png").stat().st_size > 5000
    proc = run("report", out)
    assert proc.returncode == 0, proc.stderr


def test_item13_report_reads_no_fifo_and_survives_nested_json(twins: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, _ = twins
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "compare.json").unlink()  # every record under results/ is read then
    (copy / "results" / "fits" / "zz").mkdir()
    os.mkfifo(copy / "results" / "fits" / "zz" / "record.json")
    proc = run("report", copy, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (copy / "report.md").read_text()
    assert "Runs left out (1)" in md and "not a regular file" in md
    (copy / "compare.json").write_text("[" * 100_000 + "]" * 100_000)
    proc = run("report", copy, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "compare.json is unreadable or malformed" in (copy / "report.md").read_text()


def test_item13_of_two_runs_made_in_one_second_the_later_written_is_the_newest(
    twins: tuple[Path, list[str]], tmp_path: Path
) -> None:
    out, _ = twins
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "compare.json").unlink()  # every record under results/, the newest of each configuration
    first = next((copy / "results" / "fits").glob("*/record.json"))
    again = first.parent.with_name(first.parent.name + "-again") / "record.json"
    again.parent.mkdir()
    data = json.loads(first.read_text())
    again.write_text(json.dumps({**data, "n_train": 999}))  # the same `created`, to the second
    for newer, n_train in ((again, 999), (first, data["n_train"])):
        os.utime(newer, ns=(newer.stat().st_atime_ns, max(first.stat().st_mtime_ns, again.stat().st_mtime_ns) + 10**9))
        shown = {r["n_train"] for r in rows(copy) if r["record"].startswith("results/fits/" + first.parent.name)}
        assert shown == {n_train}
