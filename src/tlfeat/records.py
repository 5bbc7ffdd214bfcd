"""What a run is and what it leaves behind: `Method` (the only place that knows how methods are
spelled) and `RunRecord` (the one record format fit and fine-tune write, and compare, report and
the CLI read).

A method is written as a classifier on frozen features (`logreg`, `svm`, `svm-rbf`, `linear`,
`knn`: the names of `classifier_specs.SPECS`), a paper's protocol on them (`protocol:clip`,
`protocol:dinov2`), a fine-tuning strategy (`finetune:full`, `finetune:head`, `finetune:freeze:K`,
`finetune:discriminative[:RATIO]`), `scratch`, or multi-stage transfer `chain:DATASET:STRATEGY`
(fine-tuned on DATASET first, then on the target); its folder name (`slug`) never contains a colon.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tlfeat import classifier_specs, fsio, strategies
from tlfeat.backbones.base import PENULTIMATE
from tlfeat.errors import TlfeatError

log = logging.getLogger(__name__)

FROZEN = tuple(classifier_specs.SPECS)
PROTOCOL_PREFIX = classifier_specs.PROTOCOL_PREFIX
CHAIN_PREFIX = "chain:"


@dataclass(frozen=True)
class Method:
    """One way of using a backbone: a classifier on its frozen features, or a fine-tuning strategy."""

    clf: str = ""  # logreg, svm, linear, knn (frozen methods)
    kernel: str = "linear"
    strategy: strategies.Strategy | None = None  # fine-tuning methods
    protocol: str | None = None  # a paper's protocol on frozen features (clip, dinov2)
    chain: str | None = None  # multi-stage transfer: the intermediate dataset, as written

    @classmethod
    def parse(cls, text: str) -> Method:
        raw = str(text).strip()
        if raw.lower().startswith(CHAIN_PREFIX):  # the dataset keeps its case: it may be a folder
            return cls._chain(raw[len(CHAIN_PREFIX) :], text)
        value = raw.lower()
        if value in FROZEN:
            spec = classifier_specs.SPECS[value]
            return cls(clf=spec.clf, kernel=spec.kernel)
        if value.startswith(PROTOCOL_PREFIX):
            name = value[len(PROTOCOL_PREFIX) :]
            protocol = classifier_specs.PROTOCOLS.get(name)
            if protocol is None:
                valid = ", ".join(PROTOCOL_PREFIX + p for p in classifier_specs.PROTOCOLS)
                raise TlfeatError(f"unknown protocol {name!r} in {text!r}; valid: {valid}")
            return cls(clf=protocol.clf, protocol=name)
        if value == "scratch":
            return cls(strategy=strategies.Strategy("scratch"))
        if value.startswith("finetune:"):
            return cls(strategy=strategies.parse(value.split(":", 1)[1]))
        raise TlfeatError(f"unknown method {text!r}; valid: {', '.join(valid_methods())}")

    @classmethod
    def _chain(cls, rest: str, text: str) -> Method:
        """DATASET:STRATEGY, the dataset possibly holding colons itself: the first split whose right
        side is a strategy (`mnist:freeze:2` is mnist with freeze:2)."""
        parts = rest.split(":")
        for i in range(1, len(parts)):
            dataset, strategy = ":".join(parts[:i]).strip(), ":".join(parts[i:])
            try:
                parsed = strategies.parse(strategy)
            except TlfeatError:
                continue
            if dataset and parsed.kind != "scratch":
                return cls(strategy=parsed, chain=dataset)
        raise TlfeatError(
            f"method {text!r} is not chain:DATASET:STRATEGY (e.g. chain:fashion-mnist:full, chain:mnist:freeze:2)"
        )

    @classmethod
    def frozen(cls, clf: str, kernel: str = "linear", protocol: str | None = None) -> Method:
        if protocol:
            return cls.parse(PROTOCOL_PREFIX + protocol)
        return cls.parse(classifier_specs.method_name(clf, kernel))

    @classmethod
    def finetune(cls, strategy: str) -> Method:
        parsed = strategies.parse(strategy)
        return cls.parse("scratch" if parsed.kind == "scratch" else f"finetune:{parsed}")

    def __str__(self) -> str:
        if self.chain is not None:
            return f"{CHAIN_PREFIX}{self.chain}:{self.strategy}"
        if self.protocol is not None:
            return PROTOCOL_PREFIX + self.protocol
        if self.strategy is None:
            return classifier_specs.method_name(self.clf, self.kernel)
        return "scratch" if self.strategy.kind == "scratch" else f"finetune:{self.strategy}"

    @property
    def slug(self) -> str:
        """The method in a folder name."""
        if self.chain is not None:
            dataset = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.chain.strip("/"))[-40:]
            return f"chain-{dataset}-{str(self.strategy).replace(':', '')}"
        return str(self).replace("finetune:", "finetune-").replace(PROTOCOL_PREFIX, "protocol-").replace(":", "")

    @property
    def spec(self) -> classifier_specs.ClassifierSpec | None:
        """The classifier spec of a frozen method (None for fine-tuning)."""
        return classifier_specs.spec_of(self.clf, self.kernel) if self.is_frozen else None

    @property
    def is_frozen(self) -> bool:
        return self.strategy is None

    @property
    def is_finetune(self) -> bool:
        return self.strategy is not None

    @property
    def is_scratch(self) -> bool:
        return self.strategy is not None and self.strategy.kind == "scratch"

    @property
    def is_chain(self) -> bool:
        return self.chain is not None

    @property
    def rank(self) -> int:
        """Table order: frozen routes, fine-tuning, then the no-transfer baseline."""
        return 2 if self.is_scratch else 1 if self.is_finetune else 0

    def describe(self, model: str) -> str:
        """The method in a sentence: "frozen resnet50 + logreg", "resnet50 fine-tuned (head)"."""
        if self.is_scratch:
            return f"{model} trained from scratch"
        if self.chain is not None:
            return f"{model} fine-tuned on {self.chain}, then here ({self.strategy})"
        if self.strategy is not None:
            return f"{model} fine-tuned ({self.strategy})"
        if self.protocol is not None:
            return f"frozen {model}, {self.protocol} protocol"
        return f"frozen {model} + {self}"


def valid_methods() -> list[str]:
    return [
        *classifier_specs.frozen_methods(),
        "finetune:full",
        "finetune:head",
        "finetune:freeze:K",
        "finetune:discriminative[:RATIO]",
        "scratch",
        "chain:DATASET:STRATEGY",
    ]


@dataclass
class Timings:
    """Seconds of each part of a run. `total_seconds` is computed once, when the record is written.

    For a frozen route, `extract_seconds` is the one-time extraction its feature sets cost, shared by
    every classifier fitted on them; `search_seconds` the choice of C; `train_seconds` the final fit.
    For a fine-tune, `train_seconds` is every epoch with its validation pass.
    """

    train_seconds: float = 0.0
    search_seconds: float = 0.0
    predict_seconds: float = 0.0
    extract_seconds: float = 0.0
    total_seconds: float = 0.0
    load_start: float | None = None  # 1-minute load average when the run started and ended
    load_end: float | None = None
    cpus: int | None = None

    def finish(self) -> Timings:
        self.total_seconds = self.extract_seconds + self.search_seconds + self.train_seconds + self.predict_seconds
        return self

    @property
    def busy(self) -> bool:
        """Was the machine loaded beyond its cores during the run (times then read high)?"""
        loads = [x for x in (self.load_start, self.load_end) if x is not None]
        return bool(self.cpus and loads and max(loads) > 1.5 * self.cpus)


def load_now() -> tuple[float | None, int | None]:
    """(1-minute load average, CPUs this process may use): was the machine busy?"""
    import os

    from tlfeat import config

    try:
        return round(os.getloadavg()[0], 2), config.cores()
    except OSError:
        return None, config.cores()


# The folders of a result store that hold runs, one per run: `<store>/<kind>/<run>/record.json`.
FITS, FINETUNES, CHAINS = "fits", "finetunes", "chains"
RUN_FOLDERS = (FITS, FINETUNES, CHAINS)

REQUIRED = ("kind", "method", "model", "dataset", "metrics", "n_train", "n_test")


@dataclass
class RunRecord:
    """Everything about one finished run: what ran, on what, how well, how long, from which inputs."""

    kind: str  # "fit" or "finetune"
    key: str
    method: str
    model: str
    dataset: str
    n_train: int
    n_test: int
    metrics: dict[str, Any]
    layer: str = PENULTIMATE
    weights_id: str = ""
    pretrained: bool = True
    image_size: int | None = None
    limit: int | None = None
    test_limit: int | None = None
    subset_seed: int = 0
    seed: int = 0
    n_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    provenance: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # cv, history, checkpoints, parameter counts...
    created: str = ""
    path: Path | None = None  # the record.json it was read from

    @property
    def parsed_method(self) -> Method:
        return Method.parse(self.method)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps(data, indent=2, default=str)

    def save(self, path: Path) -> Path:
        fsio.atomic_write(path, self.to_json())
        self.path = Path(path)
        return self.path

    @classmethod
    def from_dict(cls, data: Any, path: Path | None = None) -> RunRecord:
        """A record from its JSON; records of earlier tlfeat versions are read too. ValueError if malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"a record is a JSON object, not {type(data).__name__}")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if not isinstance(data["metrics"], dict) or "accuracy" not in data["metrics"]:
            raise ValueError("metrics without an accuracy")
        Method.parse(data["method"])
        known = {f.name for f in fields(cls)} - {"path", "timings", "details"}
        values = {k: data[k] for k in known if k in data}
        details = dict(data.get("details") or {})
        details.update({k: v for k, v in data.items() if k not in known and k not in ("timings", "details")})
        values["timings"] = _timings(data)
        values["seed"] = int(data.get("seed", (data.get("config") or {}).get("seed", 0)) or 0)
        values.setdefault("key", "")
        if "provenance" not in data:  # an earlier version's record: its inputs were top-level fields
            values["provenance"] = {k: details[k] for k in ("features", "versions", "weights_source") if k in details}
        record = cls(**values, details=details, path=path)
        record.limit = record.limit or None
        record.test_limit = record.test_limit or None
        record._check_types()
        return record

    def _check_types(self) -> None:
        """ValueError naming the first field a hand-edited or damaged record holds the wrong kind of value in."""

        def number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        accuracy = self.metrics.get("accuracy")
        if not number(accuracy) or not 0.0 <= float(accuracy or 0.0) <= 1.0:
            raise ValueError(f"metrics.accuracy is {accuracy!r}, not a number in [0, 1]")
        for name in ("roc_auc", "balanced_accuracy", "macro_f1"):
            value = self.metrics.get(name)
            if value is not None and not number(value):
                raise ValueError(f"metrics.{name} is {value!r}, not a number")
        predictions = self.metrics.get("predictions")
        if isinstance(predictions, dict) and isinstance(predictions.get("y_true"), list):
            y_true, y_pred = predictions["y_true"], predictions.get("y_pred")
            if not isinstance(y_pred, list) or len(y_pred) != len(y_true) or len(y_true) != self.n_test:
                raise ValueError(f"metrics.predictions do not hold {self.n_test} test predictions")
            if y_true:
                right = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == p) / len(y_true)
                if abs(right - float(accuracy or 0.0)) > 1e-9:
                    raise ValueError(f"metrics.accuracy {accuracy} disagrees with its own predictions ({right:.4f})")
        ci = self.metrics.get("accuracy_ci95")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(number(x) for x in ci)):
            raise ValueError(f"metrics.accuracy_ci95 is {ci!r}, not [low, high]")
        for name, kind in (("per_class", dict), ("predictions", dict), ("confusion_matrix", list)):
            value = self.metrics.get(name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"metrics.{name} is not a JSON {'object' if kind is dict else 'array'}")
        if not isinstance(self.details.get("n_skipped") or {}, dict):
            raise ValueError("details.n_skipped is not a JSON object")
        for name in ("n_train", "n_test", "seed", "subset_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} is {value!r}, not a count")
        for name in ("kind", "key", "method", "model", "dataset", "layer", "weights_id", "created"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} is {getattr(self, name)!r}, not a string")
        if self.kind not in ("fit", "finetune"):
            raise ValueError(f"kind is {self.kind!r}, not 'fit' or 'finetune'")
        for name in ("config", "params", "provenance", "details"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} is not a JSON object")
        if not isinstance(self.class_names, list):
            raise ValueError("class_names is not a list")
        for name in ("train_seconds", "search_seconds", "predict_seconds", "extract_seconds", "total_seconds"):
            if not number(getattr(self.timings, name)):
                raise ValueError(f"timings.{name} is {getattr(self.timings, name)!r}, not a number")
        for name in ("image_size", "limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} is {value!r}, not a whole number")

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        if not Path(path).is_file():  # a FIFO named record.json would be waited on forever
            raise ValueError("unreadable (not a regular file)")
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested beyond any record
            raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from exc
        return cls.from_dict(data, Path(path))


def _timings(data: dict[str, Any]) -> Timings:
    raw = data.get("timings") or {}
    if not isinstance(raw, dict):
        raise ValueError("timings is not an object")
    if "search_seconds" in raw or "total_seconds" in raw:
        return Timings(**{k: v for k, v in raw.items() if k in {f.name for f in fields(Timings)}})
    # Earlier records: a fit's train_seconds included the C search; a fine-tune's total was its epochs.
    if data.get("kind") == "finetune":
        epochs = sum(float(h.get("epoch_seconds", 0.0)) for h in data.get("history") or [])
        t = Timings(
            train_seconds=epochs or float(raw.get("train_seconds") or 0.0),
            predict_seconds=float(raw.get("predict_seconds", 0.0)),
        )
    else:
        t = Timings(
            train_seconds=float(raw.get("fit_seconds") or raw.get("train_seconds") or 0.0),
            search_seconds=float(raw.get("cv_seconds", 0.0)),
            predict_seconds=float(raw.get("predict_seconds", 0.0)),
            extract_seconds=float(raw.get("extract_seconds", 0.0)),
        )
    return t.finish()


def load_records(results_dir: Path, kind: str | None = None, problems: list[str] | None = None) -> list[RunRecord]:
    """Every readable record under `results_dir` (fits/*/ and finetunes/*/); malformed ones are skipped with a
    warning (and listed in `problems`, when given)."""
    out = []
    for path in sorted(Path(results_dir).glob("*/*/record.json")):
        try:
            record = RunRecord.load(path)
        except (ValueError, TypeError, TlfeatError) as exc:
            log.warning("skipping record %s: %s", path, exc)
            if problems is not None:
                problems.append(f"{path}: {exc}")
            continue
        if kind is None or record.kind == kind:
            out.append(record)
    return out


def load_record(path: Path, problems: list[str] | None = None) -> RunRecord | None:
    """The record at `path`, or None when it is missing or malformed (the run is then done again)."""
    if not Path(path).is_file():
        return None
    try:
        return RunRecord.load(path)
    except (ValueError, TypeError, TlfeatError) as exc:
        log.warning("ignoring record %s: %s", path, exc)
        if problems is not None:
            problems.append(f"{path}: {exc}")
        return None


REPEAT_FIELDS = ("seed", "subset_seed")  # what varies between repeats of one configuration


def configuration(record: RunRecord) -> dict[str, Any]:
    """What makes a run the configuration it is: its config's `key` fields (seeds aside) and, for a fit,
    the key of the features it used. Runs that agree on all of it are repeats of one configuration."""
    from dataclasses import fields as dataclass_fields

    from tlfeat.config import FinetuneConfig, FitConfig
    from tlfeat.constraints import role

    cls = FitConfig if record.kind == "fit" else FinetuneConfig
    keys = [f.name for f in dataclass_fields(cls) if role(f) == "key" and f.name not in REPEAT_FIELDS]
    out: dict[str, Any] = {k: record.config.get(k) for k in keys if k in record.config}
    out.update(
        layer=record.layer,
        weights_id=record.weights_id,
        image_size=record.image_size,
        limit=record.limit,
        test_limit=record.test_limit,
    )
    features = (record.provenance.get("features") or {}).get("train") or {}
    key_fields = features.get("key_fields") or {}
    for name in ("backend", "precision", "device", "label_field", "pooling"):
        if name in key_fields:
            out[name] = key_fields[name]
    if isinstance(key_fields.get("preprocessing"), dict):
        out["fast_decode"] = bool(key_fields["preprocessing"].get("fast_decode", False))
    return out


def variants(records: list[RunRecord]) -> dict[int, str]:
    """A label per record (by id()) naming what sets its configuration apart from the others in `records`."""
    described = [(r, configuration(r)) for r in records]
    names = sorted({k for _, d in described for k in d})
    differing = [k for k in names if len({json.dumps(d.get(k), sort_keys=True, default=str) for _, d in described}) > 1]
    out = {}
    for r, d in described:
        parts = [f"{k.replace('_', ' ')} {_short_value(d.get(k))}" for k in differing]
        out[id(r)] = ", ".join(parts)
    return out


def _short_value(value: Any) -> str:
    if value in (None, ""):
        return "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)[:40]
    return str(value)
