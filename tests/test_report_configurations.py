"""Which configurations the report's recommendation and tables weigh: every feature layer's (labelled
with its layer), and every start (UNTRAINED fine-tunes, scratch); captions say when a table shows fewer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.records import RunRecord
from tlfeat.report import findings
from tlfeat.report.rows import _row
from tlfeat.report.sections import amortised, dataset_tables, method_tables, per_class, recommendation

N = 100
Y = np.arange(N) % 2


def _run(method: str, accuracy: float, layer: str = "penultimate", pretrained: bool = True) -> dict[str, Any]:
    right = np.arange(N) < round(accuracy * N)
    pred = np.where(right, Y, 1 - Y)
    per_class = {c: {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": N // 2} for c in "ab"}
    record = RunRecord(
        kind="finetune" if method.startswith(("finetune:", "scratch")) else "fit", key=f"{method}{layer}",
        method=method, model="mobilenet_v2", dataset="d", n_train=10, n_test=N, layer=layer, pretrained=pretrained,
        weights_id="" if pretrained else "untrained:seed0", class_names=["a", "b"],
        metrics={"accuracy": accuracy, "per_class": per_class,
                 "predictions": {"ids_sha256": "same", "y_true": Y.tolist(), "y_pred": pred.tolist()}},
    )  # fmt: skip
    return _row(record, Path("."), "", "d")


def _text(blocks: list[tuple[str, Any]]) -> str:
    return "\n".join(str(b[1]) for b in blocks)


def test_the_recommendation_and_the_significance_tables_weigh_every_layer() -> None:
    items = [
        _run("knn", 0.95, "features.13"),
        _run("protocol:clip", 0.80),
        _run("knn", 0.70),
        _run("knn", 0.60, "features.13+penultimate"),
    ]
    (line,) = recommendation(items)
    assert "the most accurate is frozen mobilenet_v2 + knn at features.13 (accuracy 0.9500" in line
    table = _text(dataset_tables(items))
    for name in ("'knn at features.13'", "'knn'", "'protocol:clip'", "'knn at features.13+penultimate'"):
        assert name in table, name
    significance = _text(findings.significance(items))
    assert "frozen mobilenet_v2 + knn at features.13 against each of the 3 other configurations" in significance
    assert "knn at features.13+penultimate" in significance
    # the models x datasets tables stay penultimate-only, and say so
    assert "penultimate layer only" in _text(method_tables(items))
    assert "penultimate layer only" not in _text(method_tables(items[1:3]))
    assert amortised(items)[0] == ("h2", "Amortised cost of the frozen routes (penultimate layer)")
    assert amortised(items[1:3])[0] == ("h2", "Amortised cost of the frozen routes")


def test_the_per_class_table_shows_the_most_accurate_configurations_and_says_which() -> None:
    frozen = [_run("knn", 0.50 + i / 100, f"features.{i}") for i in range(8)]
    items = [
        _run("protocol:clip", 0.95),
        *frozen,
        _run("finetune:head", 0.90, "-", pretrained=False),
        _run("scratch", 0.85, "-", pretrained=False),
    ]
    blocks = per_class(items)
    caption = _text(blocks[1:2])
    assert "the F1 of the 8 most accurate of the 10 other configurations" in caption
    header = blocks[2][1][0]
    assert "F1 finetune:head mobilenet_v2 (UNTRAINED)" in header and "F1 scratch mobilenet_v2" in header
    assert "F1 knn at features.0 mobilenet_v2" not in header and "F1 knn at features.7 mobilenet_v2" in header
    assert len(header) == 5 + 8
    few = per_class(items[:1] + items[-2:])
    assert "the F1 of every other configuration" in _text(few[1:2]) and len(few[2][1][0]) == 5 + 2
