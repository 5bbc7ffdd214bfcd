"""Stage 2: classifiers on cached features. No image and no CNN is touched here.

For each (model, dataset, layer, ...) with train and test features in the cache: choose C by
cross-validation on the training split (unless given), fit, evaluate on the test split, and save
the fitted pipeline (joblib) beside a JSON record of config, metrics, timings and provenance.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import __version__, cache, classifiers, datasets, metrics
from tlfeat.config import default_cache_dir
from tlfeat.errors import TlfeatError

log = logging.getLogger(__name__)

# C grids per classifier. A linear SVM on standardised CNN features wants small C; larger C only
# slows liblinear's convergence (measured: minutes per fit on 3000 x 1280 at C=10).
C_GRIDS = {
    "logreg": (0.001, 0.01, 0.1, 1.0, 10.0),
    "linear": (0.001, 0.01, 0.1, 1.0, 10.0),
    "svm": (0.0001, 0.001, 0.01, 0.1),
    "svm-rbf": (0.1, 1.0, 10.0, 100.0),
}
CV_MAX_SAMPLES = 3000  # the C search runs on a stratified subset of this size; the final fit on all


def default_results_dir() -> Path:
    return Path(os.environ.get("TLFEAT_RESULTS_DIR") or "results")


@dataclass(frozen=True)
class FitConfig:
    clf: str = "logreg"
    model: str | None = None  # None: every cached model
    data: str | None = None  # None: every cached dataset
    layer: str | None = None  # None: every cached layer
    C: float | None = None  # None: chosen by cross-validation
    kernel: str = "linear"
    epochs: int = 50
    lr: float = 1e-2
    seed: int = 0
    cv_folds: int = 3
    refit: bool = False  # fit again even if a result with this config exists (kept beside it)
    cache_dir: Path | None = None
    results_dir: Path | None = None


@dataclass
class FitResult:
    record: dict[str, Any]
    path: Path  # the record's JSON file
    reused: bool = False


# Provenance fields that must agree between the train and test features of one pair.
PAIR_FIELDS = ("model", "weights_id", "layer", "pooling", "preprocessing", "dataset", "limit", "backend")


def pairs(cfg: FitConfig) -> list[tuple[cache.FeatureSet, cache.FeatureSet]]:
    """(train, test) feature sets in the cache that the config selects."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    dataset_id = datasets.canonical(cfg.data) if cfg.data else None
    groups: dict[str, dict[str, cache.Entry]] = {}
    for entry in cache.scan(cache_dir):
        a = entry.attrs
        if entry.status != "ok":
            continue
        if (cfg.model and a.get("model") != cfg.model) or (dataset_id and a.get("dataset") != dataset_id):
            continue
        if cfg.layer and a.get("layer") != cfg.layer:
            continue
        group = json.dumps({k: a.get(k) for k in PAIR_FIELDS}, sort_keys=True, default=str)
        groups.setdefault(group, {})[str(a.get("split"))] = entry
    what = " ".join(f"--{k} {v}" for k, v in (("model", cfg.model), ("data", cfg.data), ("layer", cfg.layer)) if v)
    if not groups:
        hint = f"tlfeat extract --model {cfg.model or 'mobilenet_v2'} --data {cfg.data or 'digits'}"
        raise TlfeatError(f"no cached features{' for ' + what if what else ''} in {cache_dir}; run `{hint}` first")
    out = []
    for group in groups.values():
        if "train" in group and "test" in group:
            out.append((cache.read(group["train"].path), cache.read(group["test"].path)))
    if not out:
        only = ", ".join(sorted({s for g in groups.values() for s in g}))
        raise TlfeatError(
            f"cached features{' for ' + what if what else ''} have no train+test pair (only: {only}); "
            "extract the missing split with `tlfeat extract ... --split test` (or --split train)"
        )
    out.sort(key=lambda p: (p[0].meta["model"], p[0].meta["dataset"], str(p[0].meta["layer"])))
    return out


def check_pair(train: cache.FeatureSet, test: cache.FeatureSet) -> None:
    diffs = [
        f"{k}: train {train.meta.get(k)!r} vs test {test.meta.get(k)!r}"
        for k in PAIR_FIELDS
        if train.meta.get(k) != test.meta.get(k)
    ]
    if diffs:
        raise TlfeatError(f"train and test features come from different extractions ({'; '.join(diffs)})")
    if train.X.shape[1] != test.X.shape[1]:
        raise TlfeatError(f"train has {train.X.shape[1]} features, test {test.X.shape[1]}: not the same extraction")
    if train.class_names != test.class_names:
        raise TlfeatError(f"train and test have different classes: {train.class_names} vs {test.class_names}")
    present = np.unique(train.y)
    if len(present) < 2:
        raise TlfeatError(
            f"training features of {train.meta.get('dataset')} hold one class only "
            f"({train.class_names[int(present[0])] if len(present) else 'none'}); a classifier needs 2 or more"
        )


def config_key(cfg: FitConfig, train: cache.FeatureSet, test: cache.FeatureSet) -> str:
    fields = {
        "clf": cfg.clf,
        "C": cfg.C,
        "kernel": cfg.kernel,
        "seed": cfg.seed,
        "cv_folds": cfg.cv_folds,
        "train": train.meta.get("features_sha256"),
        "test": test.meta.get("features_sha256"),
    }
    if cfg.clf == "linear":
        fields.update(epochs=cfg.epochs, lr=cfg.lr)
    if cfg.clf == "logreg":
        fields["solver"] = "tlfeat.LogReg"  # results of scikit-learn's LogisticRegression are not reused
    return cache.cache_key(fields)


def choose_C(cfg: FitConfig, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Cross-validated choice of C on (a stratified subset of) the training split."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    if cfg.C is not None:
        return {"C": float(cfg.C), "chosen_by": "user"}
    grid = C_GRIDS[cfg.clf if cfg.kernel == "linear" else f"{cfg.clf}-{cfg.kernel}"]
    idx = datasets.stratified_subset(y, CV_MAX_SAMPLES, seed=cfg.seed)
    folds = min(cfg.cv_folds, int(np.unique(y[idx], return_counts=True)[1].min()))
    if folds < 2:
        return {"C": 1.0, "chosen_by": "default (too few samples per class for cross-validation)"}
    search = GridSearchCV(
        classifiers.make_classifier(cfg.clf, kernel=cfg.kernel, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed),
        {"clf__C": list(grid)},
        cv=StratifiedKFold(folds, shuffle=True, random_state=cfg.seed),
        scoring="accuracy",
        n_jobs=1,
    )
    t0 = time.perf_counter()
    search.fit(X[idx], y[idx])
    return {
        "C": float(search.best_params_["clf__C"]),
        "chosen_by": f"{folds}-fold cross-validation",
        "grid": list(grid),
        "cv_accuracy": [float(s) for s in search.cv_results_["mean_test_score"]],
        "cv_samples": len(idx),
        "cv_seconds": time.perf_counter() - t0,
    }


def fit_pair(cfg: FitConfig, train: cache.FeatureSet, test: cache.FeatureSet) -> FitResult:
    check_pair(train, test)
    results_dir = Path(cfg.results_dir) if cfg.results_dir else default_results_dir()
    key = config_key(cfg, train, test)
    meta = train.meta
    run_dir = results_dir / "fits" / f"{meta['model']}__{datasets.dataset_slug(str(meta['dataset']))}__{cfg.clf}__{key}"
    record_path = run_dir / "record.json"
    if record_path.is_file() and not cfg.refit:
        return FitResult(json.loads(record_path.read_text()), record_path, reused=True)
    if record_path.is_file():  # --refit: keep the earlier result, write a new one beside it
        run_dir = run_dir.with_name(run_dir.name + datetime.now(timezone.utc).strftime("-%Y%m%dT%H%M%S%f"))
        record_path = run_dir / "record.json"

    with cache.lock(run_dir):  # a second process fitting the same config waits, then reuses
        if record_path.is_file() and not cfg.refit:
            return FitResult(json.loads(record_path.read_text()), record_path, reused=True)
        return _fit_and_save(cfg, train, test, key, run_dir, record_path)


def _fit_and_save(
    cfg: FitConfig, train: cache.FeatureSet, test: cache.FeatureSet, key: str, run_dir: Path, record_path: Path
) -> FitResult:
    import joblib
    import sklearn

    meta = train.meta
    cv = choose_C(cfg, train.X, train.y)
    pipeline = classifiers.make_classifier(
        cfg.clf, C=cv["C"], kernel=cfg.kernel, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed
    )
    t0 = time.perf_counter()
    pipeline.fit(train.X, train.y)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    y_pred = pipeline.predict(test.X)
    predict_seconds = time.perf_counter() - t0
    result_metrics = metrics.evaluate(test.y, y_pred, classifiers.scores(pipeline, test.X), list(train.class_names))

    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = run_dir / "classifier.joblib"
    tmp = model_path.with_name(f".{model_path.name}.{os.getpid()}")
    joblib.dump(pipeline, tmp)
    os.replace(tmp, model_path)
    from tlfeat.offline import sha256_file

    record = {
        "kind": "fit",
        "key": key,
        "method": cfg.clf if cfg.kernel == "linear" else f"{cfg.clf}-{cfg.kernel}",
        "clf": cfg.clf,
        "model": meta["model"],
        "dataset": meta["dataset"],
        "layer": meta["layer"],
        "weights_id": meta["weights_id"],
        "pretrained": bool(meta.get("pretrained", True)),
        "image_size": meta.get("image_size"),
        "limit": meta.get("limit") or None,
        "n_train": len(train),
        "n_test": len(test),
        "n_skipped": {fs.split: len(fs.meta.get("skipped") or []) for fs in (train, test)},
        "n_features": int(train.X.shape[1]),
        "n_classes": len(train.class_names),
        "class_names": list(train.class_names),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "params": {
            "C": cv["C"],
            "kernel": cfg.kernel if cfg.clf == "svm" else None,
            **({"epochs": cfg.epochs, "lr": cfg.lr} if cfg.clf == "linear" else {}),
        },
        "cv": cv,
        "metrics": result_metrics,
        "timings": {
            "fit_seconds": fit_seconds,
            "cv_seconds": cv.get("cv_seconds", 0.0),
            "predict_seconds": predict_seconds,
            "train_seconds": fit_seconds + cv.get("cv_seconds", 0.0),
            "extract_seconds": float(train.meta.get("extract_seconds", 0.0))
            + float(test.meta.get("extract_seconds", 0.0)),
        },
        "features": {
            split.split: {
                "path": str(split.path),
                "sha256": split.meta.get("features_sha256"),
                "key_fields": json.loads(str(split.meta.get("key_fields", "{}"))),
            }
            for split in (train, test)
        },
        "classifier_file": model_path.name,
        "classifier_sha256": sha256_file(model_path),
        "versions": {"tlfeat": __version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, record_path)
    log.info("%s on %s/%s: accuracy %.4f", cfg.clf, meta["model"], meta["dataset"], result_metrics["accuracy"])
    return FitResult(record, record_path)


def fit(cfg: FitConfig) -> list[FitResult]:
    """Fit `cfg.clf` on every selected (train, test) pair in the cache."""
    classifiers.check_classifier(cfg.clf, cfg.kernel)
    if cfg.C is not None and cfg.C <= 0:
        raise TlfeatError(f"--C must be positive, got {cfg.C}")
    if cfg.epochs < 1:
        raise TlfeatError(f"--epochs must be at least 1, got {cfg.epochs}")
    return [fit_pair(cfg, train, test) for train, test in pairs(cfg)]


def load_classifier(record_path: Path) -> Any:
    """Load a saved classifier after checking it is the file its record describes."""
    import joblib

    from tlfeat.offline import sha256_file

    record = json.loads(Path(record_path).read_text())
    path = Path(record_path).parent / record["classifier_file"]
    if sha256_file(path) != record["classifier_sha256"]:
        raise TlfeatError(f"{path} does not match the sha256 in its record; refusing to unpickle it")
    return joblib.load(path)


def load_records(results_dir: Path | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    root = Path(results_dir) if results_dir else default_results_dir()
    out = []
    for path in sorted(root.glob("*/*/record.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("skipping unreadable record %s", path)
            continue
        if kind is None or record.get("kind") == kind:
            record["_path"] = str(path)
            out.append(record)
    return out


def table(
    records: list[dict[str, Any]], metric: str = "accuracy"
) -> tuple[list[str], list[str], dict[tuple[str, str], float | None]]:
    """Rows (models) x columns (datasets) of `metric`, as transfer-learning papers lay it out."""
    rows = sorted({r["model"] for r in records})
    cols = sorted({_short(r["dataset"]) for r in records})
    cells = {(r["model"], _short(r["dataset"])): r["metrics"].get(metric) for r in records}
    return rows, cols, cells


def _short(dataset: str) -> str:
    return dataset if "/" not in dataset else Path(dataset).name
