"""Metrics shared by `fit` and `finetune`, under their usual names, as plain JSON-able values."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np

from tlfeat import stats


def roc_auc(y_true: np.ndarray, scores: np.ndarray, n_classes: int) -> float | None:
    """Binary ROC AUC, or one-vs-rest macro AUC over the classes present in `y_true`.

    `scores` has one column per class of the dataset (column c scores class c), probabilities or
    margins: each class's AUC only ranks that class's column.
    """
    from sklearn import metrics as skm

    present = np.unique(y_true)
    if len(present) < 2 or scores.shape[1] != n_classes:
        return None
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true == 1, scores[:, 1]))
    aucs = [skm.roc_auc_score(y_true == c, scores[:, c]) for c in present]
    return float(np.mean(aucs))


def ids_digest(ids: list[str]) -> str:
    """Identifies a test set's images and order, so paired tests compare like with like."""
    return hashlib.sha256("\0".join(ids).encode("utf-8", "surrogateescape")).hexdigest()


def evaluate(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    class_names: list[str],
    test_ids: list[str] | None = None,
) -> dict[str, Any]:
    """Accuracy (with its 95% Wilson interval), balanced accuracy, ROC AUC, macro F1, per-class
    precision/recall/F1, the confusion matrix, and the predictions for paired tests between runs."""
    from sklearn import metrics as skm

    # The per-class table says both of these; balanced accuracy's inner confusion matrix needs no labels.
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", append=True)
    warnings.filterwarnings("ignore", message="A single label was found in 'y_true' and 'y_pred'", append=True)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    accuracy = float(skm.accuracy_score(y_true, y_pred))
    correct = int((y_true == y_pred).sum())
    low, high = stats.wilson(correct, len(y_true))
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))  # scikit-learn's default label set
    return {
        "accuracy": accuracy,
        "accuracy_ci95": [low, high],
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "roc_auc": None if scores is None else roc_auc(y_true, scores, len(class_names)),
        "macro_f1": float(np.mean(f1[present])) if present else 0.0,
        "chance_accuracy": stats.chance(y_true),
        "near_chance": stats.near_chance(accuracy, y_true, y_pred),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "predictions": {
            "ids_sha256": ids_digest(test_ids) if test_ids is not None else None,
            "y_true": y_true.astype(int).tolist(),
            "y_pred": y_pred.astype(int).tolist(),
        },
    }
