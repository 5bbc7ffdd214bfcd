"""Two real processes asking for the same work at once: one computes, the other waits and reuses it."""

from __future__ import annotations

from pathlib import Path

from tlfeat import catalog

from ..conftest import make_tree
from .helpers import FAST, cli, popen


def _race(*args: str | Path) -> str:
    procs = [popen(*args) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return "".join(out for out, _ in outputs)


def test_two_extract_processes_on_the_same_key(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=16, size=48)
    cache_dir = tmp_path / "cache"
    stdout = _race("extract", "--data", tree, *FAST, "--image-size", "96", "--cache-dir", cache_dir)
    # Per split, exactly one process computed the features and the other reused them.
    assert stdout.count("computed in") == 2 and stdout.count("cached, no work done") == 2, stdout
    files = catalog.scan(cache_dir)
    assert len(files) == 2 and all(e.status == "ok" for e in files)
    assert not list(cache_dir.glob("*.partial"))


def test_two_fits_of_the_same_config(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=16, size=48)
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    assert cli("extract", "--data", tree, *FAST, "--cache-dir", cache_dir).returncode == 0
    stdout = _race("fit", "--clf", "svm", "--cache-dir", cache_dir, "--results-dir", results)
    assert stdout.count("reused") == 1 and stdout.count("fit ") == 1, stdout
    assert len(list(results.glob("fits/*/record.json"))) == 1


def test_two_finetunes_of_the_same_run(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8, size=48)
    stdout = _race(
        "finetune", "--model", "resnet18", "--data", tree, "--strategy", "scratch", "--epochs", "2",
        "--image-size", "32", "--batch-size", "8", "--workers", "0", "-q", "--results-dir", tmp_path / "results",
    )  # fmt: skip
    assert stdout.count("reused") == 1 and stdout.count("trained ") == 1, stdout
    assert len(list((tmp_path / "results").glob("finetunes/*/record.json"))) == 1
