"""Fit speed: `tlfeat fit --clf logreg` against scikit-learn's default LogisticRegression.

    python benchmarks/fit_speed.py [--image-size 112]

Both run on the same MNIST features (60,000 x 1280 MobileNetV2 penultimate features of the
official training images, standardised; tested on the official 10,000 test images). The features
are extracted first if the cache lacks them (minutes). Three rows:
- scikit-learn's default `LogisticRegression()`: C=1, L-BFGS, at most 100 iterations;
- `tlfeat fit --clf logreg --C 1`: the same objective and stopping rule, tlfeat's solver;
- `tlfeat fit --clf logreg`: C chosen by 3-fold cross-validation first (what users get).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--cache-dir", type=Path, default=Path("features_cache"))
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/fit_speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("TLFEAT_OFFLINE", "1")

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from tlfeat import ExtractConfig, extract
    from tlfeat.catalog import Entry
    from tlfeat.fitting import FitConfig, Pair, fit_pair

    train, test = extract(
        ExtractConfig(model=args.model, data=args.data, image_size=args.image_size, cache_dir=args.cache_dir)
    )
    print(f"features: train {train.X.shape}, test {test.X.shape} ({train.meta['backend']} backend)", flush=True)

    scaler = StandardScaler().fit(train.X)
    Xtr, Xte = scaler.transform(train.X), scaler.transform(test.X)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        default = LogisticRegression().fit(Xtr, train.y)
    sk_seconds = time.perf_counter() - t0
    sk_acc = float((default.predict(Xte) == test.y).mean())
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    print(f"scikit-learn default LogisticRegression: {sk_acc:.4f} in {sk_seconds:.1f} s (converged: {converged})")

    routes = {}
    for label, C in (("same objective, --C 1", 1.0), ("C by cross-validation", None)):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pair = Pair(Entry(train.path, train.meta, "ok"), Entry(test.path, test.meta, "ok"))
            rec = fit_pair(FitConfig(clf="logreg", C=C, results_dir=Path(tmp), route="memory"), pair).record
            seconds = time.perf_counter() - t0
        t = rec.timings
        routes[label] = {
            "accuracy": rec.metrics["accuracy"],
            "seconds": seconds,
            "timings": vars(t),
            "C": rec.params["C"],
        }
        print(
            f"tlfeat fit --clf logreg ({label}): {rec.metrics['accuracy']:.4f} in {seconds:.1f} s "
            f"(C search {t.search_seconds:.1f} s, C={rec.params['C']:g}, fit {t.train_seconds:.1f} s); "
            f"{sk_seconds / seconds:.2f}x scikit-learn's speed, accuracy "
            f"{100 * (rec.metrics['accuracy'] - sk_acc):+.2f} points"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "features": {"train": list(train.X.shape), "test": list(test.X.shape), "image_size": args.image_size},
                "sklearn_default": {"accuracy": sk_acc, "seconds": sk_seconds, "converged": converged},
                "tlfeat_logreg": routes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
