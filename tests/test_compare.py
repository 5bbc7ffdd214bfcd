from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tlfeat.compare import CompareConfig, check, compare
from tlfeat.errors import TlfeatError
from tlfeat.report import build, rows
from tlfeat_cli.main import cli

from .conftest import NO_WEIGHTS_HERE, make_tree


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[CompareConfig, Path]:
    """Two methods x two tiny datasets, one repeat, plus a backbone whose cells fail (no weights)."""
    root = tmp_path_factory.mktemp("cmp")
    a = make_tree(root / "ants_bees", per_class=6, classes=("ants", "bees"))
    b = make_tree(root / "shapes", per_class=6)
    cfg = CompareConfig(
        models=("resnet18:untrained", NO_WEIGHTS_HERE),
        datas=(str(a), str(b)),
        methods=("logreg", "finetune:head"),
        epochs=1,
        image_size=32,
        workers=0,
        out=root / "report",
        cache_dir=root / "cache",
        results_dir=root / "results",
    )
    compare(cfg, echo=lambda _line: None)
    return cfg, root / "report"


def test_small_matrix_produces_every_file(small_run: tuple[CompareConfig, Path]) -> None:
    _, out = small_run
    for name in ("report.md", "report.html", "rows.csv", "compare.json", "failures.json"):
        assert (out / name).is_file(), name
    for name in ("accuracy_vs_time.png", "learning_curves.png", "confusion_ants-bees.png", "confusion_shapes.png"):
        assert (out / "plots" / name).stat().st_size > 5000
    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert html.count("data:image/png;base64,") == len(pngs) >= 6  # self-contained, with each run's curves
    for name in ("summary.csv", "tables.tex"):
        assert (out / name).stat().st_size > 100
    assert "Recommendation" in html


def test_failed_cells_are_reported_and_the_rest_complete(small_run: tuple[CompareConfig, Path]) -> None:
    _, out = small_run
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert len(failures) == 4 and all(NO_WEIGHTS_HERE in k for k in failures)
    assert all("WeightsNotFound" in v for v in failures.values())
    assert "Failed cells (4)" in (out / "report.md").read_text()
    assert len(rows(out)) == 4  # resnet18 x 2 datasets x 2 methods


def test_table_values_equal_the_saved_records(small_run: tuple[CompareConfig, Path]) -> None:
    _, out = small_run
    with open(out / "rows.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4
    for row in table:
        record = json.loads((out / row["record"]).read_text())
        binary = record["n_classes"] == 2
        assert float(row["accuracy"]) == record["metrics"]["accuracy"]
        assert float(row["metric"]) == record["metrics"]["accuracy"]  # ranked by accuracy, binary tasks too
        assert row["metric_name"] == "accuracy"
        if binary:
            assert float(row["roc_auc"]) == record["metrics"]["roc_auc"]
        assert row["model"] == "resnet18 (UNTRAINED)"
    md = (out / "report.md").read_text()
    for row in table:
        assert f"{float(row['accuracy']):.4f}" in md


def test_report_rebuilds_identical_output(small_run: tuple[CompareConfig, Path]) -> None:
    _, out = small_run
    before = {n: (out / n).read_text() for n in ("report.md", "report.html", "rows.csv")}
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert {n: (out / n).read_text() for n in before} == before


def test_second_compare_reuses_everything(small_run: tuple[CompareConfig, Path]) -> None:
    cfg, out = small_run
    lines: list[str] = []
    records_before = sorted(p.stat().st_mtime_ns for p in cfg.runs_dir.glob("*/*/record.json"))
    compare(cfg, echo=lines.append)
    # The 4 failed cells are tried again (and fail again); the 4 completed ones are reused.
    assert lines[0] == "plan: 8 cells: 2 extract + fit, 2 fine-tune, 4 reuse"
    assert sorted(p.stat().st_mtime_ns for p in cfg.runs_dir.glob("*/*/record.json")) == records_before


def test_unknown_names_are_reported_all_at_once() -> None:
    cfg = CompareConfig(
        models=("resnet5", "mobilenet_v2:frozen"),
        datas=("digits", "nowhere"),
        methods=("logreg", "knnn", "finetune:freeze"),
    )
    with pytest.raises(TlfeatError) as info:
        check(cfg)
    message = str(info.value)
    assert message.startswith("5 problem(s), nothing was run")
    for part in ("resnet5", "':untrained'", "nowhere", "'knnn'", "unknown strategy 'freeze'"):
        assert part in message


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TlfeatError, match="holds no results"):
        build(tmp_path)


def test_layer_sweep_reports_accuracy_per_layer(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "shapes", per_class=4)
    cfg = CompareConfig(
        models=("resnet18:untrained",),
        datas=(str(tree),),
        methods=("logreg",),
        layers=("layer1", "layer3", "penultimate"),
        image_size=32,
        workers=0,
        out=tmp_path / "report",
        cache_dir=tmp_path / "cache",
    )
    compare(cfg, echo=lambda _line: None)
    layers = sorted(r["layer"] for r in rows(tmp_path / "report"))
    assert layers == ["layer1", "layer3", "penultimate"]
    assert (tmp_path / "report" / "plots" / "layer_depth.png").is_file()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Accuracy per feature layer" in md and "## Layer-wise probe" in md
