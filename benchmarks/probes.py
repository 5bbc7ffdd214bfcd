"""Probes on frozen MobileNetV2 features of full MNIST and Fashion-MNIST (issue 23's figures).

    python benchmarks/probes.py                        # mnist and fashion-mnist, 60,000 + 10,000 each, 224 px
    python benchmarks/probes.py --quick                # digits at 64 px: a smoke test in a few minutes

One extraction pass per dataset gives features.13, features.17 and the penultimate layer. On them:
the C search tlfeat used before (3-fold CV on a 3,000-image subset, grid 0.001..10, then a refit;
done here as it was, for the comparison), the new default (validation split, warm-started path),
C = 0.03 given (the issue's validation-split choice on MNIST), the CLIP and DINOv2 protocols, the
kNN probe at DINO's four k, and the concatenations features.17+penultimate and
features.13+features.17+penultimate with the new default. Every fit is evaluated on the whole
official test split. Prints a Markdown table and writes it with the JSON records under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tlfeat import ExtractConfig, cache, extract
from tlfeat.fitting import FitConfig, fit

LAYERS = "features.13,features.17,penultimate"


def old_default(train: cache.FeatureSet, test: cache.FeatureSet) -> dict[str, float]:
    """tlfeat 0.2's choice of C: 3-fold stratified CV on a stratified 3,000-image subset over
    0.001..10, then a fit on every training image with that C."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from tlfeat import datasets
    from tlfeat.classifiers import make_classifier

    t0 = time.perf_counter()
    idx = datasets.stratified_subset(train.y, 3000, seed=0, ids=train.ids)
    search = GridSearchCV(
        make_classifier("logreg"), {"clf__C": [0.001, 0.01, 0.1, 1.0, 10.0]},
        cv=StratifiedKFold(3, shuffle=True, random_state=0), scoring="accuracy", n_jobs=1,
    ).fit(train.X[idx], train.y[idx])  # fmt: skip
    C = float(search.best_params_["clf__C"])
    searched = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = make_classifier("logreg", C=C).fit(train.X, train.y)
    accuracy = float(np.mean(model.predict(test.X) == test.y))
    return {"C": C, "accuracy": accuracy, "search_s": searched, "fit_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist,fashion-mnist")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="training images (default: all 60,000)")
    parser.add_argument("--quick", action="store_true", help="digits at 64 px")
    parser.add_argument(
        "--skip", default="", help="comma-separated words: runs whose name or features contain one are left out"
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/probes"))
    args = parser.parse_args()
    datas = ["digits"] if args.quick else args.data.split(",")
    size = 64 if args.quick and args.image_size is None else args.image_size
    cache_dir, results = args.out / "features_cache", args.out / "results"
    table, records = [], {}
    for data in datas:
        t0 = time.perf_counter()
        found = extract(
            ExtractConfig(model="mobilenet_v2", data=data, layer=LAYERS, image_size=size, limit=args.limit, cache_dir=cache_dir, progress=False)
        )  # fmt: skip
        extract_s = time.perf_counter() - t0
        print(f"{data}: extraction (3 layers, one pass) {extract_s:.0f} s", flush=True)
        by = {(fs.split, str(fs.meta["layer"])): fs for fs in found}
        old = old_default(by[("train", "penultimate")], by[("test", "penultimate")])
        table.append([data, "logreg, earlier default (3-fold CV on 3,000)", "penultimate", f"C={old['C']:g}", old["accuracy"], old["search_s"], old["fit_s"]])  # fmt: skip
        print(" | ".join(map(str, table[-1])), flush=True)
        runs = [
            ("logreg, new default", "penultimate", {}),
            ("logreg, C = 0.03 given", "penultimate", {"C": 0.03}),
            ("protocol:clip", "penultimate", {"protocol": "clip"}),
            ("protocol:dinov2", "penultimate", {"protocol": "dinov2"}),
            ("knn (k = 20; 10, 100, 200 in the record)", "penultimate", {"clf": "knn"}),
            ("logreg, new default", "features.17+penultimate", {}),
            ("logreg, new default", "features.13+features.17+penultimate", {}),
            ("logreg, new default", "features.13", {}),
            ("logreg, new default", "features.17", {}),
        ]
        skip = [w for w in args.skip.split(",") if w]
        for name, layer, options in [r for r in runs if not any(w in f"{r[0]} {r[1]}" for w in skip)]:
            [res] = fit(
                FitConfig(model="mobilenet_v2", data=data, layer=layer, image_size=size, limit=args.limit, cache_dir=cache_dir, results_dir=results, **options)  # type: ignore[arg-type]
            )  # fmt: skip
            r = res.record
            if "protocol" in r.details:
                p = r.details["protocol"]
                how = f"C={p['C']:.3g}" if "C" in p else f"lr={p['lr']:g}"
            elif "knn" in r.details:
                how = ", ".join(f"k={k}: {a:.4f}" for k, a in r.details["knn"]["accuracy_by_k"].items())
            else:
                cv = r.details.get("cv") or {}
                how = f"C={r.params['C']:g}" + (" (on the grid's edge)" if cv.get("on_edge") else "")
            table.append(
                [data, name, layer, how, r.metrics["accuracy"], r.timings.search_seconds, r.timings.train_seconds]
            )
            print(f"{data} | {name} | {layer} | {how} | {r.metrics['accuracy']:.4f} | search {r.timings.search_seconds:.1f} s | fit {r.timings.train_seconds:.1f} s", flush=True)  # fmt: skip
            records[f"{data}/{name}/{layer}"] = json.loads(r.to_json())
    lines = [
        "| dataset | method | features | chosen | test accuracy | search s | fit s |",
        "|---|---|---|---|---|---|---|",
        *[f"| {d} | {m} | {layer} | {h} | {a:.4f} | {s:.1f} | {f:.1f} |" for d, m, layer, h, a, s, f in table],
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probes.md").write_text("\n".join(lines) + "\n")
    (args.out / "probes.json").write_text(json.dumps(records, indent=2, default=str))


if __name__ == "__main__":
    main()
