"""Metrics shared by `fit` and `finetune`, under their usual names, as plain JSON-able values."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def roc_auc(y_true: np.ndarray, scores: np.ndarray, n_classes: int) -> float | None:
    """Binary ROC AUC, or one-vs-rest macro AUC over the classes present in `y_true`.

    Scores may be probabilities or margins: each class's AUC only ranks that class's column.
    """
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true == 1, scores[:, 1]))
    aucs = [skm.roc_auc_score(y_true == c, scores[:, c]) for c in present]
    return float(np.mean(aucs))


def evaluate(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None, class_names: list[str]
) -> dict[str, Any]:
    labels = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "roc_auc": None if scores is None else roc_auc(y_true, scores, len(class_names)),
        "macro_f1": float(np.mean(f1)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
