"""The k-nearest-neighbour probe of DINO and DINOv2 (`eval_knn`), as a scikit-learn estimator.

Features are L2-normalised, so the dot product is the cosine similarity. Each test image takes its
k most similar training images; neighbour j votes for its class with weight exp(s_j / T) (T = 0.07);
the class with the largest sum wins. The votes, normalised to sum to 1, are the scores ROC AUC
ranks. DINO reports k = 10, 20, 100 and 200 (`KS`); one search for the largest k gives all four.

Training rows are read a block at a time, so the same code serves features in memory and features
streamed from an HDF5 file (`LazyRows`): the probe needs no second copy of the training set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

KS = (10, 20, 100, 200)  # what DINO's eval_knn reports
TEMPERATURE = 0.07
EPS = 1e-12  # torch.nn.functional.normalize's: an all-zero row stays zero


def normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, EPS)


def top_neighbours(
    train_blocks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int, query_rows: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, training indices), each (n_queries, k), most similar first.

    `train_blocks` yields (index of the block's first row, normalised rows); `queries` are normalised.
    Each block is read once, whatever the number of queries.
    """
    n = len(queries)
    best_s = np.full((n, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((n, 0), dtype=np.int64)
    for start, block in train_blocks:
        sims = np.empty((n, len(block)), dtype=np.float32)
        for q in range(0, n, query_rows):
            np.matmul(queries[q : q + query_rows], block.T, out=sims[q : q + query_rows])
        cand_s = np.concatenate([best_s, sims], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(block)), sims.shape)], axis=1)
        if cand_s.shape[1] > k:
            keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            cand_s = np.take_along_axis(cand_s, keep, axis=1)
            cand_i = np.take_along_axis(cand_i, keep, axis=1)
        best_s, best_i = cand_s, cand_i
    # Most similar first; equal similarities in training order (a stable, reproducible tie-break).
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def votes(sims: np.ndarray, neighbour_labels: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    """(n, n_classes): per class, the summed weights exp(s / T) of the neighbours of that class, each row
    scaled by exp(-max s / T) so that a small T cannot overflow (the normalised votes are unchanged)."""
    scaled = sims.astype(np.float64) / temperature
    weights = np.exp(scaled - scaled.max(axis=1, keepdims=True)) if scaled.size else scaled
    out = np.zeros((len(sims), n_classes))
    rows = np.repeat(np.arange(len(sims)), sims.shape[1])
    np.add.at(out, (rows, neighbour_labels.ravel()), weights.ravel())
    return out


class KNNProbe(ClassifierMixin, BaseEstimator):
    """Weighted k-NN on cosine similarity, DINO's protocol.

    Args:
        k: neighbours that vote (fewer when the training set is smaller).
        temperature: T in the weight exp(similarity / T).
        block_rows: training rows compared at a time.
    """

    def __init__(self, k: int = 20, temperature: float = TEMPERATURE, block_rows: int = 8192) -> None:
        self.k = k
        self.temperature = temperature
        self.block_rows = block_rows

    def fit(self, X: Any, y: Any) -> KNNProbe:
        X, y = validate_data(self, X, y, dtype=np.float32)
        return self._fit(X, y)

    def fit_rows(self, rows: Any, y: Any) -> KNNProbe:
        """Fit on rows that stay where they are (a `LazyRows` view of a cache file): nothing is copied."""
        self.n_features_in_ = int(rows.shape[1])
        return self._fit(rows, np.asarray(y))

    def _fit(self, rows: Any, y: np.ndarray) -> KNNProbe:
        check_classification_targets(y)
        if int(self.k) < 1 or not float(self.temperature) > 0 or int(self.block_rows) < 1:
            raise ValueError("k and block_rows must be at least 1, temperature positive")
        self.classes_, self.labels_ = np.unique(y, return_inverse=True)
        self.train_ = rows
        self.k_ = min(int(self.k), len(y))
        return self

    def _blocks(self) -> Iterable[tuple[int, np.ndarray]]:
        n, step = len(self.labels_), int(self.block_rows)
        for start in range(0, n, step):
            yield start, normalise(self.train_[start : start + step])

    def kneighbors(self, X: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, training indices) of the k nearest training rows, nearest first."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return top_neighbours(self._blocks(), normalise(X), min(k or self.k_, len(self.labels_)))

    def proba_by_k(self, X: Any, ks: Iterable[int]) -> dict[int, np.ndarray]:
        """Normalised votes for each k of `ks` (capped at the training set's size), from one search."""
        ks = sorted({min(int(k), len(self.labels_)) for k in ks})
        sims, idx = self.kneighbors(X, max(ks))
        labels = self.labels_[idx]
        out = {}
        for k in ks:
            v = votes(sims[:, :k], labels[:, :k], len(self.classes_), float(self.temperature))
            out[k] = v / v.sum(axis=1, keepdims=True)
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        return self.proba_by_k(X, [self.k_])[self.k_]

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
