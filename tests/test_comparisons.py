"""Comparisons a reviewer would accept: whole test sets, honest intervals, paired tests, flagged chance runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tlfeat import ExtractConfig, config, extract, metrics, stats
from tlfeat.compare import compare
from tlfeat.config import CompareConfig, FinetuneConfig
from tlfeat.finetune import finetune_one
from tlfeat.fitting import FitConfig, fit, table
from tlfeat_cli.main import cli

from .conftest import NO_WEIGHTS_HERE, make_tree


def _small(tmp_path: Path, datas: tuple[str, ...], methods: tuple[str, ...], **kw: object) -> CompareConfig:
    """A comparison small enough for a test: random-weight ResNet-18 at 16 px, report and cache under tmp_path."""
    return CompareConfig(
        models=("resnet18:untrained",), datas=datas, methods=methods, image_size=16, workers=0,
        out=tmp_path / "report", cache_dir=tmp_path / "cache", progress=False, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_wilson_interval_agrees_with_scipy_and_by_hand() -> None:
    from scipy.stats import binomtest

    for k, n in ((81, 100), (0, 20), (20, 20), (9741, 10000), (3, 600)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert stats.wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    # By hand, 81 of 100: centre (0.81 + 1.96^2/200) / (1 + 1.96^2/100) = 0.7985, half-width 0.0763.
    low, high = stats.wilson(81, 100)
    assert low == pytest.approx(0.7222, abs=1e-4) and high == pytest.approx(0.8749, abs=1e-4)


def test_mcnemar_exact_p_values() -> None:
    from scipy.stats import binomtest

    a = np.array([True] * 10 + [False] * 2 + [True] * 50)
    b = np.array([False] * 10 + [True] * 2 + [True] * 50)
    test = stats.mcnemar(a, b)
    assert (test.b, test.c) == (10, 2)
    assert test.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 P(X <= 2), X ~ Binomial(12, 1/2)
    assert test.verdict() == "first better"
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random(500) < 0.8, rng.random(500) < 0.78
        t = stats.mcnemar(a, b)
        assert t.p_value == pytest.approx(binomtest(min(t.b, t.c), t.b + t.c, 0.5).pvalue, rel=1e-9)
    same = stats.mcnemar(a, a)
    assert same.p_value == 1.0 and same.verdict() == "indistinguishable"
    tied = stats.mcnemar(np.array([True, False]), np.array([False, True]))  # 2 P(X <= 1), X ~ B(2, 1/2) = 1.5
    assert (tied.b, tied.c, tied.p_value) == (1, 1, 1.0)  # a probability: at most 1
    assert stats.McNemar(9, 1, 0.05).verdict() == "indistinguishable"  # significant means p < 0.05
    assert stats.McNemar(9, 1, 0.0499).verdict() == "first better"
    # Edges mutmut showed untested (see tests/mutants/run.py): no test images, no run at all.
    assert stats.wilson(0, 0) == (0.0, 1.0) and stats.chance(np.array([], dtype=int)) == 0.0


def test_constant_predictions_and_chance_level_runs_are_flagged() -> None:
    y = np.repeat(np.arange(10), 60)
    constant = metrics.evaluate(y, np.zeros_like(y), None, [str(i) for i in range(10)])
    assert constant["near_chance"] == "predicts one class for every image" and constant["accuracy"] == 0.1
    rng = np.random.default_rng(0)
    guess = rng.integers(0, 10, len(y))  # guessing: about 10%
    assert "within noise of chance" in (
        metrics.evaluate(y, guess, None, [str(i) for i in range(10)])["near_chance"] or ""
    )
    good = np.where(rng.random(len(y)) < 0.5, y, (y + 1) % 10)
    assert metrics.evaluate(y, good, None, [str(i) for i in range(10)])["near_chance"] is None


def test_limit_never_cuts_the_test_split(tmp_path: Path) -> None:
    base = dict(
        model="resnet18", data="digits", untrained=True, image_size=16, workers=0, cache_dir=tmp_path, progress=False
    )
    train, test = extract(ExtractConfig(**base, limit=100))  # type: ignore[arg-type]
    assert len(train) == 100 and len(test) == 450  # the whole test split
    _, small_test = extract(ExtractConfig(**base, limit=100, test_limit=50))  # type: ignore[arg-type]
    assert len(small_test) == 50 and small_test.path != test.path
    _, again = extract(ExtractConfig(**base, limit=200))  # type: ignore[arg-type]
    assert again.reused and again.path == test.path  # the whole test split is computed once for every budget
    tree = make_tree(tmp_path / "t", per_class=8)
    res = finetune_one(
        FinetuneConfig(
            model="resnet18",
            data=str(tree),
            strategy="scratch",
            epochs=1,
            limit=12,
            image_size=32,
            workers=0,
            batch_size=8,
            results_dir=tmp_path / "r",
            progress=False,
        )
    )
    assert res.record.n_test == 24 and res.record.n_train + res.record.details["n_val"] == 12


def test_fit_reports_every_cached_variant_of_a_pair(tmp_path: Path) -> None:
    base = dict(
        model="resnet18", data="digits", untrained=True, workers=0, cache_dir=tmp_path / "c", progress=False, limit=200
    )
    for size in (16, 24):
        extract(ExtractConfig(**base, image_size=size))  # type: ignore[arg-type]
    results = fit(FitConfig(C=1.0, cache_dir=tmp_path / "c", results_dir=tmp_path / "r"))
    assert sorted(r.record.image_size for r in results) == [16, 24]
    rows, cols, cells = table([r.record for r in results])
    assert rows == ["resnet18 [image size 16]", "resnet18 [image size 24]"] and cols == ["digits"]
    assert all(cells[(row, "digits")] is not None for row in rows)
    picked = fit(FitConfig(C=1.0, image_size=24, cache_dir=tmp_path / "c", results_dir=tmp_path / "r"))
    assert [r.record.image_size for r in picked] == [24] and picked[0].reused


def test_augmentation_defaults_follow_the_data(tmp_path: Path) -> None:
    from tlfeat.training import resolve_augment

    def augment(data: str, **kw: object) -> str:
        return resolve_augment(FinetuneConfig(model="resnet18", data=data, **kw), data)  # type: ignore[arg-type]

    assert augment("digits") == augment("mnist") == "crop"  # a mirrored digit is another digit, or none
    assert augment("fashion-mnist") == "flip"
    assert augment(str(tmp_path)) == "standard"
    assert augment("mnist", augment="none") == "none"


@pytest.mark.slow
def test_a_small_comparison_has_intervals_paired_tests_per_class_tables_and_exports(tmp_path: Path) -> None:
    cfg = _small(
        tmp_path, ("digits",), ("logreg", "svm", "scratch"), repeats=2, resample=True, limit=150, test_limit=200,
        epochs=1, scratch_epochs=2,
    )  # fmt: skip
    compare(cfg, echo=lambda _line: None)
    out = tmp_path / "report"
    md = (out / "report.md").read_text()
    for needle in ("95% CI", "vs best", "McNemar", "digits: per class", "Amortised cost", "n_test"):
        assert needle in md, needle
    with open(out / "rows.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["n_test"] for r in rows} == {"200"}
    assert len({r["subset_seed"] for r in rows if r["method"] == "logreg"}) == 2  # --resample: two training subsets
    with open(out / "summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert {r["method"] for r in summary} == {"logreg", "svm", "scratch"} and all(r["n_runs"] == "2" for r in summary)
    for r in summary:
        assert float(r["accuracy_ci95_low"]) <= float(r["accuracy_mean"]) <= float(r["accuracy_ci95_high"])
    tex = (out / "tables.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "logreg" in tex
    rebuilt = CliRunner().invoke(cli, ["report", str(out)])
    assert rebuilt.exit_code == 0 and (out / "report.md").read_text() == md


@pytest.mark.parametrize("n", [10, 13, 25, 27, 30, 3, 6, 7, 12])
def test_wilson_interval_of_a_perfect_or_null_score(n: int) -> None:
    """At 0 of n the interval is [0, z^2 / (n + z^2)], at n of n [n / (n + z^2), 1] (the score
    interval's closed form there); the bound at p itself must hold exactly, rounding or not."""
    z2 = stats.Z95**2
    assert stats.wilson(0, n) == (0.0, pytest.approx(z2 / (n + z2), rel=1e-12))
    assert stats.wilson(n, n) == (pytest.approx(n / (n + z2), rel=1e-12), 1.0)


@pytest.mark.parametrize("n", [10, 13, 25, 27, 30, 3, 6, 7, 12])
def test_wilson_interval_away_from_the_ends(n: int) -> None:
    """1 and n - 1 of n, where no clamp acts: scipy's Wilson interval, computed independently."""
    from scipy.stats import binomtest

    for correct in (1, n // 2, n - 1):
        ref = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = stats.wilson(correct, n)
        assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)
        assert 0 < low < correct / n < high < 1


def test_reports_of_a_perfect_run_and_of_damaged_or_incomplete_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tlfeat.report import build
    from tlfeat.report.rows import rows

    cfg = _small(tmp_path, ("digits",), ("logreg", "svm"), limit=60, test_limit=10)
    compare(cfg, echo=lambda _line: None)
    out = tmp_path / "report"
    records = json.loads((out / "compare.json").read_text())["records"]
    assert len(records) == 2
    # A run that gets every test image right: its interval's upper end is 1.0, and the plots are drawn.
    perfect = out / records[0]
    data = json.loads(perfect.read_text())
    data["metrics"]["accuracy"] = 1.0
    data["metrics"].pop("accuracy_ci95", None)
    perfect.write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["report", str(out)])  # an accuracy its own predictions contradict
    assert result.exit_code == 0 and "disagrees with its own predictions" in caplog.text
    assert "Runs left out (1)" in (out / "report.md").read_text()
    predictions = data["metrics"]["predictions"]
    predictions["y_pred"] = list(predictions["y_true"])
    again = metrics.evaluate(
        np.array(predictions["y_true"]), np.array(predictions["y_pred"]), None, data["class_names"]
    )
    data["metrics"].update(
        {k: again[k] for k in ("accuracy_ci95", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix")}
    )
    perfect.write_text(json.dumps(data))
    build(out)
    assert (out / "plots" / "accuracy_vs_time.png").stat().st_size > 5000
    assert "Runs left out" not in (out / "report.md").read_text()

    # A record that compare.json lists is missing: named, and the others still make the report.
    (out / records[1]).rename(out / "moved.json")
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0 and "which is missing" in caplog.text
    (out / "moved.json").rename(out / records[1])

    # Any figure its own predictions contradict (here the confusion matrix) leaves the run out.
    edited = json.loads(perfect.read_text())
    edited["metrics"]["confusion_matrix"][0][0] += 1
    perfect.write_text(json.dumps(edited))
    caplog.clear()
    build(out)
    assert "confusion_matrix disagrees with its own predictions" in caplog.text
    assert "Runs left out (1)" in (out / "report.md").read_text()
    perfect.write_text(json.dumps(data))

    # A path listed twice is one run.
    meta = json.loads((out / "compare.json").read_text())
    (out / "compare.json").write_text(json.dumps({**meta, "records": records + records[:1]}))
    assert len(rows(out)) == 2

    # A field of the wrong type: the record is skipped with a warning, no crash.
    data["metrics"]["accuracy"] = "high"
    perfect.write_text(json.dumps(data))
    for args in (["report", str(out)], ["results", "--results-dir", str(cfg.runs_dir)]):
        caplog.clear()
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0 and "not a number" in caplog.text, result.output

    # compare.json damaged: its runs (in the result store, not under the report's results/) cannot be
    # found, so the report is left as it was and the command says why.
    before = (out / "report.md").read_text()
    (out / "compare.json").write_text('{"records": 5}')
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 2 and "compare.json is unreadable or malformed" in result.output, result.output
    assert "nothing in it was changed" in result.output and (out / "report.md").read_text() == before


def test_runs_on_earlier_versions_of_the_data_are_not_pooled(tmp_path: Path) -> None:
    from tlfeat.report.rows import rows

    tree = make_tree(tmp_path / "tree", per_class=6)
    # Runs inside the report folder, as tlfeat 0.2 kept them: such folders stay readable without compare.json.
    cfg = _small(tmp_path, (str(tree),), ("logreg",), results_dir=tmp_path / "report" / "results")
    compare(cfg, echo=lambda _line: None)
    (tree / "train" / "ants" / "1.png").unlink()
    lines: list[str] = []
    compare(cfg, echo=lines.append)
    assert any("update + fit" in line for line in lines), lines  # the plan says the cell is computed again
    assert len(list((cfg.runs_dir / "fits").glob("*/record.json"))) == 2
    assert len(rows(tmp_path / "report")) == 1  # compare.json lists the current run only
    (tmp_path / "report" / "compare.json").unlink()
    [row] = rows(tmp_path / "report")  # without it, the newer of the two runs of one configuration
    assert row["n_train"] == 17


def test_compare_checks_frozen_blocks_first_and_exits_1_when_a_cell_failed(tmp_path: Path) -> None:
    common = ["--models", "resnet18:untrained", "--data", "digits", "--image-size", "16", "--limit", "50"]
    common += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "report"), "-q"]
    result = CliRunner().invoke(cli, ["compare", *common, "--methods", "finetune:freeze:99"])
    assert result.exit_code == 2 and "freeze:99 is more than the" in result.output, result.output
    assert not (tmp_path / "report").exists()
    result = CliRunner().invoke(
        cli, ["compare", *common, "--methods", "logreg", "--models", f"resnet18:untrained,{NO_WEIGHTS_HERE}"]
    )
    assert result.exit_code == 1 and "1 cell(s) failed" in result.output, result.output
    assert (tmp_path / "report" / "report.md").is_file()


def test_fit_names_the_missing_limit_variant(tmp_path: Path) -> None:
    extract(ExtractConfig(model="resnet18", data="digits", untrained=True, image_size=16, limit=40, test_limit=30,
                          workers=0, cache_dir=tmp_path, progress=False))  # fmt: skip
    result = CliRunner().invoke(cli, ["fit", "--data", "digits", "--limit", "77", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no cached train features" in result.output and "--limit 40" in result.output


def test_the_report_leads_with_a_run_better_than_chance() -> None:
    from dataclasses import dataclass

    from tlfeat.report.rows import best_of

    @dataclass
    class Stand:  # what best_of reads of a configuration
        name: str
        near_chance: str
        metric: float
        accuracy: float
        total: float

        def seconds(self, _what: str) -> float:
            return self.total

    weak = Stand("svm-rbf", "predicts one class for every image", 1.0, 1.0, 1.0)
    tied = Stand("logreg", "", 0.9, 0.9, 5.0)
    slower = Stand("finetune", "", 0.9, 0.9, 50.0)
    assert best_of([weak, tied, slower]).name == "logreg"  # type: ignore[list-item]
    assert best_of([weak]).name == "svm-rbf"  # type: ignore[list-item]


def test_a_binary_test_split_with_one_class_still_gets_a_report(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=6, classes=("ants", "bees"), splits=("train",))
    make_tree(tmp_path / "tree", per_class=3, classes=("ants",), splits=("test",), size=36)  # not train's images
    args = ["compare", "--models", "resnet18:untrained", "--data", str(tree), "--methods", "logreg,logreg"]
    args += ["--image-size", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r"), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "the most accurate is" in md and "—" in md  # no ROC AUC with one class in the test split
    assert len(json.loads((tmp_path / "r" / "compare.json").read_text())["records"]) == 1  # logreg once


def test_compare_fit_and_results_share_one_result_store(tmp_path: Path) -> None:
    """compare saves its runs in the project's results/ (TLFEAT_RESULTS_DIR): `tlfeat results` lists them,
    `tlfeat fit` with the same key reuses compare's fit, and the report points into the store."""
    cfg = _small(tmp_path, ("digits",), ("logreg",), limit=60, test_limit=20)
    assert cfg.runs_dir == config.default_results_dir() == tmp_path / "results"
    compare(cfg, echo=lambda _line: None)
    [made] = list((tmp_path / "results" / "fits").glob("*/record.json"))
    assert not (tmp_path / "report" / "results").exists()
    [listed] = json.loads((tmp_path / "report" / "compare.json").read_text())["records"]
    assert (tmp_path / "report" / listed).resolve() == made.resolve()

    shown = CliRunner().invoke(cli, ["results"])
    assert shown.exit_code == 0 and "resnet18" in shown.output and "logreg" in shown.output, shown.output
    fitted = CliRunner().invoke(
        cli,
        ["fit", "--clf", "logreg", "--model", "resnet18", "--data", "digits", "--cache-dir", str(tmp_path / "cache")],
    )
    assert fitted.exit_code == 0 and "reused" in fitted.output and str(made.parent) in fitted.output, fitted.output
    assert list((tmp_path / "results" / "fits").glob("*/record.json")) == [made]


def test_holm_adjusted_p_values_by_hand() -> None:
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 (monotone).
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([]) == []


def test_paired_bootstrap_matches_resampling_images_and_the_normal_approximation() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.85
    b = np.where(rng.random(400) < 0.2, ~a, a)  # disagrees on about 20% of the images
    d = stats.paired_bootstrap(a, b, n_boot=20_000, seed=0)
    assert d.diff == pytest.approx(a.mean() - b.mean())
    # The same bootstrap done the slow way: resample 400 image indices per replicate.
    per_image = a.astype(float) - b.astype(float)
    slow = np.array([per_image[rng.integers(0, 400, 400)].mean() for _ in range(4000)])
    assert d.low == pytest.approx(np.quantile(slow, 0.025), abs=0.006)
    assert d.high == pytest.approx(np.quantile(slow, 0.975), abs=0.006)
    se = np.sqrt(((per_image - per_image.mean()) ** 2).mean() / 400)
    assert d.low == pytest.approx(d.diff - 1.96 * se, abs=0.008) and d.high == pytest.approx(
        d.diff + 1.96 * se, abs=0.008
    )
    same = stats.paired_bootstrap(a, a)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        stats.paired_bootstrap(a, a[:10])
