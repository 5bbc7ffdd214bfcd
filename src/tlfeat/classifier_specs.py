"""The classifiers on frozen features, declared once: one `ClassifierSpec` per method name.

Config reads the `--clf` and `--kernel` choices from here, fitting how to build each estimator, its
C grid, which options it reads, whether it streams and how large a C search may get; records read
the frozen method names; the report a fixed colour per method. A new classifier is one estimator
(scikit-learn's contract) and one entry in `SPECS`, and no edit anywhere else. This module imports
nothing heavy: estimators are built by functions that import their module when called.

What C means: the inverse regularisation strength on standardised features. For logreg and the
linear head the penalty added to the mean cross-entropy is ||W||^2 / (2 C n) (n training images:
scikit-learn's LogisticRegression objective; the head's weight decay is 1 / (C n)); for the linear
SVM it is liblinear's C, the weight of the summed hinge loss against ||W||^2 / 2. Larger C, less
regularisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The options of `FitConfig` that only some classifiers read; each spec names those it reads, and a
# result key holds only those (so an unused option never splits one fit into two results).
OPTIONS = ("C", "cv_folds", "epochs", "lr", "k", "temperature")


@dataclass(frozen=True)
class Params:
    """What an estimator is built with (the config's values, C resolved)."""

    C: float = 1.0
    epochs: int = 50
    lr: float = 1e-2
    seed: int = 0
    k: int = 20
    temperature: float = 0.07


def _half_decades(low: int, high: int) -> tuple[float, ...]:
    """1e{low}, 3e{low}, ..., 1e{high}: a log grid with two points per decade."""
    out = []
    for e in range(low, high + 1):
        out.append(float(f"1e{e}"))
        if e < high:
            out.append(float(f"3e{e}"))
    return tuple(out)


def _logreg(p: Params) -> Any:
    from tlfeat.classifiers import LogReg

    return LogReg(C=p.C)


def _linear_svm(p: Params) -> Any:
    from sklearn.svm import LinearSVC

    # The dual solver: on n > d standardised CNN features it converges far faster (measured: 2-5 s
    # vs 6-62 s on 2000 x 1280 MNIST features).
    return LinearSVC(C=p.C, dual=True, max_iter=5000, random_state=p.seed)


def _rbf_svm(p: Params) -> Any:
    from sklearn.svm import SVC

    return SVC(C=p.C, kernel="rbf", gamma="scale", random_state=p.seed)


def _linear_head(p: Params) -> Any:
    from tlfeat.classifiers import LinearHead

    return LinearHead(C=p.C, epochs=p.epochs, lr=p.lr, random_state=p.seed)


def _knn(p: Params) -> Any:
    from tlfeat.knn import KNNProbe

    return KNNProbe(k=p.k, temperature=p.temperature)


@dataclass(frozen=True)
class ClassifierSpec:
    """One way of classifying frozen features.

    Attributes:
        method: its name in `--methods`, records and reports (`svm-rbf`).
        clf, kernel: its `--clf` and `--kernel`.
        summary: one line for help texts.
        build: the unfitted estimator from `Params`.
        options: the FitConfig options it reads (of `OPTIONS`).
        C_grid: where the C search starts (widened when the best C lands on an edge); empty: no C.
        search_rows: the most training images one C candidate is fitted on (None: no limit).
        warm_start: each C of the search starts from the previous C's solution (a regularisation path).
        standardise: features are standardised before the estimator.
        streams: has a fit that reads features larger than memory block by block.
        colour: its colour in every report plot.
    """

    method: str
    clf: str
    kernel: str
    summary: str
    build: Callable[[Params], Any]
    options: tuple[str, ...]
    C_grid: tuple[float, ...] = ()
    search_rows: int | None = None
    warm_start: bool = False
    standardise: bool = True
    streams: bool = True
    colour: str = "#7f7f7f"

    @property
    def has_C(self) -> bool:
        return bool(self.C_grid)


SPECS: dict[str, ClassifierSpec] = {
    s.method: s
    for s in (
        ClassifierSpec(
            "logreg", "logreg", "linear", "multinomial logistic regression (L-BFGS)", _logreg,
            ("C", "cv_folds"), _half_decades(-4, 2), warm_start=True, colour="#1f77b4",
        ),
        ClassifierSpec(
            "svm", "svm", "linear", "linear SVM (liblinear)", _linear_svm,
            ("C", "cv_folds"), _half_decades(-4, -1), search_rows=10_000, colour="#ff7f0e",
        ),
        ClassifierSpec(
            "svm-rbf", "svm", "rbf", "RBF-kernel SVM (small data)", _rbf_svm,
            ("C", "cv_folds"), (0.1, 1.0, 10.0, 100.0), search_rows=3000, streams=False, colour="#8c564b",
        ),
        ClassifierSpec(
            "linear", "linear", "linear", "a PyTorch linear layer trained with Adam", _linear_head,
            ("C", "cv_folds", "epochs", "lr"), (0.001, 0.01, 0.1, 1.0, 10.0), search_rows=5000, colour="#17becf",
        ),
        ClassifierSpec(
            "knn", "knn", "linear", "k nearest neighbours, cosine, votes weighted exp(sim / T) (DINO)", _knn,
            ("k", "temperature"), standardise=False, colour="#e377c2",
        ),
    )
}  # fmt: skip


def classifiers() -> tuple[str, ...]:
    """The `--clf` choices."""
    return tuple(dict.fromkeys(s.clf for s in SPECS.values()))


def kernels() -> tuple[str, ...]:
    """The `--kernel` choices."""
    return tuple(dict.fromkeys(s.kernel for s in SPECS.values()))


def method_name(clf: str, kernel: str = "linear") -> str:
    return clf if kernel == "linear" else f"{clf}-{kernel}"


def spec_of(clf: str, kernel: str = "linear") -> ClassifierSpec:
    """The spec of `--clf clf --kernel kernel`; TlfeatError naming the valid choices otherwise."""
    from tlfeat.errors import TlfeatError, did_you_mean

    if clf not in classifiers():
        raise TlfeatError(
            f"unknown classifier {clf!r}; valid: {', '.join(classifiers())}.{did_you_mean(clf, list(classifiers()))}"
        )
    spec = SPECS.get(method_name(clf, kernel))
    if spec is None:
        with_kernel = [s.kernel for s in SPECS.values() if s.clf == clf]
        if kernel not in kernels():
            raise TlfeatError(f"unknown kernel {kernel!r}; valid: {', '.join(kernels())}")
        raise TlfeatError(f"--kernel {kernel} does not apply to --clf {clf} (it takes: {', '.join(with_kernel)})")
    return spec


def clf_help() -> str:
    return "; ".join(f"{s.method}: {s.summary}" for s in SPECS.values() if s.kernel == "linear") + "."


# --------------------------------------------------------------------------- named protocols


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol of a paper, so a number can be set beside the paper's."""

    name: str
    clf: str
    summary: str


PROTOCOL_PREFIX = "protocol:"  # a protocol as a method: protocol:clip

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "clip",
            "logreg",
            "CLIP's linear probe: logistic regression on raw features, C searched over 1e-6..1e6 (a binary search "
            "down to 8 steps per decade) on a validation split of train, then refitted on train + validation",
        ),
        Protocol(
            "dinov2",
            "linear",
            "DINOv2's linear evaluation: a linear layer per learning rate of a 13-value grid, SGD with momentum, "
            "cosine schedule, 12,500 iterations of 128; the best on a validation split of train is tested",
        ),
    )
}


def frozen_methods() -> list[str]:
    """Every method on frozen features, as `--methods` takes it."""
    return [*SPECS, *(PROTOCOL_PREFIX + p for p in PROTOCOLS)]
