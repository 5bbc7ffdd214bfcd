"""Papers' linear-evaluation protocols on cached features, so a number can be set beside the paper's.

`clip`: CLIP (Radford et al. 2021, appendix A.3) fits scikit-learn's L-BFGS logistic regression
(at most 1,000 iterations) on the raw features and chooses the L2 strength on a validation split
by a parametric binary search: C = 10^-6, 10^-4, ..., 10^6 first, then the interval around the best
halved until the grid has 8 steps per decade; the chosen C is refitted on train + validation.

`dinov2`: DINOv2 (Oquab et al. 2023, `dinov2/eval/linear.py`) trains one linear layer per learning
rate of a 13-value grid on the same batches (SGD, momentum 0.9, no weight decay, learning rate
scaled by batch / 256, cosine decay to 0 over 10 x 1,250 iterations of 128 images, weights
N(0, 0.01), bias 0) and tests the one most accurate on the validation split. On cached features
there is no augmentation (DINOv2 augments the images of each batch) and there is one feature vector
per image (DINOv2 also tries concatenating the last 4 blocks' class tokens and the average-pooled
patch tokens, which a CNN layer does not have).

Both carve their validation split from the training images (20%, at most 10,000, by id hash:
`selection.validation_split`), since the offline datasets have none.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np

from tlfeat import progress, selection

log = logging.getLogger(__name__)

CLIP_STEPS_PER_DECADE = 8
CLIP_START = tuple(range(-48, 49, 16))  # exponents in 1/8 decades: C = 10^-6, 10^-4, ..., 10^6
CLIP_MAX_ITER = 1000

DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DINOV2_BATCH = 128
DINOV2_ITERATIONS = 10 * 1250
DINOV2_MOMENTUM = 0.9


STATUS = {  # what `fit` says while a protocol chooses its hyperparameter (12-35 s on digits)
    "clip": "protocol:clip: choosing C by a binary search over 1e-6..1e6 on {n} training images",
    "dinov2": (
        f"protocol:dinov2: training {len(DINOV2_LRS)} linear heads (one per learning rate), "
        f"{DINOV2_ITERATIONS:,} iterations, on {{n}} training images"
    ),
}


def params(details: dict[str, Any]) -> dict[str, Any]:
    """The record's `params` of a protocol run: the values it used (not the linear head's defaults)."""
    if details["name"] == "dinov2":
        return {
            "lr": details["lr"],
            "epochs": None,
            "iterations": details["iterations"],
            "batch_size": details["batch_size"],
        }
    return {"C": details["C"]}


def run(name: str, X: Any, y: np.ndarray, ids: list[str], seed: int, **options: Any) -> tuple[Any, dict[str, Any]]:
    """The fitted pipeline of protocol `name` and what the record keeps of how it was fitted."""
    t0 = time.perf_counter()
    progress.status(STATUS[name].format(n=len(y)))
    pipeline, details = {"clip": clip, "dinov2": dinov2}[name](np.asarray(X, dtype=np.float32), y, ids, seed, **options)
    details["seconds"] = time.perf_counter() - t0
    return pipeline, details


def _accuracy(est: Any, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(est.predict(X) == y))


def clip(X: np.ndarray, y: np.ndarray, ids: list[str], seed: int) -> tuple[Any, dict[str, Any]]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import Pipeline

    from tlfeat.classifiers import LogReg

    t0 = time.perf_counter()
    fold = selection.validation_split(y, ids, seed)
    Xf, yf, Xv, yv = X[fold.fit], y[fold.fit], X[fold.val], y[fold.val]
    scores: dict[int, float] = {}

    def score(e: int) -> None:
        if e in scores or not CLIP_START[0] <= e <= CLIP_START[-1]:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = LogReg(C=10 ** (e / CLIP_STEPS_PER_DECADE), max_iter=CLIP_MAX_ITER).fit(Xf, yf)
        scores[e] = _accuracy(est, Xv, yv)

    def best() -> int:  # ties: the smallest C, the most regularised
        return max(sorted(scores), key=lambda e: (scores[e], -e))

    for e in CLIP_START:
        score(e)
    step = CLIP_START[1] - CLIP_START[0]
    while step > 1:
        step //= 2
        peak = best()
        score(peak - step)
        score(peak + step)
    C = 10 ** (best() / CLIP_STEPS_PER_DECADE)
    search_seconds = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        final = LogReg(C=C, max_iter=CLIP_MAX_ITER).fit(X, y)
    details = {
        "name": "clip",
        "C": C,
        "grid": [10 ** (e / CLIP_STEPS_PER_DECADE) for e in sorted(scores)],
        "val_accuracy": [scores[e] for e in sorted(scores)],
        "n_fit": len(fold.fit),
        "n_val": len(fold.val),
        "refit_on": "train + validation",
        "standardised": False,
        "max_iter": CLIP_MAX_ITER,
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "search_seconds": search_seconds,  # the binary search; the rest of "seconds" is the refit
    }
    return Pipeline([("clf", final)]), details


def dinov2(
    X: np.ndarray, y: np.ndarray, ids: list[str], seed: int, iterations: int = DINOV2_ITERATIONS
) -> tuple[Any, dict[str, Any]]:
    from sklearn.pipeline import Pipeline

    from tlfeat.classifiers import LinearHead

    t0 = time.perf_counter()
    fold = selection.validation_split(y, ids, seed)
    classes, y_idx = np.unique(y, return_inverse=True)
    W, b = train_heads(X[fold.fit], y_idx[fold.fit], len(classes), DINOV2_LRS, iterations, seed)
    k = len(classes)
    logits = X[fold.val] @ W + b
    val = [
        float(np.mean(np.argmax(logits[:, h * k : (h + 1) * k], axis=1) == y_idx[fold.val]))
        for h in range(len(DINOV2_LRS))
    ]
    h = int(np.argmax(val))  # ties: the first, the smallest learning rate (as DINOv2's strict ">")
    head = LinearHead()
    head.classes_ = classes
    head.coef_ = np.ascontiguousarray(W[:, h * k : (h + 1) * k].T, dtype=np.float64)
    head.intercept_ = b[h * k : (h + 1) * k].astype(np.float64)
    head.n_features_in_ = X.shape[1]
    head.n_iter_ = iterations
    details = {
        "name": "dinov2",
        "learning_rates": list(DINOV2_LRS),
        "scaled_learning_rates": [lr * DINOV2_BATCH / 256 for lr in DINOV2_LRS],
        "val_accuracy": val,
        "lr": DINOV2_LRS[h],
        "iterations": iterations,
        "batch_size": min(DINOV2_BATCH, len(fold.fit)),
        "n_fit": len(fold.fit),
        "n_val": len(fold.val),
        "refit_on": "none (the head trained on the fitting part is tested, as DINOv2 does)",
        "standardised": False,
        # The heads of every learning rate train together on the same batches and the tested head is one
        # of them: all of the time is the search (the record's fit time is 0).
        "search_seconds": time.perf_counter() - t0,
    }
    return Pipeline([("clf", head)]), details


def train_heads(
    X: np.ndarray, y: np.ndarray, n_classes: int, lrs: tuple[float, ...], iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One linear layer per learning rate, trained on the same batches: weights (d, heads * k), biases.

    The heads share one matrix (their columns side by side), so a step is two matrix products for all
    of them. The update is torch.optim.SGD's (momentum buffer = gradient at the first step, then
    0.9 buffer + gradient; no dampening, no weight decay), each head at its own learning rate times
    CosineAnnealingLR's factor (1 + cos(pi t / T)) / 2.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # products of 128 rows: BLAS threads only wait on each other
        return _train_heads(X, y, n_classes, lrs, iterations, seed)


def _train_heads(
    X: np.ndarray, y: np.ndarray, n_classes: int, lrs: tuple[float, ...], iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    # Measured on 2 busy cores: 3 ms per step with one BLAS thread, 20 ms with two.
    rng = np.random.default_rng(seed)
    n, d = X.shape
    h, k = len(lrs), n_classes
    W = (rng.standard_normal((d, h * k)) * 0.01).astype(np.float32)
    b = np.zeros(h * k, dtype=np.float32)
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    lr = np.repeat(np.asarray(lrs, dtype=np.float32) * DINOV2_BATCH / 256, k)
    batch = min(DINOV2_BATCH, n)
    onehot = np.zeros((batch, h, k), dtype=np.float32)
    order = rng.permutation(n)
    pos = 0
    for t in range(iterations):
        if pos + batch > n:  # an infinite shuffled sampler that drops the last partial batch
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        Xb = X[idx]
        Z = (Xb @ W + b).reshape(batch, h, k)
        Z -= Z.max(axis=2, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(axis=2, keepdims=True)
        onehot[:] = 0
        onehot[np.arange(batch), :, y[idx]] = 1.0
        G = ((P - onehot) / batch).reshape(batch, h * k)  # d(mean cross-entropy) / d(logits), per head
        gW, gb = Xb.T @ G, G.sum(axis=0)
        if t == 0:
            vW[:], vb[:] = gW, gb
        else:
            vW *= DINOV2_MOMENTUM
            vW += gW
            vb *= DINOV2_MOMENTUM
            vb += gb
        step = lr * np.float32(0.5 * (1 + np.cos(np.pi * t / iterations)))
        W -= vW * step
        b -= vb * step
    return W, b
