"""The report's sections on probes, statistics and analyses, as blocks (kind, payload) like `sections`:
which differences from the best survive a multiple-comparison correction, the kNN probe at DINO's k
(the caption lists the k shown), how C was chosen, the papers' protocols, k-shot curves, the layer-wise probe, overfitting in the
fine-tuning curves, multi-stage transfer with its times per stage, and the representation analyses
`compare --analyses` wrote."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tlfeat import fsio, stats
from tlfeat.analysis.curves import overfitting
from tlfeat.report.curves import shot_points, t_interval, whole_set
from tlfeat.report.plots import Names, png_inside
from tlfeat.report.rows import Config, best_of, configs, group, mean_sd

log = logging.getLogger(__name__)

Block = tuple[str, Any]
ALPHA = 0.05
BOOTSTRAP = 10_000


def blocks(
    main: list[dict[str, Any]],
    shot_items: list[dict[str, Any]],
    images: dict[str, Path],
    analyses: list[dict[str, Any]],
) -> list[Block]:
    out: list[Block] = []
    for part in (
        significance(main),
        knn_probe(main),
        c_search(main),
        protocols(main),
        shots(shot_items, main, images),
        layerwise(images),
        overfit(main),
        chains(main),
        representations(analyses),
    ):
        out += part
    return out


# --------------------------------------------------------------------------- statistics


def differences(cfgs: list[Config]) -> list[dict[str, Any]]:
    """The best configuration against each other one on the same test images: the accuracy difference with
    its paired bootstrap interval, McNemar's p and Holm's adjusted p over all of these comparisons."""
    best = best_of(cfgs)
    ref = best.correct()
    if ref is None:
        return []
    rows: list[dict[str, Any]] = []
    for c in cfgs:
        other = c.correct()
        if c is best or other is None or other[0] != ref[0] or len(other[1]) != len(ref[1]):
            continue
        boot = stats.paired_bootstrap(ref[1], other[1], n_boot=BOOTSTRAP, seed=0)
        rows.append({"config": c, "best": best, "diff": boot, "p": stats.mcnemar(ref[1], other[1]).p_value})
    for row, adjusted in zip(rows, stats.holm([r["p"] for r in rows]), strict=True):
        row["holm"] = adjusted
    return rows


def significance(main: list[dict[str, Any]]) -> list[Block]:
    out: list[Block] = []
    for (dataset,), runs in sorted(group(main, "dataset").items()):  # every layer's configurations
        rows = differences(configs(runs))
        if rows:
            out += [("h2", f"{dataset}: which differences from the best survive"), *significance_blocks(rows)]
    return out


def significance_blocks(rows: list[dict[str, Any]]) -> list[Block]:
    best = rows[0]["best"]
    survive = [r for r in rows if r["holm"] < ALPHA]
    text = (
        f"{best.label()} against each of the {len(rows)} other configurations on the same {best.n_test} test "
        f"images (first seed's run): the accuracy difference with its 95% paired bootstrap interval "
        f"({BOOTSTRAP:,} resamples of the test images), McNemar's p, and Holm's p corrected for the "
        f"{len(rows)} comparisons. {len(survive)} of {len(rows)} survive at {ALPHA:g}"
        + (": " + ", ".join(r["config"].label() for r in survive) + "." if survive else ".")
    )
    body = [
        [
            r["config"].label(),
            f"{r['config'].accuracy:.4f}",
            f"{r['diff'].diff * 100:+.2f} ({r['diff'].low * 100:+.2f} to {r['diff'].high * 100:+.2f})",
            f"{r['p']:.2g}",
            f"{r['holm']:.2g}",
            "yes" if r["holm"] < ALPHA else "no",
        ]
        for r in sorted(rows, key=lambda r: r["holm"])
    ]
    header = ["configuration", "accuracy", "best − it, points (95% CI)", "McNemar p", "Holm p", "survives"]
    return [("p", text), ("table", (header, body))]


# --------------------------------------------------------------------------- probes


def knn_probe(main: list[dict[str, Any]]) -> list[Block]:
    runs = [r for r in main if r["_record"].details.get("knn")]
    if not runs:
        return []
    ks = sorted({k for r in runs for k in r["_record"].details["knn"]["accuracy_by_k"]}, key=int)
    body = []
    for (dataset, model, layer, variant), group_ in sorted(group(runs, "dataset", "model", "layer", "variant").items()):
        cells = []
        for k in ks:
            values = [r["_record"].details["knn"]["accuracy_by_k"].get(k) for r in group_]
            found = [v for v in values if v is not None]
            cells.append(f"{mean_sd(found)[0]:.4f}" if found else "—")
        temperature = group_[0]["_record"].details["knn"]["temperature"]
        body.append([dataset, model + (f" [{variant}]" if variant else ""), layer, f"{temperature:g}", *cells])
    return [
        ("h2", "kNN probe (DINO's weighted k-nearest neighbours)"),
        (
            "p",
            "Cosine similarity on L2-normalised features; each of the k nearest training images votes for its class "
            "with weight exp(similarity / T). " + knn_caption(ks),
        ),
        ("table", (["dataset", "model", "layer", "T", *[f"k = {k}" for k in ks]], body)),
    ]


def knn_caption(ks: list[str]) -> str:
    """What the kNN table's columns are, said from the k values it shows (never a fixed count)."""
    from tlfeat.knn import KS

    text = f"Test accuracy at k = {', '.join(ks)}: DINO's k = {', '.join(map(str, KS))} and the run's own --k"
    if any(str(k) not in ks for k in KS):  # proba_by_k caps k at the training set's size
        text += ", each capped at the number of training images"
    return text + " (the run's own k is its accuracy elsewhere in this report)."


def c_search(main: list[dict[str, Any]]) -> list[Block]:
    rows = []
    for r in main:
        cv = r["_record"].details.get("cv") or {}
        if "grid" in cv and r["_record"].details.get("protocol") is None:
            rows.append((r, cv))
    if not rows:
        return []
    edge = [(r, cv) for r, cv in rows if cv.get("on_edge")]
    body = [
        [r["dataset"], r["model"], r["method"], r["layer"], str(r["seed"]), f"{cv['C']:g}", str(cv.get("chosen_by", "")),
         f"{min(cv['grid']):g}–{max(cv['grid']):g}", "⚠ on the edge" if cv.get("on_edge") else ""]
        for r, cv in rows
    ]  # fmt: skip
    out: list[Block] = [
        ("h2", "How C was chosen"),
        (
            "p",
            "C is the inverse regularisation strength on standardised features (logreg and the linear head add "
            "||W||² / (2 C n) to the mean cross-entropy; the SVM's is liblinear's C). It is chosen on a validation "
            "split of the training images (k-fold cross-validation on small sets), fitting each candidate on as many "
            "images as the final fit, along a warm-started path; a grid whose best C lands on an edge is widened.",
        ),
    ]
    if edge:
        out.append(
            (
                "p",
                f"⚠ {len(edge)} run(s) chose a C on the edge of the searched grid even after widening it: a C beyond it might do better (`--C`).",
            )
        )
    out.append(("table", (["dataset", "model", "method", "layer", "seed", "C", "chosen by", "grid", ""], body)))
    return out


def protocols(main: list[dict[str, Any]]) -> list[Block]:
    runs = [r for r in main if r["_record"].details.get("protocol")]
    if not runs:
        return []
    body = []
    for r in runs:
        p = r["_record"].details["protocol"]
        chosen = f"C = {p['C']:.3g}" if p["name"] == "clip" else f"lr = {p['lr']:g} (scaled {p['lr'] * 0.5:g})"
        body.append([r["dataset"], r["model"], r["layer"], p["name"], chosen, f"{max(p['val_accuracy']):.4f}", f"{p['n_fit']} / {p['n_val']}", p["refit_on"], f"{r['accuracy']:.4f}"])  # fmt: skip
    return [
        ("h2", "Papers' protocols"),
        (
            "p",
            "`protocol:clip`: logistic regression on the raw features, C from a binary search over 1e-6 to 1e6 (8 steps "
            "per decade) on a validation split, refitted on train + validation (CLIP, Radford et al. 2021). "
            "`protocol:dinov2`: a linear layer per learning rate of 13, SGD with momentum, cosine schedule, 12,500 "
            "iterations of 128 images; the one best on the validation split is tested (DINOv2, Oquab et al. 2023; no "
            "augmentation on cached features).",
        ),
        (
            "table",
            (
                [
                    "dataset",
                    "model",
                    "layer",
                    "protocol",
                    "chosen",
                    "val accuracy",
                    "fit / val images",
                    "refit on",
                    "test accuracy",
                ],
                body,
            ),
        ),
    ]


SMALL_N = 5  # k-shot cells of fewer draws name their n beside the interval


def shots(shot_items: list[dict[str, Any]], main: list[dict[str, Any]], images: dict[str, Path]) -> list[Block]:
    if not shot_items:
        return []
    points = shot_points(shot_items)
    ns = sorted({n for v in points.values() for n in v})
    body = []
    for (dataset, model, method), by_n in sorted(points.items()):
        cells = []
        for n in ns:
            if n not in by_n:
                cells.append("—")
                continue
            mean, low, high = t_interval(by_n[n])
            few = f", n = {len(by_n[n])}" if len(by_n[n]) < SMALL_N else ""  # a t interval of few draws is wide
            cells.append(f"{mean:.4f} ({low:.3f}–{high:.3f}{few})")
        whole = whole_set(main, dataset, model, method)
        cells.append("—" if whole is None else f"{whole['accuracy']:.4f}")
        body.append([dataset, model, method, *cells])
    draws = max(len(v) for by_n in points.values() for v in by_n.values())
    out: list[Block] = [
        ("h2", "k-shot curves"),
        (
            "p",
            f"Each frozen classifier fitted on k training images per class ({draws} draws per k, each a fixed choice by a "
            "hash of the image ids), tested on the whole test split: mean accuracy (95% t interval over the draws). "
            "'all': the same classifier on every training image.",
        ),
        ("table", (["dataset", "model", "method", *[f"k = {n}" for n in ns], "all"], body)),
    ]
    short = sorted(
        {
            (r["dataset"], int(r["shots"]), len(r["_record"].details["shots"]["short_classes"]), r["_record"].n_classes)
            for r in shot_items
            if (r["_record"].details.get("shots") or {}).get("short_classes")
        }
    )
    if short:
        out.append(
            (
                "p",
                "k above a class's training images: "
                + "; ".join(
                    f"{d}, k = {k}: {n} of {c} classes have fewer, and use all of theirs"
                    + (" (every draw is the same: the whole training set)" if n == c else "")
                    for d, k, n, c in short
                )
                + ".",
            )
        )
    out += [("img", (f"k-shot accuracy, {d.split(':', 1)[1]}", p)) for d, p in images.items() if d.startswith("shots:")]
    return out


def layerwise(images: dict[str, Path]) -> list[Block]:
    if "layers" not in images:
        return []
    return [
        ("h2", "Layer-wise probe"),
        ("p", "Test accuracy of the same classifier on each swept layer's features, shallow to deep, per model."),
        ("img", ("Accuracy against layer depth", images["layers"])),
    ]


# --------------------------------------------------------------------------- fine-tuning curves


def overfit(main: list[dict[str, Any]]) -> list[Block]:
    tuned = [r for r in main if r["_record"].kind == "finetune" and r["_record"].details.get("history")]
    if not tuned:
        return []
    lines = []
    for r in tuned:
        rec = r["_record"]
        found = overfitting(rec.details["history"], rec.details.get("best_epoch"))
        if found is not None:
            lines.append(
                f"⚠ {r['dataset']}: {rec.parsed_method.describe(r['model'])}, seed {r['seed']}: {found.sentence()}."
            )
    text = (
        f"{len(lines)} of {len(tuned)} fine-tuning run(s) overfit: their validation loss rose for 3 or more epochs after "
        "its minimum (ending over 2% above it) while the training loss kept falling."
    )
    return [("h2", "Overfitting"), ("p", text), *[("li", line) for line in lines]]


def chains(main: list[dict[str, Any]]) -> list[Block]:
    runs = [r for r in main if r["_method"].is_chain and r["_record"].details.get("stages")]
    if not runs:
        return []
    starts = {bool(r["pretrained"]) for r in runs}  # the weights stage 1 started from, carried by the chain
    start = (
        "Pretrained weights"
        if starts == {True}
        else "Random weights (UNTRAINED models)"
        if starts == {False}
        else "Each model's starting weights (pretrained, or random where marked UNTRAINED)"
    )
    out: list[Block] = [
        ("h2", "Multi-stage transfer"),
        (
            "p",
            f"{start} fine-tuned on an intermediate dataset, then on the target with the same strategy. Stage 1 "
            "is made once and reused by every target (its time counts in each chain's total, as the cost of one chain "
            "from scratch). Beside each: the same model fine-tuned on the target directly and trained from scratch.",
        ),
    ]
    body = []
    for r in runs:
        s1, s2 = r["_record"].details["stages"]
        direct = _same_target(
            main, r, lambda m, s=r["_method"]: m.is_finetune and not m.is_chain and m.strategy == s.strategy
        )
        scratch = _same_target(main, r, lambda m: m.is_scratch)
        body.append([
            r["dataset"], r["model"], r["method"], str(r["seed"]),
            f"{s1['dataset']}: {s1['n_train']} images, {s1['epochs']} ep, {s1['train_seconds']:.0f} s" + (" (reused)" if s1.get("reused") else ""),
            f"{s2['n_train']} images, {s2['epochs']} ep, {s2['train_seconds']:.0f} s",
            f"{r['accuracy']:.4f}", f"{r['train_seconds']:.0f} s", direct, scratch,
        ])  # fmt: skip
    header = [
        "target",
        "model",
        "method",
        "seed",
        "stage 1",
        "stage 2",
        "accuracy",
        "both stages",
        "direct fine-tune",
        "scratch",
    ]
    out.append(("table", (header, body)))
    return out


def _same_target(main: list[dict[str, Any]], chain: dict[str, Any], which: Any) -> str:
    """The run on the chain's target that `which` picks: from the same start (pretrained or UNTRAINED),
    or for scratch, of the same architecture."""
    base = chain["_record"].model
    found = [
        r for r in main
        if r["dataset"] == chain["dataset"] and which(r["_method"]) and r["seed"] == chain["seed"]
        and (r["model"] == chain["model"] or (r["_method"].is_scratch and r["_record"].model == base))
    ]  # fmt: skip
    if not found:
        return "—"
    r = found[0]
    return f"{r['accuracy']:.4f} in {r['train_seconds']:.0f} s"


# --------------------------------------------------------------------------- representation analyses


def representations(analyses: list[dict[str, Any]]) -> list[Block]:
    if not analyses:
        return []
    out: list[Block] = [("h2", "Representation analyses")]
    for entry in analyses:
        out.append(("img", (str(entry.get("title", "")), Path(str(entry["_png"])))))
        out.append(("p", f"{entry.get('note', '')} Values: `analyses/{entry.get('csv', '')}`."))
    return out


def copy_analyses(out: Path, folder: Path, names: Names) -> list[dict[str, Any]]:
    """The analyses in `out/analyses/index.json`, their PNGs copied into the report's plots folder. The
    index is read back from disk: a PNG it names is taken only from inside `out/analyses`."""
    from tlfeat.analysis.study import read_index

    found = []
    for entry in read_index(out / "analyses"):
        data = png_inside(out / "analyses", entry.get("png"))
        if data is None:
            log.warning("left out analysis %r: its PNG is not a PNG file inside %s", entry.get("png"), out / "analyses")
            continue
        target = folder / names("analysis", Path(str(entry["png"])).stem)
        fsio.atomic_write(target, data)
        found.append({**entry, "_png": target})
    return found
