"""A layer sweep in one pass against one pass per layer, and what an earlier layer costs.

    .venv/bin/python benchmarks/layers.py --images 256

ResNet-50 (random weights: speed does not depend on them), ONNX Runtime, 224 px, the same JPEG
photos, in one run: `--layer layer2`, `--layer layer3` and the penultimate layer each alone (the
graph is cut after the layer, so an earlier layer runs less of the network), then
`--layer layer2,layer3,penultimate` in one pass (one cache file per layer, as `compare --layers`
does), against the sum of the three single runs. Every run starts from an empty cache with its
export already made, so only extraction is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from extract_speed import make_photo_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlfeat-layers")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/layers.json"))
    args = parser.parse_args()
    os.environ.setdefault("TLFEAT_OFFLINE", "1")
    from tlfeat import ExtractConfig, extract

    root = make_photo_set(args.work / f"photos-{args.images}", args.images)
    base = dict(
        model=args.model, untrained=True, data=str(root), splits=("train",), progress=False, backend="onnxruntime"
    )
    exports = args.work / "exports"
    variants = {"layer2": "layer2", "layer3": "layer3", "penultimate": None, "sweep": "layer2,layer3,penultimate"}
    for layer in variants.values():  # every export made once (into the model cache), outside the timings
        extract(ExtractConfig(**base, layer=layer, limit=8, cache_dir=exports))
    seconds = {}
    for name, layer in variants.items():
        cache = args.work / f"run-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        extract(ExtractConfig(**base, layer=layer, cache_dir=cache))
        seconds[name] = time.perf_counter() - t0
    separate = seconds["layer2"] + seconds["layer3"] + seconds["penultimate"]
    print(f"{args.model}, {args.images} photos, {args.backend}, 224 px")
    for name in ("layer2", "layer3", "penultimate"):
        print(
            f"  {name:<12} alone: {seconds[name]:6.1f} s ({seconds[name] / seconds['penultimate']:.2f} of the whole network)"
        )
    print(
        f"  three layers, one pass: {seconds['sweep']:.1f} s; one pass each: {separate:.1f} s ({separate / seconds['sweep']:.2f}x)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(f"layers-{args.backend}.json").write_text(
        json.dumps({"images": args.images, "seconds": seconds, "separate_s": separate}, indent=2)
    )


if __name__ == "__main__":
    main()
