"""Stage 2: classifiers on cached features. No image and no CNN is touched here.

For each (train, test) pair of cached feature sets the config selects: choose C (unless given) on a
validation split of the training images along a warm-started path (`selection`), or follow a paper's
protocol (`protocols`), fit, evaluate on the test split, and save the classifier beside a `RunRecord`.
`--layer a+b` fits concatenated layers (`concat`), `--shots N` a k-shot subset of the training images. A result is keyed by the classifier's config and the
checksums of both feature sets (features, labels and ids), so features that were updated or
edited are never matched with an old result.
"""

from __future__ import annotations

import itertools
import json
import logging
import platform
import shlex
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import (
    __version__,
    backbones,
    cache,
    catalog,
    classifier_specs,
    classifiers,
    concat,
    constraints,
    datasets,
    freshness,
    fsio,
    metrics,
    overlap,
    progress,
    selection,
)
from tlfeat.backbones.base import slug
from tlfeat.config import FitConfig, with_changes
from tlfeat.errors import CacheDamaged, TlfeatError, TooFewClasses
from tlfeat.records import FITS, Method, RunRecord, Timings, load_now, load_record, variants

log = logging.getLogger(__name__)

SHOT_SEED = 2**31  # k-shot draw d hashes the ids with seed SHOT_SEED + d: unrelated to --limit subsets

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
    """A train and a test feature set; for concatenated layers, `parts` holds one pair per layer and
    `train`/`test` show the concatenation's attributes."""

    train: catalog.Entry
    test: catalog.Entry
    parts: tuple[Pair, ...] = ()

    @property
    def attrs(self) -> dict[str, Any]:
        return self.train.attrs

    def entries(self) -> list[catalog.Entry]:
        """The cache files behind the pair."""
        return [e for p in self.parts for e in (p.train, p.test)] if self.parts else [self.train, self.test]

    def read(self, lazy: bool) -> tuple[cache.FeatureSet, cache.FeatureSet]:
        if not self.parts:
            return cache.read(self.train.path, lazy=lazy), cache.read(self.test.path, lazy=lazy)
        layer = str(self.attrs["layer"])
        sets = [p.read(lazy) for p in self.parts]
        return concat.join(layer, [s[0] for s in sets]), concat.join(layer, [s[1] for s in sets])


def concatenated(layer: str, parts: list[Pair]) -> Pair:
    """The pair of `layer` (a+b+c) made of one pair per part."""
    train = catalog.Entry(parts[0].train.path, concat.combined_attrs(layer, [p.train.attrs for p in parts]), "ok")
    test = catalog.Entry(parts[0].test.path, concat.combined_attrs(layer, [p.test.attrs for p in parts]), "ok")
    return Pair(train, test, tuple(parts))


def _concat_pairs(cfg: FitConfig) -> list[Pair]:
    """Pairs of a concatenation: for each variant cached for every part, one pair of their pairs."""
    layer = str(cfg.layer)
    found = [pairs(with_changes(cfg, layer=part)) for part in concat.parts(layer)]

    def variant(p: Pair) -> str:
        # The pooling belongs to each part (a timm stage pools by global average, its penultimate
        # layer is the pre-logits): compared within a part, never across parts.
        fields = {k: p.train.attrs.get(k) for k in PAIR_FIELDS if k not in ("layer", "pooling")}
        fields.update(limit=p.train.attrs.get("limit"), subset=p.train.attrs.get("subset_seed"))
        return json.dumps({**fields, "test_limit": p.test.attrs.get("limit")}, sort_keys=True, default=str)

    common = set.intersection(*({variant(p) for p in group} for group in found))
    if not common:
        raise TlfeatError(
            f"no extraction holds every layer of --layer {layer}; extract them in one pass with "
            f"`tlfeat extract ... --layer {layer}`"
        )
    return [
        concatenated(layer, list(combo))
        for v in sorted(common)
        for combo in itertools.product(*([p for p in group if variant(p) == v] for group in found))
    ]


@dataclass
class FitResult:
    record: RunRecord
    path: Path  # the record's JSON file
    reused: bool = False


def _group(attrs: dict[str, Any]) -> str:
    return json.dumps({k: attrs.get(k) for k in PAIR_FIELDS}, sort_keys=True, default=str)


def pairs(cfg: FitConfig) -> list[Pair]:
    """(train, test) feature sets in the cache that the config selects: every variant, none dropped."""
    if concat.is_concat(cfg.layer):
        return _concat_pairs(cfg)
    dataset_id = datasets.canonical(cfg.data) if cfg.data else None
    per_split = ("limit", "test_limit", "subset_seed")  # selectors of the train or the test file only
    wanted = {k: v for k, v in cfg.selectors().items() if k not in per_split}
    entries = [
        e
        for e in catalog.scan(cfg.cache_dir)
        if (not cfg.model or backbones.selects(cfg.model, e.attrs.get("model"), e.attrs.get("weights_id")))
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
        name, untrained = backbones.split_variant(cfg.model or "mobilenet_v2")
        hint = shlex.join(
            [
                "tlfeat",
                "extract",
                "--model",
                name,
                "--data",
                cfg.data or "digits",
                *(["--untrained"] if untrained else []),
            ]
        )
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
    spec = cfg.spec
    unused = set(classifier_specs.OPTIONS) - set(spec.options)
    if cfg.protocol:  # the protocol sets these itself
        unused |= {"C", "cv_folds", "epochs", "lr"}
    fields: dict[str, Any] = {n: getattr(cfg, n) for n in constraints.key_fields(cfg) if n not in unused}
    if cfg.shots is None:
        fields.pop("shot_draw")
    fields.update(
        route=route, train=train_sha, test=test_sha, solver="tlfeat.LogReg" if cfg.clf == "logreg" else cfg.clf
    )
    if spec.has_C and cfg.C is None and not cfg.protocol:
        fields["search"] = selection.SEARCH
    return cache.cache_key(fields)


def record_path(cfg: FitConfig, attrs: dict[str, Any], train_sha: str, test_sha: str) -> Path:
    """Where the record of this fit is (or will be) saved: compare asks before running anything."""
    data_slug = datasets.dataset_slug(str(attrs["dataset"]))
    key = config_key(cfg, train_sha, test_sha, resolve_route(cfg, attrs))
    return (
        Path(cfg.results_dir)
        / FITS
        / f"{slug(str(attrs['model']))}__{data_slug}__{Method.frozen(cfg.clf, cfg.kernel, cfg.protocol).slug}{_shots_tag(cfg)}__{key}"
        / "record.json"
    )


def _shots_tag(cfg: FitConfig) -> str:
    return "" if cfg.shots is None else f"-{cfg.shots}shot-draw{cfg.shot_draw}"


def choose_C(cfg: FitConfig, X: Any, y: np.ndarray, ids: list[str]) -> dict[str, Any]:
    """C as given, or chosen on the training split (see `selection`); nothing for a classifier without C."""
    spec = cfg.spec
    if not spec.has_C:
        return {"C": None, "chosen_by": f"{spec.method} has no C"}
    if cfg.C is not None:
        return {"C": float(cfg.C), "chosen_by": "user"}
    params = classifier_specs.Params(epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed, k=cfg.k, temperature=cfg.temperature)
    progress.status(f"{spec.method}: choosing C on {len(y)} training images")
    return selection.choose_C(spec, params, X, y, ids, cfg.seed, cfg.cv_folds)


def shot_subset(y: np.ndarray, shots: int, draw: int, ids: list[str]) -> np.ndarray:
    """`shots` training images per class (all of a class that has fewer), chosen by a hash of their ids:
    draw d always picks the same images, another draw others."""
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        picked = datasets.stratified_subset(y[members], shots, seed=SHOT_SEED + draw, ids=[ids[i] for i in members])
        chosen.append(members[picked])
    return np.sort(np.concatenate(chosen))


def resolve_route(cfg: FitConfig, attrs: dict[str, Any]) -> str:
    """memory, or streaming when the features would not fit the memory the fit may use."""
    from tlfeat import outofcore

    if cfg.route != "auto":
        route = "memory" if cfg.route == "memory" else "streaming"
    elif cfg.shots is not None:  # a few images per class: always in memory
        route = "memory"
    else:
        budget = int(cfg.memory_gb * 1e9) if cfg.memory_gb else None
        dim = int(attrs.get("n_features") or 0)
        route = "streaming" if outofcore.needs_streaming(int(attrs.get("n_images", 0)), dim, budget) else "memory"
    why = "--route streaming" if cfg.route == "streaming" else "these features do not fit --memory-gb"
    if route == "streaming" and not cfg.spec.streams:
        raise TlfeatError(
            f"{cfg.spec.method} has no streamed fit ({why}): it needs every training row in memory; "
            "use --route memory (with enough --memory-gb) or another classifier"
        )
    if route == "streaming" and cfg.protocol:
        raise TlfeatError(
            f"--protocol {cfg.protocol} fits in memory only ({why}); use --route memory with enough --memory-gb"
        )
    return route


def fit_pair(cfg: FitConfig, pair: Pair) -> FitResult:
    """Fit one pair, or reuse its saved result."""
    train_sha, test_sha = str(pair.train.attrs.get("sha256")), str(pair.test.attrs.get("sha256"))
    path = record_path(cfg, pair.attrs, train_sha, test_sha)
    first = pair.parts[0] if pair.parts else pair  # concatenated layers: every part holds the same images
    shared = overlap.check(first.train.path, first.test.path, datasets.short_name(str(pair.attrs.get("dataset"))))
    if not cfg.refit and (record := load_record(path)) is not None:
        return FitResult(record, path, reused=True)
    if cfg.refit and path.is_file():  # --refit: keep the earlier result, write a new one beside it
        stamp = datetime.now(timezone.utc).strftime("-%Y%m%dT%H%M%S%f")
        path = path.parent.with_name(path.parent.name + stamp) / "record.json"
    route = resolve_route(cfg, pair.train.attrs)
    train, test = pair.read(lazy=route == "streaming")
    check_pair(train, test)
    if cfg.shots is not None:
        train = _shots(train, cfg.shots, cfg.shot_draw)
    with fsio.lock(path.parent):  # a second process fitting the same config waits, then reuses
        if not cfg.refit and (record := load_record(path)) is not None:
            return FitResult(record, path, reused=True)
        fsio.sweep_temps(path.parent)
        return FitResult(_fit_and_save(cfg, train, test, path, route, shared), path)


_WARNED_SHORT: set[tuple[str, int]] = set()


def short_classes(y: np.ndarray, class_names: list[str], shots: int) -> dict[str, int]:
    """The classes with fewer than `shots` training images, and how many they have."""
    values, counts = np.unique(y, return_counts=True)
    return {str(class_names[int(v)]): int(n) for v, n in zip(values, counts, strict=True) if n < shots}


def _shots(train: cache.FeatureSet, shots: int, draw: int) -> cache.FeatureSet:
    from dataclasses import replace

    idx = shot_subset(train.y, shots, draw, train.ids)
    short = short_classes(train.y, list(train.class_names), shots)
    if short and (str(train.path), shots) not in _WARNED_SHORT:  # once per feature set and N, not per draw
        _WARNED_SHORT.add((str(train.path), shots))
        log.warning(
            "--shots %d: %d of %d classes have fewer training images (%s): they use all of theirs, so the draws "
            "differ only in the other classes%s",
            shots,
            len(short),
            len(np.unique(train.y)),
            ", ".join(f"{name}: {n}" for name, n in list(short.items())[:5]) + (", ..." if len(short) > 5 else ""),
            " (here: every draw is the same, the whole training set)" if len(short) == len(np.unique(train.y)) else "",
        )
    meta = {**train.meta, "shots": shots, "shot_draw": draw, "short_classes": short}
    return replace(train, X=np.asarray(train.X[idx]), y=train.y[idx], ids=[train.ids[i] for i in idx], meta=meta)


def _train(cfg: FitConfig, train: cache.FeatureSet, route: str) -> tuple[Any, dict[str, Any], float]:
    """The fitted pipeline, how C was chosen (or the protocol's account), and the fit's seconds."""
    from tlfeat import outofcore, protocols

    if cfg.protocol:
        pipeline, details = protocols.run(cfg.protocol, train.X, train.y, train.ids, cfg.seed)
        search = float(details["search_seconds"])
        cv = {"C": details.get("C"), "chosen_by": f"--protocol {cfg.protocol}", "protocol": details}
        cv["cv_seconds"] = search  # the search is the search, not the fit
        return pipeline, cv, max(0.0, float(details["seconds"]) - search)
    cv = choose_C(cfg, train.X, train.y, train.ids)
    t0 = time.perf_counter()
    if not cfg.spec.has_C:  # kNN: the training rows are the model, where they are (streamed: on disk)
        pipeline = classifiers.make_classifier(cfg.clf, k=cfg.k, temperature=cfg.temperature, seed=cfg.seed)
        pipeline[-1].fit_rows(train.X, train.y) if route == "streaming" else pipeline.fit(train.X, train.y)
    elif route == "streaming":
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
    from tlfeat.knn import KS, KNNProbe

    t0 = time.perf_counter()
    n_classes = len(train.class_names)
    by_k: dict[str, float] = {}
    est = pipeline[-1]
    if isinstance(est, KNNProbe):  # one neighbour search gives DINO's k = 10, 20, 100, 200 and --k
        probas = est.proba_by_k(np.asarray(test.X), [*KS, est.k_])
        for k, proba in probas.items():
            by_k[str(k)] = float(np.mean(est.classes_[np.argmax(proba, axis=1)] == test.y))
        scores = np.full((len(test), n_classes), classifiers.ABSENT_SCORE)
        scores[:, np.asarray(est.classes_, dtype=np.int64)] = probas[est.k_]
        y_pred = est.classes_[np.argmax(probas[est.k_], axis=1)]
    elif route == "streaming":
        y_pred, scores = outofcore.predict(pipeline, test, n_classes)
    else:
        y_pred, scores = pipeline.predict(test.X), classifiers.scores(pipeline, test.X, n_classes)
    seconds = time.perf_counter() - t0
    out = metrics.evaluate(test.y, y_pred, scores, list(train.class_names), test.ids)
    if by_k:
        out["knn_accuracy_by_k"] = by_k
    return out, seconds


def _fit_and_save(
    cfg: FitConfig, train: cache.FeatureSet, test: cache.FeatureSet, path: Path, route: str, shared: overlap.Overlap
) -> RunRecord:
    load_start, cpus = load_now()
    pipeline, cv, fit_seconds = _train(cfg, train, route)
    result_metrics, predict_seconds = _evaluate(pipeline, train, test, route)
    saved = classifiers.save(pipeline, path.parent, train={"path": str(train.path), "sha256": train.sha256})
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
        train_test_overlap=shared.as_details(),
    )
    if cfg.protocol:
        record.details["protocol"] = cv.pop("protocol")
        from tlfeat import protocols

        record.params.update(protocols.params(record.details["protocol"]))
    if cfg.shots is not None:
        record.details["shots"] = {
            "per_class": cfg.shots,
            "draw": cfg.shot_draw,
            "n_train": len(train),
            "short_classes": train.meta.get("short_classes") or {},  # fewer images than --shots: all used
        }
    if "knn_accuracy_by_k" in result_metrics:
        pipeline_k = int(pipeline[-1].k_)
        record.params["k"] = pipeline_k
        record.details["knn"] = {
            "k": pipeline_k,
            **({"k_asked": cfg.k} if pipeline_k != cfg.k else {}),  # capped at the training set's size
            "temperature": cfg.temperature,
            "accuracy_by_k": result_metrics.pop("knn_accuracy_by_k"),
        }
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
            **({"k": cfg.k, "temperature": cfg.temperature} if "k" in cfg.spec.options else {}),
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
                    **({"parts": fs.meta["parts"]} if fs.meta.get("parts") else {}),
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
        freshness.require_fresh([e for p in selected for e in p.entries()], data_dir)
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
