"""One comparison with every probe and analysis of issue 23, at the smallest sizes: what the report
says about k-shot curves, the kNN probe, concatenated and swept layers, multi-stage transfer (stage 1
made once for two targets), representation analyses, statistics and overfitting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tlfeat.compare import compare
from tlfeat.config import CompareConfig
from tlfeat.records import RunRecord
from tlfeat.report import findings

from .conftest import make_tree


@pytest.mark.slow
def test_a_comparison_with_every_probe_and_analysis(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "ants", per_class=6)
    b = make_tree(tmp_path / "bees", per_class=6)
    mid = make_tree(tmp_path / "middle", per_class=6, classes=("x", "y"))
    cfg = CompareConfig(
        models=("resnet18:untrained",), datas=(str(a), str(b)),
        methods=("logreg", "knn", "finetune:head", f"chain:{mid}:head"),
        layers=("layer2", "layer3", "penultimate", "layer3+penultimate"), shots=(1, 2), shot_draws=2,
        analyses=("cka", "embed", "neighbours"), analysis_images=12, epochs=1, image_size=16, workers=0,
        out=tmp_path / "report", cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    compare(cfg, echo=lambda _line: None)
    out = tmp_path / "report"
    assert json.loads((out / "failures.json").read_text())["failures"] == {}
    md = (out / "report.md").read_text()
    for section in (
        "## k-shot curves", "## kNN probe", "## Layer-wise probe", "## Multi-stage transfer",
        "## Representation analyses", "which differences from the best survive", "## How C was chosen",
    ):  # fmt: skip
        assert section in md, section
    assert (out / "plots" / "shots_ants.png").is_file() and (out / "plots" / "layer_depth.png").is_file()
    assert len(list((out / "plots").glob("analysis_*.png"))) == 2 * 4  # per dataset: CKA, PCA, t-SNE, neighbours
    # k-shot runs are shown in their own section, never among the whole-set results
    main_rows = [
        r for r in md.split("## ants: method × accuracy × time")[1].split("##")[0].splitlines() if r.startswith("| ")
    ]
    # the header, then logreg at each of the 4 layers (the sweep's method), knn, finetune:head and the chain
    assert len(main_rows) == 1 + 4 + 1 + 2
    # Stage 1 (the intermediate dataset) is trained once and reused by the second target.
    stage_runs = sorted(p.parent.name for p in (cfg.runs_dir / "chain-stages" / "finetunes").glob("*/record.json"))
    assert sum("middle" in name for name in stage_runs) == 1 and len(stage_runs) == 3
    chains = [RunRecord.load(p) for p in (cfg.runs_dir / "chains").glob("*/record.json")]
    assert sorted(c.details["stages"][0]["reused"] for c in chains) == [False, True]
    for c in chains:
        s1, s2 = c.details["stages"]
        assert c.timings.train_seconds == pytest.approx(s1["train_seconds"] + s2["train_seconds"])
        assert c.method == f"chain:{mid}:head" and s1["dataset"] == str(mid)
        # the chain starts where stage 1 did (random weights), not from the file stage 2 loaded
        assert (c.weights_id, c.pretrained) == ("untrained:seed0", False), (c.weights_id, c.pretrained)
    chain_section = md.split("## Multi-stage transfer")[1].split("\n## ")[0]
    assert chain_section.startswith("\n\nRandom weights (UNTRAINED models) fine-tuned on an intermediate dataset")
    chain_rows = [line for line in chain_section.splitlines() if f"chain:{mid}:head" in line]
    assert len(chain_rows) == 2 and all("| resnet18 (UNTRAINED) |" in line for line in chain_rows)
    assert all(not line.endswith("| — | — |") for line in chain_rows)  # the direct fine-tune is found beside it
    concat = [
        r for r in map(RunRecord.load, (cfg.runs_dir / "fits").glob("*/record.json")) if r.layer == "layer3+penultimate"
    ]
    assert len(concat) == 2 and all(r.details["n_features"] == 256 + 512 for r in concat)
    shots = [r for r in map(RunRecord.load, (cfg.runs_dir / "fits").glob("*/record.json")) if r.details.get("shots")]
    assert len(shots) == 2 * 2 * 2 * 2  # datasets x methods (logreg, knn) x k x draws
    assert {r.n_train for r in shots} == {3, 6}  # 1 and 2 images of each of 3 classes


def _finetune_row(history: list[dict[str, float]], best_epoch: int) -> dict[str, object]:
    record = RunRecord(
        kind="finetune", key="k", method="finetune:full", model="m", dataset="d", n_train=10, n_test=10,
        metrics={"accuracy": 0.5}, details={"history": history, "best_epoch": best_epoch},
    )  # fmt: skip
    return {"_record": record, "dataset": "d", "model": "m", "seed": 0, "_method": record.parsed_method}


def test_the_report_flags_a_run_that_overfits_and_says_which_weights_were_kept() -> None:
    over = [
        {"epoch": e + 1, "train_loss": t, "val_loss": v}
        for e, (t, v) in enumerate(zip([1.0, 0.5, 0.3, 0.2, 0.1, 0.05], [0.9, 0.6, 0.5, 0.55, 0.6, 0.7], strict=True))
    ]
    fine = [
        {"epoch": e + 1, "train_loss": t, "val_loss": v}
        for e, (t, v) in enumerate(zip([1.0, 0.5, 0.3, 0.2], [0.9, 0.6, 0.5, 0.45], strict=True))
    ]
    blocks = findings.overfit([_finetune_row(over, 4), _finetune_row(fine, 4)])
    text = " ".join(str(b[1]) for b in blocks)
    assert "1 of 2 fine-tuning run(s) overfit" in text
    assert "overfitting from epoch 4" in text and "from 0.5000 (epoch 3) to 0.7000 (epoch 6)" in text
    assert "weights kept: epoch 4 (best validation accuracy, after overfitting began)" in text


def test_holm_decides_which_differences_survive() -> None:
    from scipy.stats import binomtest

    from tlfeat.report.rows import Config

    y = np.zeros(400, dtype=int)

    def config(name: str, right: np.ndarray) -> Config:
        pred = np.where(right, y, 1)
        record = RunRecord(
            kind="fit", key=name, method="logreg", model=name, dataset="d", n_train=1, n_test=400,
            metrics={"accuracy": float(right.mean()), "predictions": {"ids_sha256": "same", "y_true": y.tolist(), "y_pred": pred.tolist()}},
        )  # fmt: skip
        row = {"_record": record, "_method": record.parsed_method, "seed": 0, "subset_seed": 0, "metric": record.metrics["accuracy"],
               "accuracy": record.metrics["accuracy"], "near_chance": "", "total_seconds": 1.0, "n_test": 400}  # fmt: skip
        return Config("d", name, "logreg", "", [row])

    index = np.arange(400)
    best = index < 380  # 380 right
    close = (index < 372) | ((index >= 390) & (index < 394))  # 8 only best got right, 4 only it
    far = index < 280  # 100 only best got right, none only it
    rows = findings.differences([config("best", best), config("close", close), config("far", far)])
    by_name = {r["config"].model: r for r in rows}
    p_close, p_far = binomtest(4, 12).pvalue, binomtest(0, 100).pvalue
    assert by_name["close"]["p"] == pytest.approx(p_close) and by_name["far"]["p"] == pytest.approx(p_far)
    # Holm, 2 tests: the smaller p times 2, the larger times 1 (and never below the one before it)
    assert by_name["far"]["holm"] == pytest.approx(2 * p_far) and by_name["close"]["holm"] == pytest.approx(p_close)
    assert by_name["far"]["diff"].diff == pytest.approx(0.25) and by_name["close"]["diff"].diff == pytest.approx(0.01)
    assert 0 < by_name["far"]["diff"].low < 0.25 < by_name["far"]["diff"].high
    assert by_name["close"]["diff"].low < 0 < by_name["close"]["diff"].high
    text = " ".join(str(b[1]) for b in findings.significance_blocks(rows))
    assert "1 of 2 survive" in text
