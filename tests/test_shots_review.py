"""The review of k-shot, kNN, protocols and export: `fit --shots N` through the CLI, the console's
recommendation against report.md's, k-shot runs in the CSVs, intervals inside [0, 1], kNN at a tiny
temperature and above the training set's size, the protocols' search timed as search, meta.json of
several formats, and a test split's selector named test_limit."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from tlfeat import protocols
from tlfeat.config import CompareConfig
from tlfeat.fitting import FitConfig, fit
from tlfeat.knn import KNNProbe

from .robustness.helpers import assert_one_clear_line, cli

TINY = ["--model", "resnet18:untrained", "--data", "digits", "--layer", "penultimate"]
EXPORT = ["--model", "resnet18", "--data", "digits", "--layer", "penultimate"]


# --------------------------------------------------------------------------- item 1: fit --shots N


def test_fit_shots_through_the_cli_and_shot_draw_needs_shots(tiny_features: Path, tmp_path: Path) -> None:
    where = ["--cache-dir", tiny_features, "--results-dir", tmp_path]
    proc = cli("fit", "--clf", "knn", *TINY, "--shots", "2", "--shot-draw", "1", *where, "--json")
    assert proc.returncode == 0, proc.stderr
    [record] = json.loads(proc.stdout)
    assert record["n_train"] == 20 and record["details"]["shots"]["per_class"] == 2
    assert record["details"]["shots"]["draw"] == 1
    assert_one_clear_line(cli("fit", "--clf", "knn", *TINY, "--shot-draw", "2", *where), "--shot-draw 2 needs --shots")
    assert_one_clear_line(cli("fit", "--clf", "knn", *TINY, "--shots", "2,4", *where), "--shots", "not a valid integer")
    assert_one_clear_line(cli("compare", "--models", "x", "--data", "digits", "--shot-draws", "2"), "needs --shots")


def test_duplicate_shot_counts_are_counted_once() -> None:
    assert CompareConfig(models="resnet18", datas="digits", shots="4,2,2").shots == (2, 4)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- items 2-5: compare with k-shot runs


@pytest.fixture(scope="module")
def shot_report(tiny_features: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("shot_report")
    proc = cli(
        "compare", "--models", "resnet18:untrained", "--data", "digits", "--methods", "knn", "--limit", "150",
        "--test-limit", "150", "--image-size", "16", "--shots", "1,50", "--shot-draws", "2", "--workers", "0",
        "--cache-dir", tiny_features, "--results-dir", root / "results", "--out", root / "r", "-q",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root / "r", proc.stdout + proc.stderr


def test_console_recommendation_is_report_mds(shot_report: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, console = shot_report
    said = [line for line in console.splitlines() if line.startswith("digits: ")]
    assert said and all(line in (folder / "report.md").read_text().replace("**", "") for line in said)
    # A k-shot draw made the most accurate run: the console still recommends what report.md does.
    import click
    from click.testing import CliRunner

    import tlfeat.report as report
    from tlfeat_cli.report import summary

    items = report.rows(folder)
    for r in items:
        if r["shots"] is not None:
            r["accuracy"] = r["metric"] = 1.0
    monkeypatch.setattr(report, "rows", lambda _folder: items)

    out = CliRunner().invoke(click.Command("s", callback=lambda: summary(folder, False)), [])
    assert out.exit_code == 0, out.output
    [line] = [x for x in out.output.splitlines() if x.startswith("digits: ")]
    assert line in said and "shot" not in line, out.output


def test_csvs_hold_the_k_shot_runs(shot_report: tuple[Path, str]) -> None:
    folder, _ = shot_report
    rows = list(csv.DictReader(io.StringIO((folder / "rows.csv").read_text())))
    shots = sorted((r["shots"], r["shot_draw"]) for r in rows if r["shots"])
    assert shots == [("1", "0"), ("1", "1"), ("50", "0"), ("50", "1")]
    assert any(r["shots"] == "" and r["shot_draw"] == "" for r in rows)  # the whole training set's run
    summary = list(csv.DictReader(io.StringIO((folder / "summary.csv").read_text())))
    by_k = {r["shots"]: r for r in summary}
    assert sorted(by_k) == ["", "1", "50"] and by_k["1"]["n_runs"] == "2" and by_k["1"]["n_train"] == "10"
    assert all(0.0 <= float(r[k]) <= 1.0 for r in summary for k in ("accuracy_ci95_low", "accuracy_ci95_high"))


def test_k_shot_intervals_stay_in_0_1_and_say_n(shot_report: tuple[Path, str]) -> None:
    from tlfeat.report.curves import t_interval

    mean, low, high = t_interval([0.1, 0.9])  # t(1) = 12.7: unclipped -4.6 .. 5.6
    assert (mean, low, high) == (0.5, 0.0, 1.0)
    text = (shot_report[0] / "report.md").read_text()
    cells = re.findall(r"\d\.\d{4} \((-?[\d.]+)–(-?[\d.]+), n = 2\)", text)
    assert len(cells) == 2 and all(0 <= float(a) <= float(b) <= 1 for a, b in cells), text


def test_shots_above_a_class_size_warn_once_and_the_report_says_so(
    shot_report: tuple[Path, str], tiny_features: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, console = shot_report
    assert "k = 50: 10 of 10 classes have fewer" in (folder / "report.md").read_text()
    caplog.set_level(logging.WARNING, logger="tlfeat.fitting")
    base = dict(cache_dir=tiny_features, results_dir=tmp_path, clf="knn", model="resnet18", layer="penultimate")
    runs = [fit(FitConfig(**base, shots=40, shot_draw=d))[0] for d in (0, 1)]  # type: ignore[arg-type]
    warned = [r for r in caplog.records if "--shots 40" in r.getMessage()]
    assert len(warned) == 1 and "every draw is the same" in warned[0].getMessage()
    assert runs[0].record.details["shots"]["short_classes"] and runs[0].record.n_train == runs[1].record.n_train


# --------------------------------------------------------------------------- items 6, 7: kNN


def _decimal_votes(sims: np.ndarray, labels: np.ndarray, n_classes: int, T: float) -> np.ndarray:
    """Normalised votes exp(s / T) in arbitrary precision: no overflow, whatever T."""
    out = []
    for s_row, l_row in zip(sims, labels, strict=True):
        votes = [Decimal(0)] * n_classes
        for s, label in zip(s_row, l_row, strict=True):
            votes[int(label)] += (Decimal(float(s)) / Decimal(T)).exp()
        total = sum(votes)
        out.append([float(v / total) for v in votes])
    return np.array(out)


def test_knn_at_a_tiny_temperature_equals_arbitrary_precision() -> None:
    rng = np.random.default_rng(3)
    train, y, test = rng.normal(size=(40, 6)), rng.integers(0, 3, 40), rng.normal(size=(9, 6))
    probe = KNNProbe(k=7, temperature=0.001).fit(train, y)
    sims, idx = probe.kneighbors(test)
    ref = _decimal_votes(sims, y[idx], 3, 0.001)
    proba = probe.predict_proba(test)
    assert np.all(np.isfinite(proba)) and np.allclose(proba, ref, atol=1e-9)
    assert np.array_equal(probe.predict(test), np.argmax(ref, axis=1))


def test_knn_k_above_the_training_set_records_the_k_used(tiny_features: Path, tmp_path: Path) -> None:
    where = ["--cache-dir", tiny_features, "--results-dir", tmp_path]
    proc = cli("fit", "--clf", "knn", *TINY, "--k", "5000", "--knn-temperature", "0.001", *where, "--json")
    assert proc.returncode == 0, proc.stderr
    [record] = json.loads(proc.stdout)
    assert record["params"]["k"] == 150 and record["details"]["knn"]["k"] == 150
    assert record["details"]["knn"]["k_asked"] == 5000
    assert "k=150 (--k 5000 capped at the 150 training images)" in proc.stderr
    assert record["metrics"]["accuracy"] == record["details"]["knn"]["accuracy_by_k"]["150"]


# --------------------------------------------------------------------------- item 8: protocols


def test_protocols_time_their_search_as_search_and_record_what_they_used(
    tiny_features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlfeat.status")
    base = dict(cache_dir=tiny_features, results_dir=tmp_path, model="resnet18", layer="penultimate")
    [clip] = fit(FitConfig(**base, protocol="clip"))  # type: ignore[arg-type]
    t, p = clip.record.timings, clip.record.details["protocol"]
    assert t.search_seconds == p["search_seconds"] > 0 and t.train_seconds == pytest.approx(
        p["seconds"] - p["search_seconds"]
    )
    monkeypatch.setattr(protocols.dinov2, "__defaults__", (40,))  # 40 iterations, not 12,500
    [dino] = fit(FitConfig(**base, protocol="dinov2"))  # type: ignore[arg-type]
    p = dino.record.details["protocol"]
    assert dino.record.params["lr"] == p["lr"] != FitConfig.lr and dino.record.params["iterations"] == 40
    assert dino.record.params["epochs"] is None and dino.record.timings.search_seconds == p["search_seconds"] > 0
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "protocol:clip: choosing C" in said and "protocol:dinov2: training 13 linear heads" in said, said


# --------------------------------------------------------------------------- items 9, 10: export


def test_export_describes_every_format_and_names_the_source_files_sha256(tiny_features: Path, tmp_path: Path) -> None:
    args = ["export", *EXPORT, "--cache-dir", tiny_features, "--out", tmp_path / "ex", "--format"]
    printed = []
    for fmt in ("npy", "csv"):
        proc = cli(*args, fmt)
        assert proc.returncode == 0, proc.stderr
        printed += proc.stdout.split()
    meta = json.loads((tmp_path / "ex" / "meta.json").read_text())
    listed = {n for entry in meta["formats"].values() for n in entry["files"]}
    on_disk = {p.name for p in (tmp_path / "ex").iterdir() if not p.name.startswith(".")} - {"meta.json"}
    assert sorted(meta["formats"]) == ["csv", "npy"] and listed == on_disk and len(on_disk) == 8
    assert {Path(p).name for p in printed} == on_disk | {"meta.json"}
    for entry in meta["formats"].values():
        for split in entry["splits"].values():
            assert split["source_file_sha256"] == hashlib.sha256(Path(split["source"]).read_bytes()).hexdigest()


def test_a_test_splits_limit_is_shown_as_test_limit(tiny_features: Path, tmp_path: Path) -> None:
    proc = cli("export", *EXPORT, "--cache-dir", tiny_features, "--out", tmp_path / "x", "--split", "test", "--test-limit", "7")  # fmt: skip
    line = assert_one_clear_line(proc, "test_limit=7", "test_limit=150")
    assert not re.search(r"(?<!test_)limit=", line), line
