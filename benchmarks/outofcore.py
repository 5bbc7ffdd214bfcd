"""`tlfeat fit` on a feature file several times larger than the memory it may use.

    .venv/bin/python benchmarks/outofcore.py --rows 400000 --dim 1280 --memory-gb 0.5

Writes a synthetic cache (float32 rows of 10 overlapping Gaussian classes: 400k x 1280 is 2 GB),
then runs `tlfeat fit` in fresh processes with `--memory-gb` (so `auto` streams from disk) and with
`--route memory`, and reports the peak RSS of each process and the accuracy of each. A smaller
file (--small rows) is fitted both ways too, to compare accuracy where both routes run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
from pathlib import Path
from tlfeat.config import FitConfig
from tlfeat.fitting import fit
t0 = time.perf_counter()
kw = json.loads(sys.argv[1])
[r] = fit(FitConfig(**kw), allow_stale=True)
print(json.dumps({"accuracy": r.record.metrics["accuracy"], "route": r.record.details["route"], "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write(root: Path, rows: int, dim: int, k: int = 10, seed: int = 0) -> float:
    from tlfeat.writer import Listing, Writer

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (k, dim)).astype(np.float32)
    size = 0.0
    for split, n in (("train", rows), ("test", 20_000)):
        y = rng.integers(0, k, n)
        listing = Listing(
            [f"{split}/{i}" for i in range(n)], y, [str(c) for c in range(k)], np.zeros((n, 2), np.int64), "synthetic"
        )
        attrs = {"model": "synthetic", "dataset": "synthetic", "split": split, "layer": "penultimate", "weights_id": "none",
                 "pooling": "global-average", "preprocessing": "{}", "backend": "none", "precision": "fp32",
                 "label_field": "cls", "limit": 0, "created": "now"}  # fmt: skip
        path = root / f"synthetic__synthetic__{split}__{split:0<16}.h5"
        writer = Writer(path, split, attrs, listing, flush_every=65536)
        for s in range(0, n, 16384):
            yb = y[s : s + 16384]
            writer.append(centers[yb] * 0.05 + rng.normal(0, 1, (len(yb), dim)).astype(np.float32))
        writer.finish({})
        size += path.stat().st_size / 1e6
    return size


def run(cache: Path, results: Path, **kw: object) -> dict[str, float]:
    args = json.dumps({"clf": "logreg", "C": 0.1, "cache_dir": str(cache), "results_dir": str(results), **kw})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TLFEAT_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--small", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--memory-gb", type=float, default=0.5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlfeat-ooc")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/outofcore.json"))
    args = parser.parse_args()
    report = {}
    for label, rows in (("small", args.small), ("large", args.rows)):
        cache = args.work / label
        if not cache.is_dir():
            cache.mkdir(parents=True)
            t0 = time.perf_counter()
            size = write(cache, rows, args.dim)
            print(
                f"{label}: {rows} x {args.dim} ({size:.0f} MB) written in {time.perf_counter() - t0:.0f} s", flush=True
            )
        size = sum(p.stat().st_size for p in cache.glob("*__train__*.h5")) / 1e6
        stream = run(cache, args.work / f"results-{label}-stream", memory_gb=args.memory_gb)
        memory = run(cache, args.work / f"results-{label}-memory", route="memory")
        report[label] = {"rows": rows, "train_mb": size, "streaming": stream, "memory": memory}
        print(f"{label} ({size:.0f} MB of train features, --memory-gb {args.memory_gb}):")
        for name, r in (("streaming", stream), ("in memory", memory)):
            print(
                f"  {name:<10} route={r['route']:<9} accuracy {r['accuracy']:.4f}  peak RSS {r['peak_rss_mb']:.0f} MB  {r['seconds']:.0f} s"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
