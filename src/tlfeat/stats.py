"""Uncertainty a reviewer asks for: intervals on a test accuracy, paired tests between methods.

`wilson` is the 95% score interval of a proportion (accurate at small n and near 0 or 1, unlike
the normal approximation). `mcnemar` compares two classifiers on the same test images by the
images only one of them gets right (exact binomial test). `chance` is the accuracy of always
predicting the most frequent class, and `near_chance` says whether an accuracy is within noise of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of `correct` successes out of `n`."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 or 1 the bound equals p exactly; rounding must not leave p outside its own interval.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class McNemar:
    """Two classifiers on the same images: b = only the first right, c = only the second right."""

    b: int
    c: int
    p_value: float

    def verdict(self, alpha: float = 0.05) -> str:
        if self.p_value >= alpha:
            return "indistinguishable"
        return "first better" if self.b > self.c else "second better"


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact McNemar test (two-sided binomial test on the discordant pairs, p = 1/2)."""
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError("McNemar needs predictions on the same test images")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    n = b + c
    if n == 0:
        return McNemar(b, c, 1.0)
    k = min(b, c)
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space so large n stays exact enough.
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return McNemar(b, c, min(1.0, 2 * tail))


def chance(y_true: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent test class."""
    y = np.asarray(y_true)
    if len(y) == 0:
        return 0.0
    return float(np.bincount(y).max() / len(y))


def near_chance(accuracy: float, y_true: np.ndarray, y_pred: np.ndarray | None = None) -> str | None:
    """Why a run is no better than guessing, or None: constant predictions, or an accuracy whose
    95% interval reaches the majority-class rate."""
    y = np.asarray(y_true)
    if y_pred is not None and len(y_pred) and len(np.unique(y_pred)) == 1:
        return "predicts one class for every image"
    base = chance(y)
    low, _ = wilson(int(round(accuracy * len(y))), len(y))
    if low <= base:
        return f"within noise of chance ({base:.3f}, always the most frequent class)"
    return None


@dataclass(frozen=True)
class Difference:
    """Accuracy of a minus accuracy of b on the same images, with a paired bootstrap interval."""

    diff: float
    low: float
    high: float
    n_boot: int


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Difference:
    """Percentile interval of the accuracy difference, resampling the test images (pairs kept together).

    Each image contributes +1 (only a right), -1 (only b right) or 0; resampling n images with
    replacement makes the counts of the three kinds a multinomial draw, so each bootstrap replicate is
    one multinomial sample instead of n index draws: the same distribution, at any n_boot, in no time.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("a paired bootstrap needs predictions on the same (non-empty) test images")
    n = len(a)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    counts = np.random.default_rng(seed).multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], n_boot)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Difference((only_a - only_b) / n, float(low), float(high), n_boot)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p times (m - i + 1),
    made non-decreasing, capped at 1. A difference survives at level alpha when its adjusted p < alpha."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        adjusted[int(i)] = running
    return adjusted
