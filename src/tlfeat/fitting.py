"""Stage 2: classifiers on cached features. No image and no CNN is touched here.

For each (train, test) pair of cached feature sets the config selects: choose C by
cross-validation on the training split (unless given), fit, evaluate on the test split, and save
the classifier beside a `RunRecord`. A result is keyed by the classifier's config and the
checksums of both feature sets (features, labels and ids), so features that were updated or
edited are never matched with an old result.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import __version__, cache, catalog, classifiers, constraints, datasets, freshness, fsio, metrics, progress
from tlfeat.backbones.base import slug
from tlfeat.config import FitConfig
from tlfeat.errors import CacheDamaged, TlfeatError, TooFewClasses
from tlfeat.records import Method, RunRecord, Timings, load_now, load_record, variants

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

# Provenance fields that must agree between the train and test features of one pair.
PAIR_FIELDS = (
    "model",
    "weights_id",
    "layer",
    "pooling",
    "preprocessing",
    "dataset",
    "backend",
    "precision",
    "label_field",
)


@dataclass(frozen=True)
class Pair:
    train: catalog.Entry
    test: catalog.Entry

    @property
    def attrs(self) -> dict[str, Any]:
        return self.train.attrs


@dataclass
class FitResult:
    record: RunRecord
    path: Path  # the record's JSON file
    reused: bool = False


def _group(attrs: dict[str, Any]) -> str:
    return json.dumps({k: attrs.get(k) for k in PAIR_FIELDS}, sort_keys=True, default=str)


def pairs(cfg: FitConfig) -> list[Pair]:
    """(train, test) feature sets in the cache that the config selects: every variant, none dropped."""
    dataset_id = datasets.canonical(cfg.data) if cfg.data else None
    per_split = ("limit", "test_limit", "subset_seed")  # selectors of the train or the test file only
    wanted = {k: v for k, v in cfg.selectors().items() if k not in per_split}
    entries = [
        e
        for e in catalog.scan(cfg.cache_dir)
        if (not cfg.model or e.attrs.get("model") == cfg.model)
        and (not dataset_id or e.attrs.get("dataset") == dataset_id)
        and catalog.matches(e.attrs, **wanted)
    ]
    ok = [e for e in entries if e.status == "ok"]
    damaged = [e for e in entries if e.status == "damaged"]
    what = " ".join(
        f"--{k} {v}" for k, v in (("model", cfg.model), ("data", cfg.data), *wanted.items()) if v is not None
    )
    if not ok:
        if damaged:
            raise CacheDamaged(damaged[0].problem)
        hint = f"tlfeat extract --model {cfg.model or 'mobilenet_v2'} --data {cfg.data or 'digits'}"
        raise TlfeatError(f"no cached features{' for ' + what if what else ''} in {cfg.cache_dir}; run `{hint}` first")
    groups: dict[str, dict[str, list[catalog.Entry]]] = {}
    for e in ok:
        groups.setdefault(_group(e.attrs), {}).setdefault(str(e.attrs.get("split")), []).append(e)
    out = []
    for group in groups.values():
        trains = [
            e for e in group.get("train", []) if catalog.matches(e.attrs, limit=cfg.limit, subset_seed=cfg.subset_seed)
        ]
        tests = [e for e in group.get("test", []) if catalog.matches(e.attrs, limit=cfg.test_limit)]
        out += [Pair(tr, te) for tr in trains for te in tests]
    for e in damaged:
        log.warning("%s", e.problem)
    if not out:
        asked = {"train": cfg.limit, "test": cfg.test_limit}
        for split, option in (("train", "--limit"), ("test", "--test-limit")):
            present = [e for g in groups.values() for e in g.get(split, [])]
            if (
                present
                and asked[split] is not None
                and not any(catalog.matches(e.attrs, limit=asked[split]) for e in present)
            ):
                cached = sorted({int(e.attrs.get("limit") or 0) for e in present})
                shown = ", ".join(f"{option} {n}" if n else "the whole split" for n in cached)
                raise TlfeatError(
                    f"no cached {split} features{' for ' + what if what else ''} with {option} {asked[split]} "
                    f"(cached: {shown}); extract them with `tlfeat extract ... {option} {asked[split]}`"
                )
        raise TlfeatError(_no_pair(cfg, groups, what, damaged))
    out.sort(
        key=lambda p: (
            tuple(str(p.attrs.get(k)) for k in ("model", "dataset", "layer", "image_size", "limit"))
            + (str(p.test.attrs.get("limit")),)
        )
    )
    return out


def _no_pair(cfg: FitConfig, groups: dict[str, dict[str, list[catalog.Entry]]], what: str, damaged: list[Any]) -> str:
    """Why no train+test pair was found, and the exact `tlfeat extract` command that makes one."""
    from tlfeat.extraction import extract_command

    for group in sorted(groups.values(), key=lambda g: "train" not in g):  # a missing test split is the cheaper one
        split, other = ("train", "test") if "train" in group else ("test", "train")
        if other in group:
            continue
        lone = group[split][0].attrs
        near = [  # the other split, from an extraction that differs in the backend alone
            e.attrs
            for g in groups.values()
            for e in g.get(other, [])
            if {k: v for k, v in e.attrs.items() if k in PAIR_FIELDS and k != "backend"}
            == {k: v for k, v in lone.items() if k in PAIR_FIELDS and k != "backend"}
        ]
        command = extract_command(lone, other, cache_dir=cfg.cache_dir)
        if near:
            return (
                f"the {split} features of {datasets.short_name(str(lone.get('dataset')))} come from backend "
                f"{lone.get('backend')} and the {other} features from {near[0].get('backend')}, so they do not pair; "
                f"run `{command}`"
            )
        broken = f"; damaged: {damaged[0].path.name} (extract rebuilds it)" if damaged else ""
        return f"cached features{' for ' + what if what else ''} have no train+test pair (only: {split}{broken}); run `{command}`"
    return f"cached features{' for ' + what if what else ''} have no train+test pair"


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
        raise TooFewClasses(
            f"training features of {datasets.short_name(str(train.meta.get('dataset')))} hold one class only "
            f"({train.class_names[int(present[0])] if len(present) else 'none'}); a classifier needs 2 or more"
        )


def config_key(cfg: FitConfig, train_sha: str, test_sha: str, route: str) -> str:
    """The result key: the classifier's `key` fields (the route as it resolved: memory and streaming
    solve with different solvers) and the checksums of both feature sets."""
    fields: dict[str, Any] = {name: getattr(cfg, name) for name in constraints.key_fields(cfg)}
    if cfg.clf != "linear":
        fields.pop("epochs"), fields.pop("lr")
    fields.update(
        route=route, train=train_sha, test=test_sha, solver="tlfeat.LogReg" if cfg.clf == "logreg" else cfg.clf
    )
    return cache.cache_key(fields)


def record_path(cfg: FitConfig, attrs: dict[str, Any], train_sha: str, test_sha: str) -> Path:
    """Where the record of this fit is (or will be) saved: compare asks before running anything."""
    data_slug = datasets.dataset_slug(str(attrs["dataset"]))
    key = config_key(cfg, train_sha, test_sha, resolve_route(cfg, attrs))
    return (
        Path(cfg.results_dir)
        / "fits"
        / f"{slug(str(attrs['model']))}__{data_slug}__{Method.frozen(cfg.clf, cfg.kernel).slug}__{key}"
        / "record.json"
    )


def choose_C(cfg: FitConfig, X: Any, y: np.ndarray, ids: list[str]) -> dict[str, Any]:
    """Cross-validated choice of C on (a stratified subset of) the training split."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    if cfg.C is not None:
        return {"C": float(cfg.C), "chosen_by": "user"}
    grid = C_GRIDS[cfg.method]
    idx = datasets.stratified_subset(y, CV_MAX_SAMPLES, seed=cfg.seed, ids=ids)
    counts = np.unique(y[idx], return_counts=True)[1]
    folds = min(cfg.cv_folds, int(counts.min()))
    if folds < 2:
        return {"C": 1.0, "chosen_by": "default (too few samples per class for cross-validation)"}
    progress.status(
        f"{cfg.method}: choosing C among {len(grid)} values by {folds}-fold cross-validation on {len(idx)} training images"
    )
    search = GridSearchCV(
        classifiers.make_classifier(cfg.clf, kernel=cfg.kernel, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed),
        {"clf__C": list(grid)},
        cv=StratifiedKFold(folds, shuffle=True, random_state=cfg.seed),
        scoring="accuracy",
        n_jobs=1,
    )
    t0 = time.perf_counter()
    search.fit(np.asarray(X[idx]), y[idx])  # a subset: in memory also when X streams from disk
    return {
        "C": float(search.best_params_["clf__C"]),
        "chosen_by": f"{folds}-fold cross-validation",
        "grid": list(grid),
        "cv_accuracy": [float(s) for s in search.cv_results_["mean_test_score"]],
        "cv_samples": len(idx),
        "cv_seconds": time.perf_counter() - t0,
    }


def resolve_route(cfg: FitConfig, attrs: dict[str, Any]) -> str:
    """memory, or streaming when the features would not fit the memory the fit may use."""
    from tlfeat import outofcore

    if cfg.route != "auto":
        route = "memory" if cfg.route == "memory" else "streaming"
    else:
        budget = int(cfg.memory_gb * 1e9) if cfg.memory_gb else None
        dim = int(attrs.get("n_features") or 0)
        route = "streaming" if outofcore.needs_streaming(int(attrs.get("n_images", 0)), dim, budget) else "memory"
    if route == "streaming" and cfg.clf == "svm" and cfg.kernel != "linear":
        why = "--route streaming" if cfg.route == "streaming" else "these features do not fit --memory-gb"
        raise TlfeatError(
            f"--kernel {cfg.kernel} has no streamed fit ({why}): an RBF SVM needs every training row in memory; "
            "use --route memory (with enough --memory-gb) or the linear kernel"
        )
    return route


def fit_pair(cfg: FitConfig, pair: Pair) -> FitResult:
    """Fit one pair, or reuse its saved result."""
    train_sha, test_sha = str(pair.train.attrs.get("sha256")), str(pair.test.attrs.get("sha256"))
    path = record_path(cfg, pair.attrs, train_sha, test_sha)
    if not cfg.refit and (record := load_record(path)) is not None:
        return FitResult(record, path, reused=True)
    if cfg.refit and path.is_file():  # --refit: keep the earlier result, write a new one beside it
        stamp = datetime.now(timezone.utc).strftime("-%Y%m%dT%H%M%S%f")
        path = path.parent.with_name(path.parent.name + stamp) / "record.json"
    route = resolve_route(cfg, pair.train.attrs)
    lazy = route == "streaming"
    train, test = cache.read(pair.train.path, lazy=lazy), cache.read(pair.test.path, lazy=lazy)
    check_pair(train, test)
    with fsio.lock(path.parent):  # a second process fitting the same config waits, then reuses
        if not cfg.refit and (record := load_record(path)) is not None:
            return FitResult(record, path, reused=True)
        fsio.sweep_temps(path.parent)
        return FitResult(_fit_and_save(cfg, train, test, path, route), path)


def _train(cfg: FitConfig, train: cache.FeatureSet, route: str) -> tuple[Any, dict[str, Any], float]:
    """The fitted pipeline, how C was chosen, and the fit's seconds."""
    from tlfeat import outofcore

    cv = choose_C(cfg, train.X, train.y, train.ids)
    t0 = time.perf_counter()
    if route == "streaming":
        if cfg.clf == "svm":
            log.warning(
                "svm on the streamed route is SGD on the hinge loss: it can fall short of LinearSVC's solution, "
                "most on small training sets (use --route memory where the features fit in memory)"
            )
        pipeline = outofcore.fit(cfg.clf, train, cv["C"], cfg.epochs, cfg.lr, cfg.seed)
    else:
        pipeline = classifiers.make_classifier(
            cfg.clf, C=cv["C"], kernel=cfg.kernel, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed
        )
        pipeline.fit(train.X, train.y)
    return pipeline, cv, time.perf_counter() - t0


def _evaluate(
    pipeline: Any, train: cache.FeatureSet, test: cache.FeatureSet, route: str
) -> tuple[dict[str, Any], float]:
    from tlfeat import outofcore

    t0 = time.perf_counter()
    n_classes = len(train.class_names)
    if route == "streaming":
        y_pred, scores = outofcore.predict(pipeline, test, n_classes)
    else:
        y_pred, scores = pipeline.predict(test.X), classifiers.scores(pipeline, test.X, n_classes)
    seconds = time.perf_counter() - t0
    return metrics.evaluate(test.y, y_pred, scores, list(train.class_names), test.ids), seconds


def _fit_and_save(cfg: FitConfig, train: cache.FeatureSet, test: cache.FeatureSet, path: Path, route: str) -> RunRecord:
    load_start, cpus = load_now()
    pipeline, cv, fit_seconds = _train(cfg, train, route)
    result_metrics, predict_seconds = _evaluate(pipeline, train, test, route)
    saved = classifiers.save(pipeline, path.parent)
    timings = Timings(
        train_seconds=fit_seconds,
        search_seconds=float(cv.get("cv_seconds", 0.0)),
        predict_seconds=predict_seconds,
        extract_seconds=float(train.meta.get("extract_seconds", 0.0)) + float(test.meta.get("extract_seconds", 0.0)),
        load_start=load_start,
        load_end=load_now()[0],
        cpus=cpus,
    ).finish()
    record = _record(cfg, train, test, path, result_metrics, timings)
    record.provenance["classifier"] = saved
    record.params["C"] = cv["C"]
    absent = sorted(set(range(len(train.class_names))) - set(np.unique(train.y).tolist()))
    record.details.update(
        cv=cv,
        route=route,
        solver=type(pipeline[-1]).__name__
        + (" (hinge loss, streamed)" if route == "streaming" and cfg.clf == "svm" else ""),
        n_skipped={fs.split: len(fs.meta.get("skipped") or []) for fs in (train, test)},
        classes_without_training_images=[train.class_names[i] for i in absent],
        n_features=int(train.X.shape[1]),
    )
    record.save(path)
    log.info("%s on %s/%s: accuracy %.4f", cfg.method, train.model, train.meta["dataset"], result_metrics["accuracy"])
    return record


def _record(
    cfg: FitConfig,
    train: cache.FeatureSet,
    test: cache.FeatureSet,
    path: Path,
    result_metrics: dict[str, Any],
    timings: Timings,
) -> RunRecord:
    import sklearn

    meta = train.meta
    return RunRecord(
        kind="fit",
        key=path.parent.name.rsplit("__", 1)[-1].split("-")[0],
        method=cfg.method,
        model=str(meta["model"]),
        dataset=str(meta["dataset"]),
        layer=str(meta["layer"]),
        weights_id=str(meta["weights_id"]),
        pretrained=bool(meta.get("pretrained", True)),
        image_size=meta.get("image_size"),
        limit=int(meta.get("limit") or 0) or None,
        test_limit=int(test.meta.get("limit") or 0) or None,
        subset_seed=int(meta.get("subset_seed") or 0),
        seed=cfg.seed,
        n_train=len(train),
        n_test=len(test),
        n_classes=len(train.class_names),
        class_names=list(train.class_names),
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        params={
            "C": None,
            "kernel": cfg.kernel if cfg.clf == "svm" else None,
            **({"epochs": cfg.epochs, "lr": cfg.lr} if cfg.clf == "linear" else {}),
        },
        metrics=result_metrics,
        timings=timings,
        provenance={
            "features": {
                fs.split: {
                    "path": str(fs.path),
                    "sha256": fs.sha256,
                    "key_fields": json.loads(str(fs.meta.get("key_fields", "{}"))),
                }
                for fs in (train, test)
            },
            "versions": {
                "tlfeat": __version__,
                "scikit-learn": sklearn.__version__,
                "python": platform.python_version(),
            },
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def fit(
    cfg: FitConfig, allow_stale: bool = False, data_dir: Path | None = None, skipped: list[str] | None = None
) -> list[FitResult]:
    """Fit `cfg.clf` on every selected (train, test) pair in the cache. Where several are selected, a
    pair whose training features hold one class is left out and named in `skipped` (when given)."""
    selected = pairs(cfg)
    if not allow_stale:
        freshness.require_fresh([e for p in selected for e in (p.train, p.test)], data_dir)
    out, why = [], []
    for p in selected:
        try:
            out.append(fit_pair(cfg, p))
        except TooFewClasses as exc:
            if len(selected) == 1:
                raise
            why.append(f"{p.train.path.name} ({catalog.describe_variant(p.attrs)}): {exc}")
            if skipped is None:
                log.warning("skipped %s", why[-1])
    if not out:
        raise TooFewClasses(f"no selected feature set can be fitted: {why[0]}")
    if skipped is not None:
        skipped += why
    return out


def load_classifier(record_path: Path) -> Any:
    """The saved classifier of a fit, checked against its record before it is loaded."""
    record = RunRecord.load(record_path)
    saved = record.provenance.get("classifier") or {
        "file": record.details.get("classifier_file"),
        "sha256": record.details.get("classifier_sha256"),
        "format": "joblib",
    }
    return classifiers.load(Path(record_path).parent, saved)


# --------------------------------------------------------------------------- tables


def table(
    records: list[RunRecord], metric: str = "accuracy"
) -> tuple[list[str], list[str], dict[tuple[str, str], float | None]]:
    """Rows (models, one per variant) x columns (datasets) of `metric`; no variant is dropped."""
    names = datasets.display_names(r.dataset for r in records)  # two folders named "data" are two columns
    by_pair: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        by_pair.setdefault((r.model, r.dataset), []).append(r)
    cells: dict[tuple[str, str], float | None] = {}
    for (model, dataset), group in by_pair.items():
        labels = variants(group)
        for r in group:
            row = model + (f" [{labels[id(r)]}]" if labels[id(r)] else "")
            if (row, names[dataset]) in cells:  # the same configuration fitted again (--refit)
                row += f" [{Path(r.path).parent.name if r.path else r.created}]"
            cells[(row, names[dataset])] = r.metrics.get(metric)
    rows = sorted({k[0] for k in cells})
    cols = sorted({k[1] for k in cells})
    return rows, cols, cells


__all__ = ["FitConfig", "FitResult", "Pair", "fit", "fit_pair", "load_classifier", "pairs", "table"]
