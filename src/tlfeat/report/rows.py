"""Report rows: one per saved run, read from the records under `<out>/results/`, and the statistics
the tables are made of (configurations, their runs, means, intervals, paired tests)."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import datasets, fsio, stats
from tlfeat.backbones.base import PENULTIMATE
from tlfeat.errors import TlfeatError, printable
from tlfeat.records import RUN_FOLDERS, Method, RunRecord, load_record, load_records, variants

log = logging.getLogger(__name__)


DERIVED = ("accuracy_ci95", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix")


def disagreement(record: RunRecord) -> str | None:
    """Which figure of a record its own saved predictions contradict (a hand-edited record), or None."""
    from tlfeat import metrics

    predictions = record.metrics.get("predictions") or {}
    if not predictions.get("y_true") or not record.class_names:
        return None
    y_true, y_pred = np.asarray(predictions["y_true"]), np.asarray(predictions["y_pred"])
    if max(int(y_true.max()), int(y_pred.max())) >= len(record.class_names) or min(y_true.min(), y_pred.min()) < 0:
        return "its predictions name classes it does not have"
    again = metrics.evaluate(y_true, y_pred, None, list(record.class_names))
    for name in DERIVED:
        if name in record.metrics and not _same_value(record.metrics[name], again[name]):
            return f"metrics.{name} disagrees with its own predictions"
    return None


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) <= 1e-9
    return bool(a == b)


def outside(record: RunRecord) -> str | None:
    """Which path a record names that leads outside its own folder (a hand-edited record), or None."""
    if record.path is None:
        return None
    classifier = record.provenance.get("classifier")
    named = {
        "details.plot": record.details.get("plot"),
        "details.classifier_file": record.details.get("classifier_file"),
        "provenance.classifier.file": classifier.get("file") if isinstance(classifier, dict) else None,
    }
    for field_name, value in named.items():
        if value is None:
            continue
        try:
            fsio.inside(Path(record.path).parent, value)
        except TlfeatError as exc:
            return f"{field_name}: {exc}"
    return None


def _consistent(records: list[RunRecord], problems: list[str] | None) -> list[RunRecord]:
    kept = []
    for r in records:
        why = outside(r) or disagreement(r)
        if why is None:
            kept.append(r)
            continue
        log.warning("ignoring record %s: %s", r.path, why)
        if problems is not None:
            problems.append(f"{r.path}: {why}")
    return kept


def run_records(out: Path, problems: list[str] | None = None) -> list[RunRecord]:
    """The records a report covers: those `compare.json` lists (the runs of that comparison, wherever
    `--results-dir` put them), else every record under `<out>/results/`, keeping of runs that agree in
    everything but their date (the same configuration and seeds on data that changed since) the newest."""
    out = Path(out)
    index = out / "compare.json"
    listed: Any = None
    meta: Any = None
    if index.is_file():
        try:
            meta = json.loads(index.read_text())
            listed = meta.get("records")
        except (OSError, ValueError, AttributeError, RecursionError) as exc:
            listed = exc
        if listed is None and isinstance(meta, dict) and "finished" not in meta:
            log.warning(
                "%s lists no runs yet (that comparison has not finished); the report covers every record under %s/",
                index,
                out / "results",
            )
        elif not (isinstance(listed, list) and all(isinstance(x, str) for x in listed)):
            if problems is not None:
                problems.append(
                    f"{index.name} is unreadable or malformed: this report covers every record under results/, "
                    "not those of runs saved elsewhere with --results-dir"
                )
            log.warning(
                "%s is unreadable or malformed (%s); the report covers every record under %s/ instead "
                "(run the same `tlfeat compare` again to rewrite it)",
                index,
                listed if isinstance(listed, Exception) else "no list of records",
                out / "results",
            )
            listed = None
    if (
        isinstance(listed, list)
        and isinstance(meta, dict)
        and "finished" not in meta
        and "results_dir_relative" in meta
    ):
        log.warning(
            "%s: that comparison has not finished (or was stopped): the report covers its %d run(s) done",
            index,
            len(listed),
        )
    if listed is None:
        return _consistent(_newest(load_records(out / "results", problems=problems)), problems)
    found = []
    stores = result_stores(out, meta)
    for name in dict.fromkeys(listed):  # a path listed twice is one run
        try:
            path = _listed_path(out, stores, name)
        except TlfeatError as exc:
            log.warning("%s lists %s; the report leaves that run out", index.name, exc)
            if problems is not None:
                problems.append(str(exc))
            continue
        record = load_record(path, problems) if path is not None else None
        if record is not None:
            found.append(record)
        elif path is None or not path.is_file():
            log.warning("%s lists %s, which is missing; the report leaves that run out", index.name, name)
            if problems is not None:
                problems.append(f"{printable(name)[:120]}: missing (looked in {', '.join(map(str, stores))})")
    return _consistent(found, problems)


def result_stores(out: Path, meta: dict[str, Any]) -> list[Path]:
    """The result stores a run `compare.json` lists may lie in, first match first: the one compare saved
    to, seen from the report folder (so a project moved or copied as a whole still reads); the report
    folder's own results/; that store where it was; the current one (TLFEAT_RESULTS_DIR, default ./results)."""
    from tlfeat.config import default_results_dir

    config: dict[str, Any] = meta["config"] if isinstance(meta.get("config"), dict) else {}
    relative = meta.get("results_dir_relative")
    given = [meta.get("results_dir"), config.get("results_dir")]  # this version's, an earlier one's
    candidates = [out / relative] if isinstance(relative, str) and not os.path.isabs(relative) else []
    candidates += [out / "results", *(Path(g) for g in given if isinstance(g, str) and os.path.isabs(g))]
    candidates += [default_results_dir()]
    stores = [Path(os.path.realpath(c)) for c in candidates if "\0" not in str(c)]
    return list(dict.fromkeys(s for s in stores if s.is_dir()))


def _listed_path(out: Path, stores: list[Path], name: Any) -> Path | None:
    """Where a run `compare.json` lists is: `<store>/<kind>/<run>/record.json` in the first store that
    has it (the name's last three parts say which run; a link out of the store is not followed), None
    when no store has it, TlfeatError when the name is not a run's record relative to the report folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\0" in name:
        raise TlfeatError(f"{printable(repr(name))[:120]} is not a path relative to the report folder")
    parts = Path(name).parts
    if len(parts) < 3 or parts[-1] != "record.json" or parts[-3] not in RUN_FOLDERS or parts[-2] in ("..", "."):
        raise TlfeatError(f"{printable(name)[:120]} is not a run's record.json")
    for store in stores:
        path = Path(os.path.realpath(store.joinpath(*parts[-3:])))
        if path.parent.parent.parent == store and path.is_file():
            return path
    return None


def _newest(records: list[RunRecord]) -> list[RunRecord]:
    """Runs that agree in configuration and seeds were made on different versions of the data: the newest stays."""
    from tlfeat.records import configuration

    newest: dict[str, RunRecord] = {}
    for r in records:
        same = json.dumps(
            [r.kind, r.method, r.model, r.dataset, r.seed, r.subset_seed, configuration(r)], sort_keys=True, default=str
        )
        if same not in newest or _made(r) > _made(newest[same]):
            newest[same] = r
    superseded = len(records) - len(newest)
    if superseded:
        log.warning("left out %d run(s) superseded by a later run of the same configuration and seed", superseded)
    kept = {id(r) for r in newest.values()}
    return [r for r in records if id(r) in kept]


def _made(record: RunRecord) -> tuple[str, int]:
    """When a run was made: its record's time (to the second), then its file's (two runs in one second)."""
    try:
        written = os.stat(record.path).st_mtime_ns if record.path else 0
    except OSError:
        written = 0
    return record.created, written


def rows(out: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per run, sorted: dataset, model, method, layer, variant, seed. Runs that could not be
    read are listed in `problems`, when given."""
    records = run_records(out, problems)
    names = datasets.display_names(r.dataset for r in records)
    labels: dict[int, str] = {}
    groups: dict[tuple[str, ...], list[RunRecord]] = defaultdict(list)
    for r in records:  # pretrained and UNTRAINED backbones are told apart by the model column already
        shots = str((r.details.get("shots") or {}).get("per_class", ""))  # k-shot runs are their own rows
        groups[(r.dataset, r.model, r.method, r.layer, r.weights_id, shots)].append(r)
    for group in groups.values():  # runs that differ in more than their seeds are separate configurations
        labels.update(variants(group))
    out_rows = [_row(r, Path(out), labels.get(id(r), ""), names[r.dataset]) for r in records]
    out_rows.sort(
        key=lambda x: (
            x["dataset"],
            x["model"],
            x["method_rank"],
            x["method"],
            str(x["layer"]),
            x["variant"],
            x["seed"],
            x["subset_seed"],
        )
    )
    return out_rows


def _row(r: RunRecord, out: Path, variant: str, dataset: str) -> dict[str, Any]:
    method = r.parsed_method
    m, t = r.metrics, r.timings
    correct = int(round(m["accuracy"] * r.n_test))
    low, high = m.get("accuracy_ci95") or stats.wilson(correct, r.n_test)
    untrained = not r.pretrained and not method.is_scratch
    predictions = m.get("predictions") or {}
    return {
        "dataset": dataset,  # a label, distinct for distinct datasets (two folders named "data" are two)
        "dataset_id": r.dataset,
        "model": r.model + (" (UNTRAINED)" if untrained else ""),
        "method": str(method),
        "method_rank": method.rank,
        "layer": r.layer,
        "variant": variant,
        "seed": r.seed,
        "subset_seed": r.subset_seed,
        # Ranked by accuracy on every task, binary ones too: the interval, the paired test and the confusion
        # matrix are all about accuracy (ROC AUC has its own column, and is None where a class is missing).
        "metric_name": "accuracy",
        "metric": m["accuracy"],
        "accuracy": m["accuracy"],
        "ci95_low": low,
        "ci95_high": high,
        "balanced_accuracy": m.get("balanced_accuracy"),
        "roc_auc": m.get("roc_auc"),
        "macro_f1": m.get("macro_f1"),
        "near_chance": m.get("near_chance")
        or (
            stats.near_chance(m["accuracy"], np.asarray(predictions["y_true"]), np.asarray(predictions["y_pred"]))
            if predictions.get("y_true")
            else None
        )
        or "",
        "extract_seconds": t.extract_seconds,
        "search_seconds": t.search_seconds,
        "train_seconds": t.train_seconds,
        "predict_seconds": t.predict_seconds,
        "total_seconds": t.total_seconds,
        "busy": t.busy,
        "weights_id": r.weights_id,
        "pretrained": r.pretrained,
        "n_train": r.n_train,
        "n_test": r.n_test,
        "n_skipped": sum((r.details.get("n_skipped") or {}).values()),
        "test_in_train": (r.details.get("train_test_overlap") or {}).get("test_images_in_train") or 0,
        "image_size": r.image_size,
        "limit": r.limit,
        "test_limit": r.test_limit,
        "shots": (r.details.get("shots") or {}).get("per_class"),  # k-shot runs: images per class
        "shot_draw": (r.details.get("shots") or {}).get("draw"),
        "record": os.path.relpath(Path(r.path).resolve(), out.resolve()) if r.path else "",
        "_record": r,
        "_method": method,
    }


def group(items: list[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[tuple(item[k] for k in keys)].append(item)
    return groups


def mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(arr):
        return float("nan"), 0.0
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt_ms(values: list[float], digits: int = 4) -> str:
    mean, sd = mean_sd(values)
    if mean != mean:  # nan
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def split_shots(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs on the whole training set, k-shot runs): the recommendation and the tables read the first,
    the k-shot curves the second; report.md and compare's console both split here."""
    return [r for r in items if r["shots"] is None], [r for r in items if r["shots"] is not None]


def penultimate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in items if r["layer"] in (PENULTIMATE, "-")]


CONFIG = ("dataset", "model", "method", "variant", "layer")  # one layer's runs are a configuration of their own


@dataclass
class Config:
    """The runs of one configuration (repeats) and what the tables say of them."""

    dataset: str
    model: str
    method: str
    variant: str
    runs: list[dict[str, Any]]
    layer: str = PENULTIMATE  # the feature layer of a frozen route ("-" for fine-tuning)

    @property
    def parsed(self) -> Method:
        return self.runs[0]["_method"]

    @property
    def accuracy(self) -> float:
        return mean_sd([r["accuracy"] for r in self.runs])[0]

    @property
    def metric(self) -> float:
        return mean_sd([r["metric"] for r in self.runs])[0]

    @property
    def metric_name(self) -> str:
        return str(self.runs[0]["metric_name"])

    @property
    def n_test(self) -> int:
        return int(self.runs[0]["n_test"])

    @property
    def ci95(self) -> tuple[float, float]:
        """95% Wilson interval of the mean accuracy over the test images (test-set sampling)."""
        return stats.wilson(int(round(self.accuracy * self.n_test)), self.n_test)

    def seconds(self, name: str) -> float:
        return mean_sd([r[name] for r in self.runs])[0]

    @property
    def near_chance(self) -> str:
        flags = [r["near_chance"] for r in self.runs if r["near_chance"]]
        return flags[0] if len(flags) * 2 > len(self.runs) else ""

    @property
    def busy(self) -> bool:
        return any(r["busy"] for r in self.runs)

    @property
    def at_layer(self) -> str:
        """The suffix " at LAYER" for frozen features of a layer other than the default one, else nothing."""
        return "" if self.layer in (PENULTIMATE, "-") else f" at {self.layer}"

    def label(self) -> str:
        text = self.parsed.describe(self.model) + self.at_layer
        return text + (f" [{self.variant}]" if self.variant else "")

    def correct(self) -> tuple[str | None, np.ndarray] | None:
        """(test ids digest, per-image correctness) of the first seed's run, for paired tests."""
        first = min(self.runs, key=lambda r: (r["seed"], r["subset_seed"]))
        p = first["_record"].metrics.get("predictions") or {}
        if not p.get("y_true"):
            return None
        return p.get("ids_sha256"), np.asarray(p["y_true"]) == np.asarray(p["y_pred"])


def configs(items: list[dict[str, Any]]) -> list[Config]:
    return [Config(d, m, me, v, runs, layer) for (d, m, me, v, layer), runs in group(items, *CONFIG).items()]


def paired(a: Config, b: Config) -> stats.McNemar | None:
    """McNemar test of two configurations on the same test images, where both saved predictions."""
    ca, cb = a.correct(), b.correct()
    if ca is None or cb is None or ca[0] != cb[0] or ca[0] is None or len(ca[1]) != len(cb[1]):
        return None
    return stats.mcnemar(ca[1], cb[1])


def model_by_dataset(
    runs: list[dict[str, Any]], value: str = "metric", scale: float = 1.0
) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]]]:
    """(row labels: model [variant], datasets, their values) of one method's runs: a models x datasets table."""
    cells: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        cells.setdefault((r["model"] + (f" [{r['variant']}]" if r["variant"] else ""), r["dataset"]), []).append(
            scale * r[value]
        )
    return sorted({k[0] for k in cells}), sorted({k[1] for k in cells}), cells


def best_in_column(cells: dict[tuple[str, str], list[float]], rows_: list[str], col: str) -> float | None:
    """The best mean of a column, or None when the column offers no choice (one value or none)."""
    means = [mean_sd(cells[(m, col)])[0] for m in rows_ if (m, col) in cells]
    return max(means) if len(means) > 1 else None


def best_of(cfgs: list[Config]) -> Config:
    """The configuration a report leads with: never one no better than chance while another is; then
    accuracy, and the shorter time."""
    return max(cfgs, key=lambda c: (not c.near_chance, c.metric, -c.seconds("total_seconds")))
