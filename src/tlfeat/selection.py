"""Choosing C: on a validation split of the training images (k-fold CV when they are few), along a
warm-started regularisation path, widening the grid when the best C lands on one of its edges.

Why not the earlier 3-fold CV on 3,000 images: the best C depends on how many images the final fit
sees (the penalty is ||W||^2 / (2 C n)). On full MNIST (MobileNetV2, 224 px) CV on 3,000 images chose
C = 1 (test 0.9787); C chosen on a 10,000-image validation split of the 60,000, refitted on all of
them, was 0.03 (0.9822). So the search fits each candidate on as many images as the final fit's
budget allows: the whole rest of the split for logreg, `search_rows` of it for the slower classifiers
(their spec says how many). Small C converges in few L-BFGS iterations, and each larger C starts from
the previous solution (`warm_start`), so the whole path costs a few cold fits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tlfeat import datasets
from tlfeat.classifier_specs import ClassifierSpec, Params

log = logging.getLogger(__name__)

SEARCH = "validation-path-v1"  # in every result key: a new search is a new result
VAL_FRACTION = 0.2
VAL_MAX = 10_000  # validation images at most (the MNIST measurement held out 10,000)
VAL_MIN = 1000  # fewer would be a noisy choice: k-fold CV over every training image instead
STREAM_SEARCH_ROWS = 50_000  # features read from disk: the search fits on at most this many in memory
WIDENINGS = 2  # times the grid may grow by a decade past an edge before C is reported as on the edge


@dataclass(frozen=True)
class Fold:
    fit: np.ndarray  # indices
    val: np.ndarray


def validation_split(y: np.ndarray, ids: list[str], seed: int) -> Fold:
    """A stratified validation split of the training images (by a hash of their ids): 20%, at most 10,000."""
    n_val = min(VAL_MAX, int(len(y) * VAL_FRACTION))
    fit, val = datasets.stratified_split(y, n_val / max(len(y), 1), seed=seed, ids=ids)
    return Fold(fit, val)


def folds(y: np.ndarray, n_folds: int, seed: int) -> list[Fold]:
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    return [Fold(a, b) for a, b in splitter.split(np.zeros(len(y)), y)]


def plan(y: np.ndarray, ids: list[str], seed: int, n_folds: int) -> tuple[list[Fold], str] | None:
    """The folds of the search and how they are described; None when some class has too few images."""
    n = len(y)
    if min(VAL_MAX, int(n * VAL_FRACTION)) >= VAL_MIN:
        fold = validation_split(y, ids, seed)
        return [fold], f"validation split ({len(fold.val)} of {n} training images, by id hash, seed {seed})"
    smallest = int(np.unique(y, return_counts=True)[1].min())
    k = min(n_folds, smallest)
    if k < 2:
        return None
    return folds(y, k, seed), f"{k}-fold cross-validation on {n} training images"


def grid_extension(grid: list[float], upward: bool) -> list[float]:
    """One more decade past an edge, at the grid's own spacing: the points of the grid's last (or first)
    decade times 10 (or divided by 10). 1e-4, 3e-4, ..., 30, 100 grows by 300, 1000."""
    if upward:
        tail = [g for g in grid if g > grid[-1] / 10 * (1 + 1e-9)]
        return [float(f"{g * 10:.3g}") for g in tail]
    head = [g for g in grid if g < grid[0] * 10 * (1 - 1e-9)]
    return [float(f"{g / 10:.3g}") for g in head]


class Path:
    """Validation accuracy of each C on each fold; the estimator of the largest C fitted so far is kept
    per fold, for warm starts."""

    def __init__(self, spec: ClassifierSpec, params: Params, data: list[tuple[Any, Any, Any, Any]]) -> None:
        self.spec, self.params, self.data = spec, params, data
        self.scores: dict[float, list[float]] = {}
        self.last: list[Any] = [None] * len(data)

    def run(self, Cs: list[float]) -> None:
        """Fit every C of `Cs` (ascending) on every fold; warm-started where the spec allows and C grows."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        for i, (Xf, yf, Xv, yv) in enumerate(self.data):
            previous = self.last[i]
            warm = self.spec.warm_start and previous is not None and previous.C < Cs[0]
            est = previous if warm else None
            for C in Cs:
                if est is None:
                    est = self.spec.build(replace(self.params, C=C))
                    if self.spec.warm_start:
                        est.set_params(warm_start=True)
                else:
                    est.set_params(C=C)
                with warnings.catch_warnings():  # a C the search rejects need not converge fully
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    est.fit(Xf, yf)
                self.scores.setdefault(C, []).append(float(np.mean(est.predict(Xv) == yv)))
                if not self.spec.warm_start:
                    est = None
            if self.last[i] is None or Cs[-1] > self.last[i].C:
                self.last[i] = est if est is not None else self.last[i]

    def best(self) -> float:
        """The C of the highest mean accuracy; where several tie, the middle one of them (the lower of two):
        a plateau that reaches an edge of the grid is no reason to search past that edge."""
        means = {C: float(np.mean(v)) for C, v in self.scores.items()}
        top = max(means.values())
        tied = [C for C in sorted(means) if means[C] == top]
        return tied[(len(tied) - 1) // 2]

    def alone(self, C: float) -> bool:
        """Is C strictly the best (no other C scored as well)? Only then does an edge say "search further"."""
        means = [float(np.mean(v)) for v in self.scores.values()]
        return means.count(float(np.mean(self.scores[C]))) == 1


def _fold_data(spec: ClassifierSpec, X: Any, y: np.ndarray, ids: list[str], fold: Fold, seed: int) -> tuple[Any, ...]:
    """The fold's fitting rows (at most `search_rows`, stratified) and validation rows, standardised on
    the fitting rows where the spec standardises."""
    from sklearn.preprocessing import StandardScaler

    cap = spec.search_rows or (None if isinstance(X, np.ndarray) else STREAM_SEARCH_ROWS)
    fit = fold.fit
    if cap is not None and len(fit) > cap:
        fit = fit[datasets.stratified_subset(y[fit], cap, seed=seed, ids=[ids[i] for i in fit])]
    Xf, Xv = np.asarray(X[fit], dtype=np.float32), np.asarray(X[fold.val], dtype=np.float32)
    if spec.standardise:
        scaler = StandardScaler().fit(Xf)
        Xf, Xv = scaler.transform(Xf).astype(np.float32), scaler.transform(Xv).astype(np.float32)
    return Xf, y[fit], Xv, y[fold.val]


def choose_C(
    spec: ClassifierSpec, params: Params, X: Any, y: np.ndarray, ids: list[str], seed: int, n_folds: int
) -> dict[str, Any]:
    """The C to fit with, and how it was chosen (what the record keeps)."""
    found = plan(y, ids, seed, n_folds)
    if found is None:
        return {"C": 1.0, "chosen_by": "default (too few images per class to search)"}
    fold_list, how = found
    t0 = time.perf_counter()
    data = [_fold_data(spec, X, y, ids, fold, seed) for fold in fold_list]
    path = Path(spec, params, data)
    grid = list(spec.C_grid)
    path.run(grid)
    for _ in range(WIDENINGS):
        C = path.best()
        if not path.alone(C) or C not in (min(path.scores), max(path.scores)):
            break
        path.run(grid_extension(sorted(path.scores), upward=C == max(path.scores)))
    C = path.best()
    Cs = sorted(path.scores)
    edge = C in (Cs[0], Cs[-1]) and path.alone(C)
    if edge:
        log.warning(
            "%s: the best C (%g) is on the edge of the searched grid (%g to %g); a C beyond it might be better: "
            "try --C",
            spec.method,
            C,
            Cs[0],
            Cs[-1],
        )
    return {
        "C": float(C),
        "chosen_by": how + (", warm-started regularisation path" if spec.warm_start else ""),
        "search": SEARCH,
        "grid": Cs,
        "cv_accuracy": [float(np.mean(path.scores[c])) for c in Cs],
        "cv_samples": int(sum(len(d[1]) for d in data[:1])),
        "val_samples": int(sum(len(d[3]) for d in data)),
        "on_edge": bool(edge),
        "cv_seconds": time.perf_counter() - t0,
    }
