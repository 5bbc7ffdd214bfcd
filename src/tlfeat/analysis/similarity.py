"""How alike two representations of the same images are: CKA and RSA.

CKA (Kornblith et al. 2019) compares the images' similarity (Gram) matrices after centring:
HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), with a linear kernel (K = X X^T) or an RBF kernel whose
bandwidth is `threshold` times the median pairwise distance (the paper's choice). The plain HSIC
estimator is biased upwards when features outnumber images; the debiased one (Song et al. 2012, as
Nguyen et al. 2021 use it for CKA) is an unbiased U-statistic. Either gives 1 for a representation
compared with itself, and is unchanged by an orthogonal transform or an isotropic scaling of one
representation. The centring below is the U-statistic's own (Kornblith's reference code), so a CKA
costs one pass over two n x n matrices.

RSA (Kriegeskorte et al. 2008) compares representational dissimilarity matrices: per representation,
the distance between every two images (1 - Pearson correlation of their feature vectors, or cosine
distance); then the Spearman correlation of the two matrices' upper triangles.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

KERNELS = ("linear", "rbf")
DISTANCES = ("correlation", "cosine")


def constant(X: np.ndarray) -> bool:
    """Do all images have the same features (zero variance, up to float noise)? Then CKA and RSA are
    0/0: undefined, whatever an estimator's rounding happens to return."""
    X = np.asarray(X, dtype=np.float64)
    # relative to the features' own scale: random-weight networks can give features of 1e-10 that vary
    return len(X) < 2 or float(np.ptp(X, axis=0).max(initial=0.0)) <= 1e-6 * float(np.abs(X).max(initial=0.0))


def gram_linear(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X @ X.T


def gram_rbf(X: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """exp(-d^2 / (2 sigma^2)), sigma = threshold x the median distance between the images."""
    K = gram_linear(X)
    sq = np.diag(K)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * K, 0.0)
    median = float(np.median(d2))
    if median <= 0:
        return np.ones_like(d2)
    return np.exp(-d2 / (2 * threshold**2 * median))


def gram(X: np.ndarray, kernel: str = "linear", threshold: float = 1.0) -> np.ndarray:
    return gram_rbf(X, threshold) if kernel == "rbf" else gram_linear(X)


def center(K: np.ndarray, debiased: bool) -> np.ndarray:
    """H K H (biased), or the U-statistic's centring whose inner products are the debiased HSIC."""
    K = np.array(K, dtype=np.float64)
    n = len(K)
    if not debiased:
        means = K.mean(axis=0)
        means -= means.mean() / 2
        return K - means[:, None] - means[None, :]
    if n < 4:
        raise ValueError("the debiased HSIC needs at least 4 images")
    np.fill_diagonal(K, 0.0)
    means = K.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    K -= means[:, None]
    K -= means[None, :]
    np.fill_diagonal(K, 0.0)
    return K


def cka_centered(Kc: np.ndarray, Lc: np.ndarray) -> float:
    """CKA of two Gram matrices already centred the same way."""
    denom = float(np.linalg.norm(Kc) * np.linalg.norm(Lc))
    return float(np.sum(Kc * Lc) / denom) if denom > 0 else float("nan")


def cka(X: np.ndarray, Y: np.ndarray, kernel: str = "linear", debiased: bool = True, threshold: float = 1.0) -> float:
    """CKA between two representations (rows: the same images, in the same order)."""
    if len(X) != len(Y):
        raise ValueError("CKA compares representations of the same images: row counts differ")
    if constant(X) or constant(Y):
        return float("nan")
    return cka_centered(center(gram(X, kernel, threshold), debiased), center(gram(Y, kernel, threshold), debiased))


def rdm(X: np.ndarray, distance: str = "correlation") -> np.ndarray:
    """The upper triangle (row by row, diagonal excluded) of the images' dissimilarity matrix."""
    Z = np.asarray(X, dtype=np.float64)
    if distance == "correlation":
        Z = Z - Z.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    Z = Z / np.where(norms > 0, norms, 1.0)
    D = 1.0 - Z @ Z.T
    return D[np.triu_indices(len(Z), k=1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def rsa(X: np.ndarray, Y: np.ndarray, distance: str = "correlation") -> float:
    if len(X) != len(Y):
        raise ValueError("RSA compares representations of the same images: row counts differ")
    if constant(X) or constant(Y):
        return float("nan")
    return spearman(rdm(X, distance), rdm(Y, distance))


def matrix(reps: list[np.ndarray], measure: str, **options: object) -> np.ndarray:
    """The symmetric matrix of `measure` ("cka" or "rsa") between every two representations; each
    representation's Gram matrix or RDM is computed once."""
    n = len(reps)
    out = np.eye(n)
    pair: Callable[[np.ndarray, np.ndarray], float]
    if measure == "cka":
        kernel, debiased = str(options.get("kernel", "linear")), bool(options.get("debiased", True))
        threshold = float(options.get("threshold", 1.0))  # type: ignore[arg-type]
        prepared = [center(gram(X, kernel, threshold), debiased) for X in reps]
        pair = cka_centered
    else:
        prepared = [rdm(X, str(options.get("distance", "correlation"))) for X in reps]
        pair = spearman
    flat = [constant(X) for X in reps]  # undefined against anything, itself included: nan for every estimator
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = float("nan") if flat[i] or flat[j] else pair(prepared[i], prepared[j])
    return out
