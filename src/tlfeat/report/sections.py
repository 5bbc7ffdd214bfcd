"""The report's sections, one function each, as neutral blocks (kind, payload) that the Markdown and
HTML renderers turn into their format. `sections` only joins them in order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tlfeat.report.render import bold, code, em
from tlfeat.report.rows import (
    Config,
    best_in_column,
    best_of,
    configs,
    fmt_ms,
    group,
    mean_sd,
    model_by_dataset,
    paired,
    penultimate,
)

Block = tuple[str, Any]
ALPHA = 0.05  # the paired tests' level
PER_CLASS = 8  # configurations besides the best in a per-class table (the most accurate ones)


def sections(
    items: list[dict[str, Any]],
    failures: dict[str, str],
    meta: dict[str, Any],
    plots: dict[str, Path],
    left_out: list[str] | None = None,
    extra: list[Block] | None = None,
) -> list[Block]:
    """The report in order; `extra` (the probes', statistics' and analyses' sections) after the tables."""
    out: list[Block] = [("h1", "tlfeat comparison report")]
    for part in (
        recommendation_section(items),
        unreadable(left_out or []),
        notes(items),
        skipped(items),
        failed(failures),
        method_tables(items),
        dataset_tables(items),
        amortised(items),
        per_class(items),
        layers(items),
        extra or [],
        figures(plots),
        every_run(items),
        provenance(meta),
    ):
        out += part
    return out


# --------------------------------------------------------------------------- recommendation


def _ci(c: Config) -> str:
    low, high = c.ci95
    return f"95% CI {low:.4f}–{high:.4f}, n_test {c.n_test}"


def _time_ratio(slow: float, fast: float) -> str:
    ratio = slow / max(fast, 1e-9)
    if ratio >= 2:
        return f"at 1/{ratio:.0f} of the time ({fast:.0f} s instead of {slow:.0f} s)"
    if ratio >= 1.2:
        return f"in {fast:.0f} s instead of {slow:.0f} s"
    return f"in about the same time ({fast:.0f} s)"


def _same(best: Config, other: Config) -> tuple[bool, str]:
    """Is `other` indistinguishable from `best`? By McNemar on the same images, else by intervals."""
    test = paired(best, other)
    if test is not None:
        return test.p_value >= ALPHA, f"McNemar p = {test.p_value:.2g} on the same {best.n_test} test images"
    low_b, _ = best.ci95
    _, high_o = other.ci95
    return high_o >= low_b, "their 95% intervals overlap" if high_o >= low_b else "their 95% intervals do not overlap"


def recommendation(items: list[dict[str, Any]]) -> list[str]:
    """Per dataset: the most accurate configuration, the cheapest one statistically indistinguishable
    from it, and where the no-transfer baseline stands."""
    lines = []
    for (dataset,), group_ in sorted(group(items, "dataset").items()):  # every layer's configurations
        cfgs = configs(group_)
        best = best_of(cfgs)
        text = (
            f"{bold(dataset)}: the most accurate is {best.label()} (accuracy {best.metric:.4f}, {_ci(best)}; "
            f"{best.seconds('total_seconds'):.0f} s per run)"
        )
        cheaper = [
            (c, why)
            for c in cfgs
            if c is not best and not c.near_chance and c.seconds("total_seconds") < best.seconds("total_seconds")
            for same, why in [_same(best, c)]
            if same
        ]
        if cheaper:
            cheap, why = min(cheaper, key=lambda cw: cw[0].seconds("total_seconds"))
            text += f". {cheap.label()} (accuracy {cheap.metric:.4f}) is indistinguishable from it ({why}) {_time_ratio(best.seconds('total_seconds'), cheap.seconds('total_seconds'))}."
        else:
            frozen = [c for c in cfgs if c.parsed.is_frozen and c is not best]
            if frozen and not best.parsed.is_frozen:
                f = max(frozen, key=lambda c: c.metric)
                _, why = _same(best, f)
                text += f". The best frozen-feature route, {f.label()}, is {(best.metric - f.metric) * 100:.1f} points lower ({why}) and takes {f.seconds('total_seconds'):.0f} s."
            else:
                text += ". Nothing cheaper is indistinguishable from it."
        scratch = [c for c in cfgs if c.parsed.is_scratch]
        if scratch:
            s = max(scratch, key=lambda c: c.metric)
            flag = f" — {s.near_chance}" if s.near_chance else ""
            text += f" Without transfer (scratch) the best is {s.metric:.4f} ({_ci(s)}) in {s.seconds('total_seconds'):.0f} s{flag}."
        lines.append(text)
    return lines


def recommendation_section(items: list[dict[str, Any]]) -> list[Block]:
    if not items:
        return [("p", "No completed runs yet.")]
    intro = (
        f"Indistinguishable means a paired McNemar test on the same test images (or, where predictions are missing, "
        f"overlapping 95% intervals) finds no difference at the {ALPHA:g} level."
    )
    return [("h2", "Recommendation"), *[("li", line) for line in recommendation(items)], ("p", intro)]


def notes(items: list[dict[str, Any]]) -> list[Block]:
    out: list[Block] = []
    chance = [c for c in configs(items) if c.near_chance]
    busy = [r for r in items if r["busy"]]
    shared = {(r["model"], r["dataset"]): (r["test_in_train"], r["n_test"]) for r in items if r.get("test_in_train")}
    if shared:
        out.append(("h2", "Test images that are also training images"))
        out += [
            ("li", f"{model} on {dataset}: {n} of {n_test} test image(s) are training images too; accuracy reads high")
            for (model, dataset), (n, n_test) in shared.items()
        ]
    if chance:
        out.append(("h2", "Runs no better than chance"))
        out += [("li", f"{c.dataset}: {c.label()} — {c.near_chance} (accuracy {c.accuracy:.4f})") for c in chance]
    if busy:
        out.append(("h2", "Timings taken on a busy machine"))
        out.append(
            (
                "p",
                f"{len(busy)} run(s) started or ended with a load average above 1.5x the cores: their times read high (marked ⚠ below).",
            )
        )
    return out


def unreadable(left_out: list[str]) -> list[Block]:
    if not left_out:
        return []
    return [
        ("h2", f"Runs left out ({len(left_out)})"),
        (
            "p",
            "These saved results are missing or could not be read, so every table and the recommendation are "
            f"made without them. Run the same {code('tlfeat compare')} again to compute them anew.",
        ),
        *[("li", problem) for problem in left_out],
    ]


def skipped(items: list[dict[str, Any]]) -> list[Block]:
    found = {(r["model"], r["dataset"]): r["n_skipped"] for r in items if r["n_skipped"]}
    if not found:
        return []
    return [
        ("h2", "Skipped images"),
        (
            "p",
            f"These runs used features extracted with {code('--on-error skip')}; {code('tlfeat ls --skipped')} names the files.",
        ),
        *[("li", f"{model} on {dataset}: {n} unreadable image(s) skipped") for (model, dataset), n in found.items()],
    ]


def failed(failures: dict[str, str]) -> list[Block]:
    if not failures:
        return []
    return [
        ("h2", f"Failed cells ({len(failures)})"),
        ("p", f"Fix what each error says, then run the same {code('tlfeat compare')} command again to fill these in."),
        *[("li", f"FAILED {label}: {code(error)}") for label, error in failures.items()],
    ]


# --------------------------------------------------------------------------- tables


def _bold_best(cells: dict[tuple[str, str], list[float]], rows_: list[str], cols: list[str]) -> list[list[str]]:
    """The table body, the best value of each column in bold where the column offers a choice."""
    best = {d: best_in_column(cells, rows_, d) for d in cols}
    body = []
    for m in rows_:
        line = [m]
        for d in cols:
            if (m, d) not in cells:
                line.append("—")
                continue
            text = fmt_ms(cells[(m, d)])
            line.append(bold(text) if mean_sd(cells[(m, d)])[0] == best[d] else text)
        body.append(line)
    return body


def method_tables(items: list[dict[str, Any]]) -> list[Block]:
    """Per method, models x datasets (the layout of frozen-feature studies' tables)."""
    out: list[Block] = []
    main = penultimate(items)
    only = "; penultimate layer only, the others under Accuracy per feature layer" if len(main) < len(items) else ""
    for (method,), runs in sorted(group(main, "method").items(), key=lambda kv: (kv[1][0]["method_rank"], kv[0])):
        models, cols, cells = model_by_dataset(runs)
        metric = "/".join(sorted({r["metric_name"] for r in runs})).replace("roc_auc", "ROC AUC")
        bold = "; best per dataset in bold" if any(best_in_column(cells, models, d) is not None for d in cols) else ""
        out.append(("h2", f"{method}: models × datasets ({metric}, mean ± sd over repeats{bold}{only})"))
        out.append(("table", (["model", *cols], _bold_best(cells, models, cols))))
    return out


def dataset_tables(items: list[dict[str, Any]]) -> list[Block]:
    """Per dataset: every configuration with its sizes, accuracy, interval, paired test and times."""
    out: list[Block] = []
    for (dataset,), runs in sorted(group(items, "dataset").items()):
        cfgs = sorted(configs(runs), key=lambda c: (c.parsed.rank, c.model, c.method, c.layer, c.variant))
        best = best_of(cfgs)
        out.append(("h2", f"{dataset}: method × accuracy × time"))
        out.append(
            (
                "p",
                f"Times are per run, in seconds. {em('extract')} is the one-time extraction of the feature sets (after an "
                "incremental update: the update plus the carried rows' share of the earlier extraction), shared by every "
                f"frozen classifier on them; {em('C search')} the cross-validated choice of C; {em('train')} the final fit or the "
                f"fine-tuning epochs (with validation); {em('total')} all of these. {em('vs best')}: McNemar's paired test against the most accurate "
                f"configuration ({best.label()}) on the same test images.",
            )
        )
        body = [_dataset_row(c, best) for c in cfgs]
        header = [
            "method",
            "model",
            "n_train",
            "n_test",
            "accuracy",
            "95% CI",
            "ROC AUC",
            "vs best",
            "extract",
            "C search",
            "train",
            "total",
            "runs",
        ]
        out.append(("table", (header, body)))
    return out


def _dataset_row(c: Config, best: Config) -> list[str]:
    low, high = c.ci95
    runs = c.runs
    if c is best:
        versus = "best"
    else:
        test = paired(best, c)
        versus = (
            "—"
            if test is None
            else f"p = {test.p_value:.2g} ({'indistinguishable' if test.p_value >= ALPHA else 'lower'})"
        )
    flags = (" ⚠ chance" if c.near_chance else "") + (" ⚠ busy" if c.busy else "")
    name = c.method + c.at_layer + (f" [{c.variant}]" if c.variant else "")
    return [
        name + flags,
        c.model,
        str(runs[0]["n_train"]),
        str(c.n_test),
        fmt_ms([r["accuracy"] for r in runs]),
        f"{low:.4f}–{high:.4f}",
        fmt_ms([r["roc_auc"] for r in runs if r["roc_auc"] is not None])
        if any(r["roc_auc"] is not None for r in runs)
        else "—",
        versus,
        fmt_ms([r["extract_seconds"] for r in runs], 1),
        fmt_ms([r["search_seconds"] for r in runs], 1),
        fmt_ms([r["train_seconds"] for r in runs], 1),
        fmt_ms([r["total_seconds"] for r in runs], 1),
        str(len(runs)),
    ]


def amortised(items: list[dict[str, Any]]) -> list[Block]:
    """The extraction a frozen route costs once, spread over the classifiers fitted on it."""
    frozen = [r for r in penultimate(items) if r["_method"].is_frozen]
    lines = []
    for (dataset, model, variant), runs in sorted(group(frozen, "dataset", "model", "variant").items()):
        methods = sorted({r["method"] for r in runs})
        extract = mean_sd([r["extract_seconds"] for r in runs])[0]
        train = sum(
            mean_sd([r["search_seconds"] + r["train_seconds"] for r in runs if r["method"] == m])[0] for m in methods
        )
        if len(methods) < 2:
            continue
        v = f" [{variant}]" if variant else ""
        lines.append(
            f"{dataset}, {model}{v}: one extraction ({extract:.1f} s) serves {len(methods)} classifiers ({', '.join(methods)}); "
            f"with their training ({train:.1f} s in all) that is {(extract + train) / len(methods):.1f} s per classifier, "
            f"against {extract + train / len(methods):.1f} s for one alone."
        )
    title = "Amortised cost of the frozen routes" + (
        " (penultimate layer)" if len(frozen) < sum(r["_method"].is_frozen for r in items) else ""
    )
    return [("h2", title), *[("li", line) for line in lines]] if lines else []


def per_class(items: list[dict[str, Any]]) -> list[Block]:
    """Per dataset: precision, recall and F1 per class of the most accurate configuration, and F1 per class
    of the others (every layer's), the PER_CLASS most accurate where there are more."""
    out: list[Block] = []
    for (dataset,), runs in sorted(group(items, "dataset").items()):
        cfgs = configs(runs)
        best = best_of(cfgs)
        ranked = sorted((c for c in cfgs if c is not best), key=lambda c: (-c.metric, c.parsed.rank, c.label()))
        others = sorted(ranked[:PER_CLASS], key=lambda c: (c.parsed.rank, c.model, c.method, c.layer, c.variant))
        names = best.runs[0]["_record"].class_names
        which = (
            "the F1 of every other configuration"
            if len(ranked) <= PER_CLASS
            else f"the F1 of the {PER_CLASS} most accurate of the {len(ranked)} other configurations"
        )
        out.append(("h2", f"{dataset}: per class"))
        out.append(("p", f"Precision, recall and F1 of {best.label()} (mean over its runs), and {which}."))
        header = ["class", "support", "precision", "recall", "F1"] + [
            f"F1 {c.method}{c.at_layer} {c.model}" + (f" [{c.variant}]" if c.variant else "") for c in others
        ]
        body = []
        for name in names:
            per = [r["_record"].metrics["per_class"].get(name, {}) for r in best.runs]
            line = [name, str(per[0].get("support", 0))] + [
                fmt_ms([p.get(k, 0.0) for p in per], 3) for k in ("precision", "recall", "f1")
            ]
            line += [
                fmt_ms([r["_record"].metrics["per_class"].get(name, {}).get("f1", 0.0) for r in c.runs], 3)
                for c in others
            ]
            body.append(line)
        out.append(("table", (header, body)))
    return out


def layers(items: list[dict[str, Any]]) -> list[Block]:
    layer_rows = [r for r in items if r["layer"] != "-"]
    if len({r["layer"] for r in layer_rows}) < 2:
        return []
    body = [
        [dataset, model, method, layer, fmt_ms([r["accuracy"] for r in runs])]
        for (dataset, model, method, layer), runs in sorted(
            group(layer_rows, "dataset", "model", "method", "layer").items()
        )
    ]
    return [
        ("h2", "Accuracy per feature layer"),
        ("table", (["dataset", "model", "method", "layer", "accuracy"], body)),
    ]


def figures(plots: dict[str, Path]) -> list[Block]:
    return [("h2", "Plots"), *[("img", (title, path)) for title, path in plots.items()]] if plots else []


def every_run(items: list[dict[str, Any]]) -> list[Block]:
    header = [
        "dataset",
        "model",
        "method",
        "layer",
        "seed",
        "n_train",
        "n_test",
        "accuracy",
        "95% CI",
        "ROC AUC",
        "train s",
        "total s",
        "weights",
        "record",
    ]
    body = [
        [
            r["dataset"],
            r["model"],
            r["method"]
            + (f" [{r['variant']}]" if r["variant"] else "")
            + (" ⚠" if r["near_chance"] or r["busy"] else ""),
            r["layer"],
            str(r["seed"]) + (f"/{r['subset_seed']}" if r["subset_seed"] else ""),
            str(r["n_train"]),
            str(r["n_test"]),
            f"{r['accuracy']:.4f}",
            f"{r['ci95_low']:.4f}–{r['ci95_high']:.4f}",
            "—" if r["roc_auc"] is None else f"{r['roc_auc']:.4f}",
            f"{r['train_seconds']:.1f}",
            f"{r['total_seconds']:.1f}",
            r["weights_id"] + ("" if r["pretrained"] else " (untrained)"),
            str(Path(r["record"]).parent.name),
        ]
        for r in items
    ]
    return [("h2", "Every run"), ("table", (header, body))]


def provenance(meta: dict[str, Any]) -> list[Block]:
    out: list[Block] = [("h2", "How these numbers were made")]
    if meta.get("command"):
        out.append(("code", str(meta["command"])))
    if meta.get("config"):
        out.append(("code", json.dumps(meta["config"], indent=2, default=str)))
    if isinstance(meta.get("environment"), dict):
        out.append(("p", ", ".join(f"{k}: {v}" for k, v in meta["environment"].items())))
    out.append(
        (
            "p",
            f"Each row's full config, provenance, timings and predictions are in its record.json (column {code('record')}); rows.csv has every run at full precision, summary.csv one row per configuration.",
        )
    )
    return out
