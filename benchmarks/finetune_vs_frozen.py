"""Every fine-tuning strategy beside extract + fit, on the same MNIST subset, real MobileNetV2.

    python benchmarks/finetune_vs_frozen.py [--limit 1000] [--epochs 5] [--image-size 112]

Prints a Markdown table (accuracy on the whole official test split, wall time) and writes
it with the JSON records under results/. Times are wall seconds on this machine, all in one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tlfeat import ExtractConfig, extract
from tlfeat.finetune import FinetuneConfig, finetune_one
from tlfeat.fitting import FitConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--out", type=Path, default=Path("results/finetune_vs_frozen"))
    args = parser.parse_args()
    cache_dir, results_dir = args.out / "features_cache", args.out

    rows = []
    t0 = time.perf_counter()
    feats = extract(
        ExtractConfig(
            model=args.model,
            data=args.data,
            limit=args.limit,
            image_size=args.image_size,
            cache_dir=cache_dir,
            progress=False,
        )
    )
    extract_s = time.perf_counter() - t0
    if any(f.reused for f in feats):
        extract_s = sum(float(f.meta["extract_seconds"]) for f in feats)
    for clf in ("logreg", "svm", "linear"):
        [res] = fit(FitConfig(clf=clf, model=args.model, data=args.data, cache_dir=cache_dir, results_dir=results_dir))
        r = res.record
        train_s = r.timings.train_seconds + r.timings.search_seconds
        rows.append((f"extract + {clf}", r.metrics["accuracy"], r.n_train, train_s, extract_s, extract_s + train_s))
        n_test = r.n_test

    for strategy in ("head", "freeze:10", "discriminative", "full", "scratch"):
        res = finetune_one(
            FinetuneConfig(
                model=args.model,
                data=args.data,
                strategy=strategy,
                epochs=args.epochs,
                image_size=args.image_size,
                limit=args.limit,
                results_dir=results_dir,
                progress=False,
            )
        )
        r = res.record
        rows.append((r.method, r.metrics["accuracy"], r.n_train, r.timings.train_seconds, 0.0, r.timings.total_seconds))

    lines = [
        f"{args.model} on {args.data}: {args.limit} training images (--limit), all {n_test} test images, "
        f"{args.image_size} px, fine-tuning "
        f"{args.epochs} epochs each (transfer strategies: Adam, lr 1e-3; scratch: its SGD + cosine recipe)",
        "",
        "| method | test accuracy | train images | train s | extract s | total s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {acc:.4f} | {n} | {tr:.1f} | {ex:.1f} | {tot:.1f} |" for m, acc, n, tr, ex, tot in rows]
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
