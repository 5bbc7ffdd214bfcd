"""Ray's overhead on one machine, and the per-image costs that decide how extraction scales out.

    .venv/bin/python benchmarks/ray_scaling.py --images 512

On the same JPEG photos (500 x 375, MobileNetV2 ONNX Runtime, 224 px), in one run:
  - the local engine (`--engine local`), end to end;
  - `--engine ray` with 1, 2 and 4 model replicas on a local Ray (this machine's cores), the
    Ray start-up timed apart from the extraction;
  - the per-image costs docs/scaling.md reasons with: decoding and resizing (one core), the
    network alone (one core), writing a row on the driver, and moving a decoded crop through the
    object store.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from extract_speed import make_photo_set  # noqa: E402


def per_image_costs(root: Path, work: Path) -> dict[str, float]:
    """Milliseconds per image of each stage, measured on one core."""
    from tlfeat import backbones, datasets, inference
    from tlfeat.pool import decode_batch
    from tlfeat.preprocess import Normalizer
    from tlfeat.writer import Listing, Writer

    split = datasets.load_split(str(root), "train")
    prep = backbones.preprocessing("mobilenet_v2", None, None)
    items = split.items(range(min(256, len(split))))
    t0 = time.perf_counter()
    decoded = decode_batch(items, prep, skip=False)
    decode_ms = (time.perf_counter() - t0) * 1000 / len(items)
    spec = inference.ModelSpec(
        "mobilenet_v2",
        (None,),
        "IMAGENET1K_V1",
        None,
        None,
        False,
        0,
        224,
        "onnxruntime",
        "fp32",
        "cpu",
        work / "cache",
    )
    inference.load(spec)  # makes sure the export exists
    from tlfeat import onnx_backend

    one_core = onnx_backend.Session(spec.onnx_path(), threads=1)
    x = Normalizer(prep)(decoded.crops[:64]).copy()
    one_core(x[:8])
    t0 = time.perf_counter()
    for i in range(0, 64, 16):
        feats = one_core(x[i : i + 16])[0]
    infer_ms = (time.perf_counter() - t0) * 1000 / 64
    n = 4096
    listing = Listing([f"r/{i}" for i in range(n)], np.zeros(n, np.int64), ["a"], np.zeros((n, 2), np.int64), "s")
    writer = Writer(work / "write-test.h5", "k", {}, listing, flush_every=1024)
    rows = np.repeat(feats[:1], 64, axis=0)
    t0 = time.perf_counter()
    for _ in range(n // 64):
        writer.append(rows)
    writer.finish({})
    write_ms = (time.perf_counter() - t0) * 1000 / n
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    crops = decoded.crops[:64]
    t0 = time.perf_counter()
    for _ in range(10):
        ray.get(ray.put(crops))
    store_ms = (time.perf_counter() - t0) * 1000 / (10 * len(crops))
    ray.shutdown()
    return {"decode_ms": decode_ms, "inference_ms": infer_ms, "driver_write_ms": write_ms, "object_store_ms": store_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlfeat-ray")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/ray_scaling.json"))
    args = parser.parse_args()
    os.environ.setdefault("TLFEAT_OFFLINE", "1")
    from tlfeat import ExtractConfig, extract

    root = make_photo_set(args.work / f"photos-{args.images}", args.images)
    base = dict(model="mobilenet_v2", data=str(root), splits=("train",), progress=False)
    warm = args.work / "warm"
    extract(ExtractConfig(**base, limit=8, cache_dir=warm))  # the ONNX export, made once (in the model cache)
    rows = []
    cache = args.work / "local"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    [local] = extract(ExtractConfig(**base, cache_dir=cache))
    local_s = time.perf_counter() - t0
    rows.append(("local engine", None, local_s, 0.0))
    import ray

    for workers in (1, 2, 4):
        cache = args.work / f"ray{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        [remote] = extract(ExtractConfig(**base, cache_dir=cache, engine="ray", num_workers=workers))
        rows.append((f"ray, {workers} replica(s)", workers, time.perf_counter() - t0, start_s))
        ray.shutdown()
        assert np.array_equal(remote.X, local.X), "Ray's features differ from the local engine's"
    print(f"{args.images} photos, MobileNetV2, ONNX Runtime, 224 px, {os.cpu_count()} cores")
    print("| engine | img/s | × local | Ray start-up s |\n|---|---:|---:|---:|")
    out = []
    for name, workers, seconds, start in rows:
        rate = args.images / seconds
        print(f"| {name} | {rate:.1f} | {local_s / seconds:.2f} | {start:.1f} |")
        out.append({"engine": name, "workers": workers, "seconds": seconds, "img_s": rate, "ray_start_s": start})
    costs = per_image_costs(root, args.work)
    print("per image, one core: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": args.images, "rows": out, "per_image": costs}, indent=2))


if __name__ == "__main__":
    main()
