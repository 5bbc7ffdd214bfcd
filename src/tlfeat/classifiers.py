"""Classifiers on cached features, as plain scikit-learn estimators.

`make_classifier` returns a Pipeline (standardise, then the estimator), so `clone`,
`GridSearchCV` and `joblib` work unchanged. `LogReg` is scikit-learn's multinomial
LogisticRegression objective with a faster evaluation of it on CPU. `LinearHead` is "replace the
last layer and train only it", done on cached features with PyTorch, under the scikit-learn
estimator contract.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from tlfeat import config
from tlfeat.classifier_specs import Params, spec_of
from tlfeat.errors import TlfeatError


class _LinearScores:
    """Scores of a fitted linear multinomial model: `coef_` (k, d), `intercept_` (k,), `classes_`."""

    classes_: np.ndarray
    coef_: np.ndarray
    intercept_: np.ndarray

    def _encode_classes(self, y: np.ndarray) -> np.ndarray:
        """Set `classes_` and return y as class indices; fewer than 2 classes is an error."""
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; got 1 class: {self.classes_[0]!r}"
            )
        return y_idx

    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_

    def decision_function(self, X: Any) -> np.ndarray:
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        logits = self._logits(X)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]


class LogReg(_LinearScores, ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression: scikit-learn's `LogisticRegression(solver="lbfgs")` objective.

    Minimises mean cross-entropy + ||W||^2 / (2 C n) (intercept not penalised) with scipy's
    L-BFGS-B and the same stopping rule (`tol` on the projected gradient). Two classes get two
    weight rows too, which is binomial logistic regression at 2C (scikit-learn fits one row). Only the evaluation of
    the loss and gradient differs: rows are taken in blocks of `block_rows`, each block's logits and
    its share of the gradient are computed while it is still in cache, blocks are split between
    `n_threads` threads, and BLAS runs one thread per block. On 2 cores and 60,000 x 1280 features:
    61 ms per evaluation, against 111 ms in one thread; a whole fit takes half the time of
    scikit-learn's, whose OpenBLAS threads lose on these tall, skinny products (benchmarks/README.md).

    Args:
        C: inverse regularisation strength, as in LogisticRegression.
        tol: stop when the largest projected-gradient component falls below this.
        max_iter: L-BFGS iterations at most (a ConvergenceWarning says when they run out).
        n_threads: threads for the loss and gradient; None: the CPUs this process may use.
        block_rows: rows per block.
        warm_start: start from the previous fit's solution (same classes and features), as in
            LogisticRegression: along a path of growing C each fit then needs few iterations.
    """

    def __init__(
        self,
        C: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 2000,
        n_threads: int | None = None,
        block_rows: int = 2048,
        warm_start: bool = False,
    ) -> None:
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.n_threads = n_threads
        self.block_rows = block_rows
        self.warm_start = warm_start

    def fit(self, X: Any, y: Any) -> LogReg:
        from threadpoolctl import threadpool_limits

        previous = self._previous()
        X, y = validate_data(self, X, y, dtype=np.float32, order="C")
        check_classification_targets(y)
        if self.C <= 0 or self.tol <= 0 or self.max_iter < 1 or self.block_rows < 1:
            raise ValueError("C and tol must be positive, max_iter and block_rows at least 1")
        old_classes = getattr(self, "classes_", None)
        y_idx = self._encode_classes(y)
        if previous is not None and (
            old_classes is None
            or not np.array_equal(old_classes, self.classes_)
            or previous.shape != ((X.shape[1] + 1) * len(self.classes_),)
        ):
            previous = None
        n, d = X.shape
        k = len(self.classes_)
        threads = max(1, int(self.n_threads or config.cores()))
        blocks = [(lo, min(lo + int(self.block_rows), n)) for lo in range(0, n, int(self.block_rows))]
        chunks = [blocks[i::threads] for i in range(min(threads, len(blocks)))]

        def part(chunk: list[tuple[int, int]], W: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
            total = (0.0, np.zeros((d, k), np.float32), np.zeros(k, np.float64))
            for lo, hi in chunk:
                total = _add(total, block_loss_grad(X[lo:hi], y_idx[lo:hi], W, b))
            return total

        with ThreadPoolExecutor(len(chunks)) as pool, threadpool_limits(1, user_api="blas"):

            def parts(W: np.ndarray, b: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
                return list(pool.map(lambda c: part(c, W, b), chunks)) if len(chunks) > 1 else [part(chunks[0], W, b)]

            self._minimize(parts, n, d, k, previous)
        return self

    def _previous(self) -> np.ndarray | None:
        """The last fit's weights and intercepts as L-BFGS's start, where warm_start asks for them."""
        if not self.warm_start or not hasattr(self, "coef_"):
            return None
        return np.vstack([np.asarray(self.coef_).T, np.asarray(self.intercept_)[None, :]]).ravel()

    def _minimize(self, parts: Any, n: int, d: int, k: int, start: np.ndarray | None = None) -> None:
        """Minimise the penalised mean cross-entropy, given a function summing its terms over row blocks."""
        from scipy.optimize import minimize
        from sklearn.exceptions import ConvergenceWarning

        l2 = 1.0 / (self.C * n)

        def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
            Wb = w.reshape(d + 1, k)
            found = parts(Wb[:d].astype(np.float32), Wb[d].astype(np.float32))
            grad = np.empty((d + 1, k))
            grad[:d] = sum(p[1] for p in found) / n + l2 * Wb[:d]
            grad[d] = sum(p[2] for p in found) / n
            loss = sum(p[0] for p in found) / n + 0.5 * l2 * float((Wb[:d] ** 2).sum())
            return loss, grad.ravel()

        options = {"maxiter": int(self.max_iter), "maxls": 50, "gtol": self.tol, "ftol": 64 * np.finfo(float).eps}
        x0 = np.zeros((d + 1) * k) if start is None else start
        res = minimize(loss_grad, x0, jac=True, method="L-BFGS-B", options=options)
        if res.status == 1:
            warnings.warn(f"LogReg stopped after max_iter={self.max_iter} iterations", ConvergenceWarning, stacklevel=3)
        Wb = res.x.reshape(d + 1, k)
        self.coef_, self.intercept_ = np.ascontiguousarray(Wb[:d].T), Wb[d].copy()
        self.n_iter_ = np.array([res.nit])


def block_loss_grad(
    Xb: np.ndarray, yb: np.ndarray, W: np.ndarray, b: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Cross-entropy summed over one block of rows, and its gradient (W: (d, k), b: (k,)), in one pass in cache."""
    rows = np.arange(len(yb))
    Z = Xb @ W
    Z += b
    Z -= Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    s = E.sum(axis=1)
    loss = float(np.log(s, dtype=np.float64).sum() - Z[rows, yb].sum(dtype=np.float64))
    E /= s[:, None]
    E[rows, yb] -= 1.0  # d(loss)/d(logits) = softmax - one-hot
    return loss, Xb.T @ E, E.sum(axis=0, dtype=np.float64)


def _add(
    a: tuple[float, np.ndarray, np.ndarray], b: tuple[float, np.ndarray, np.ndarray]
) -> tuple[float, np.ndarray, np.ndarray]:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


class LinearHead(_LinearScores, ClassifierMixin, BaseEstimator):
    """A linear layer trained with Adam and cross-entropy on feature vectors.

    Args:
        C: inverse L2 strength, as in LogisticRegression (weight decay = 1 / (C * n_samples)).
        epochs: passes over the training data.
        lr: Adam learning rate.
        batch_size: samples per step.
        random_state: seed for initialisation and shuffling.
    """

    def __init__(
        self, C: float = 1.0, epochs: int = 50, lr: float = 1e-2, batch_size: int = 256, random_state: int = 0
    ) -> None:
        self.C = C
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> LinearHead:
        import torch

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        if self.C <= 0 or self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("C and lr must be positive, epochs and batch_size at least 1")
        y_idx = self._encode_classes(y)
        n, d = X.shape
        layer, optimizer, gen = self.start(n, d)
        Xt, yt = torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y_idx.astype(np.int64))
        self.loss_curve_: list[float] = []
        for _ in range(int(self.epochs)):
            order = torch.randperm(n, generator=gen)
            total = sum(
                self.step(layer, optimizer, Xt[idx], yt[idx]) * len(idx) for idx in order.split(int(self.batch_size))
            )
            self.loss_curve_.append(total / n)
        return self.finish(layer)

    def start(self, n: int, d: int) -> tuple[Any, Any, Any]:
        """A new linear layer (weights ~ N(0, 0.01)), its Adam optimizer (weight decay 1 / (C n)) and its RNG."""
        import torch

        gen = torch.Generator().manual_seed(int(self.random_state))
        layer = torch.nn.Linear(d, len(self.classes_))
        with torch.no_grad():
            layer.weight.normal_(0.0, 0.01, generator=gen)
            layer.bias.zero_()
        return layer, torch.optim.Adam(layer.parameters(), lr=self.lr, weight_decay=1.0 / (self.C * n)), gen

    @staticmethod
    def step(layer: Any, optimizer: Any, Xb: Any, yb: Any) -> float:
        """One optimisation step on one mini-batch; its mean loss."""
        import torch

        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(Xb), yb)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def finish(self, layer: Any) -> LinearHead:
        self.coef_ = layer.weight.detach().numpy().astype(np.float64)
        self.intercept_ = layer.bias.detach().numpy().astype(np.float64)
        self.n_iter_ = int(self.epochs)
        return self


def make_classifier(
    name: str,
    C: float = 1.0,
    kernel: str = "linear",
    epochs: int = 50,
    lr: float = 1e-2,
    seed: int = 0,
    k: int = 20,
    temperature: float = 0.07,
) -> Pipeline:
    """The estimator of `--clf name --kernel kernel` (see `classifier_specs.SPECS`), after a
    standardisation where its spec asks for one. `C` is the inverse regularisation strength."""
    spec = spec_of(name, kernel)
    est = spec.build(Params(C=C, epochs=epochs, lr=lr, seed=seed, k=k, temperature=temperature))
    return Pipeline([("scale", StandardScaler()), ("clf", est)] if spec.standardise else [("clf", est)])


def check_classifier(name: str, kernel: str = "linear") -> None:
    spec_of(name, kernel)


ABSENT_SCORE = -1e30  # the score of a class the classifier never saw: below any real one


def scores(pipeline: Any, X: Any, n_classes: int) -> np.ndarray:
    """Per-class scores for ROC AUC, (n, n_classes), column c for class c: probabilities where the
    model has them, else margins. A class the classifier never saw gets a constant column."""
    est = pipeline[-1] if hasattr(pipeline, "steps") else pipeline
    if hasattr(est, "predict_proba"):
        raw = pipeline.predict_proba(X)
    else:
        raw = pipeline.decision_function(X)
        if raw.ndim == 1:  # binary: margin of the positive class
            raw = np.column_stack([-raw, raw])
    classes = np.asarray(est.classes_, dtype=np.int64)
    out = np.full((raw.shape[0], n_classes), ABSENT_SCORE)
    out[:, classes] = raw
    return out


# --------------------------------------------------------------------------- saving without pickles

LINEAR_FORMAT = "tlfeat-linear-v1"
KNN_FORMAT = "tlfeat-knn-v1"


def _linear_parts(pipeline: Pipeline) -> dict[str, np.ndarray] | None:
    """A standardise + linear pipeline as plain arrays, or None for other models (an RBF SVM)."""
    scale, est = pipeline.named_steps.get("scale"), pipeline[-1]
    est_: Any = est
    if not hasattr(est, "coef_") or not isinstance(est, (LogReg, LinearHead, *_sklearn_linear())):
        return None
    d = np.asarray(est_.coef_).shape[-1]
    return {  # a pipeline without standardisation (--protocol clip) is stored as mean 0, scale 1
        "kind": np.asarray(type(est).__name__),
        "mean": np.zeros(d) if scale is None else np.asarray(scale.mean_, dtype=np.float64),
        "scale": np.ones(d) if scale is None else np.asarray(scale.scale_, dtype=np.float64),
        "coef": np.asarray(est_.coef_, dtype=np.float64),
        "intercept": np.atleast_1d(np.asarray(est_.intercept_, dtype=np.float64)),
        "classes": np.asarray(est_.classes_),
    }


def _sklearn_linear() -> tuple[type, ...]:
    from sklearn.linear_model import SGDClassifier
    from sklearn.svm import LinearSVC

    return LinearSVC, SGDClassifier


def save(pipeline: Pipeline, folder: Path, train: dict[str, str] | None = None) -> dict[str, Any]:
    """Write a fitted pipeline; returns what the record keeps: file name, format, sha256 (and HMAC).

    Linear models are written as arrays (`.npz`, loaded without unpickling anything). A kNN probe
    is its training set: it is written as its settings and the training features' cache file and
    sha256 (`train`), not a second copy of them. Other models are pickled with joblib; those are
    loaded only when their sha256 matches the record's, and, if `TLFEAT_RESULTS_KEY` is set, their
    HMAC under that key (kept outside the results folder).
    """
    import hashlib
    import hmac

    from tlfeat import config, fsio, offline
    from tlfeat.knn import KNNProbe

    parts = _linear_parts(pipeline)
    if isinstance(pipeline[-1], KNNProbe):
        if train is None:
            raise ValueError("a kNN probe is saved with the cache file of its training features")
        path = Path(folder) / "classifier.npz"
        est: Any = pipeline[-1]
        with fsio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh, format=np.asarray(KNN_FORMAT), k=np.asarray(est.k), temperature=np.asarray(est.temperature),
                classes=np.asarray(est.classes_), train_path=np.asarray(train["path"]),
                train_sha256=np.asarray(train["sha256"]),
            )  # fmt: skip
        fmt = KNN_FORMAT
    elif parts is not None:
        path = Path(folder) / "classifier.npz"
        with fsio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            arrays: dict[str, Any] = {"format": np.asarray(LINEAR_FORMAT), **parts}
            np.savez(fh, **arrays)
        fmt = LINEAR_FORMAT
    else:
        import joblib

        path = Path(folder) / "classifier.joblib"
        with fsio.atomic_path(path) as tmp:
            joblib.dump(pipeline, tmp)
        fmt = "joblib"
    out = {"file": path.name, "format": fmt, "sha256": offline.sha256_file(path)}
    if (secret := config.results_key()) is not None:
        out["hmac_sha256"] = hmac.new(secret, path.read_bytes(), hashlib.sha256).hexdigest()
    return out


def load(folder: Path, saved: dict[str, Any]) -> Any:
    """Load a saved classifier after checking it is the file its record describes."""
    import hashlib
    import hmac

    from tlfeat import config, fsio, offline

    path = fsio.inside(Path(folder), saved.get("file"))  # a record never names a file outside its folder
    if not path.is_file() or offline.sha256_file(path) != saved.get("sha256"):
        raise TlfeatError(f"{path} does not match the sha256 in its record; refusing to load it")
    secret = config.results_key()
    if saved.get("format") == "joblib":
        if secret is not None:
            expected = hmac.new(secret, path.read_bytes(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, str(saved.get("hmac_sha256", ""))):
                raise TlfeatError(f"{path} is not signed with TLFEAT_RESULTS_KEY; refusing to unpickle it")
        import joblib

        return joblib.load(path)
    with np.load(path, allow_pickle=False) as f:
        parts = {k: f[k] for k in f.files}
    if str(parts.get("format")) == KNN_FORMAT:
        return _rebuild_knn(parts)
    return _rebuild(parts)


def _rebuild_knn(parts: dict[str, np.ndarray]) -> Pipeline:
    """A kNN probe on the training features it was fitted on, read from the cache and checked."""
    from tlfeat import cache
    from tlfeat.knn import KNNProbe

    source = Path(str(parts["train_path"]))
    if not source.is_file():
        raise TlfeatError(f"the kNN probe's training features {source} are gone (it keeps no copy); extract them again")
    train = cache.read(source, lazy=True)
    if train.sha256 != str(parts["train_sha256"]):
        raise TlfeatError(f"{source} is not the file this kNN probe was fitted on (sha256 differs); fit it again")
    est = KNNProbe(k=int(parts["k"]), temperature=float(parts["temperature"])).fit_rows(np.asarray(train.X), train.y)
    return Pipeline([("clf", est)])


def _rebuild(parts: dict[str, np.ndarray]) -> Pipeline:
    from sklearn.linear_model import SGDClassifier
    from sklearn.svm import LinearSVC

    kinds = {"LogReg": LogReg, "LinearHead": LinearHead, "LinearSVC": LinearSVC, "SGDClassifier": SGDClassifier}
    scale = StandardScaler()
    scale.mean_, scale.scale_ = parts["mean"], parts["scale"]
    scale.var_ = parts["scale"] ** 2
    scale.n_features_in_ = len(parts["mean"])
    scale.n_samples_seen_ = 0
    est: Any = kinds[str(parts["kind"])]()
    est.coef_, est.intercept_, est.classes_ = parts["coef"], parts["intercept"], parts["classes"]
    est.n_features_in_ = parts["coef"].shape[1]
    return Pipeline([("scale", scale), ("clf", est)])
