"""Extraction speed: tlfeat against the PyTorch tutorial loop, per backend, on real JPEG files.

    python benchmarks/extract_speed.py                      # MobileNetV2 and ResNet-50, 1024 images
    python benchmarks/extract_speed.py --images 256 --models mobilenet_v2 --no-rss

For each model, in one run, on the same images and thread count, it prints images/s and ratios for
  1. the tutorial baseline: ImageFolder + PIL transforms per image, batch 4, default memory
     layout, no worker processes, torch.no_grad() (the PyTorch transfer-learning tutorial's loop),
     in a fresh process with glibc's default malloc; and, to show what that setting alone is
     worth, the same loop with malloc's thresholds pinned as `tlfeat extract` pins them;
  2. the model alone on pre-made tensors (best batch size, memory layout and, for ONNX Runtime,
     thread spinning; malloc thresholds pinned), each backend's ceiling;
  3. `tlfeat extract` end to end (decode, resize, inference, HDF5 write), each backend;
and the time of a second, cached `tlfeat extract` against the first. With --rss it also runs
`tlfeat extract` in fresh processes over N and 10 N images and reports their peak memory.

The images are scikit-image's sample photographs, cropped, flipped and resized at random to
500 x 375 JPEG files (the size of a typical ImageNet photo), one class per source photo.
ResNet-50 runs with random weights (its ImageNet weights need a download); speed does not depend
on the values of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "hubble_deep_field")
SIZE = (500, 375)


def make_photo_set(root: Path, n: int, seed: int = 0) -> Path:
    """`n` JPEG files under root/train/<photo>/, plus one per class under root/val/."""
    import skimage.data
    from PIL import Image

    marker = root / f".made-{n}-{seed}"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    for split, count in (("train", n), ("val", len(PHOTOS))):
        for i in range(count):
            k = i % len(PHOTOS)
            img = sources[k]
            w, h = img.size
            scale = rng.uniform(0.6, 1.0)
            cw, ch = int(w * scale), int(h * scale)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = img.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.BILINEAR)
            if rng.random() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            folder = root / split / PHOTOS[k]
            folder.mkdir(parents=True, exist_ok=True)
            out.save(folder / f"{i:06d}.jpg", quality=90)
    marker.touch()
    return root


def build_model(name: str) -> Any:
    """The model as the tutorial uses it: torchvision's, head replaced by Identity, eval mode."""
    import torch
    import torchvision

    from tlfeat import backbones, weights

    net = torchvision.models.get_model(name, weights=None)
    if name == "mobilenet_v2":  # real ImageNet weights, verified, from the registry package
        net.load_state_dict(torch.load(weights.resolve(name).path, weights_only=True))
    return backbones.feature_extractor(net, name).eval()


def tutorial_child(args: argparse.Namespace) -> None:
    """Run in a fresh process, so that no earlier allocation has moved glibc's thresholds."""
    if args.pin_malloc:
        from tlfeat import allocator

        assert allocator.pin_malloc_thresholds()
    print(json.dumps({"images_per_s": tutorial_baseline(args.models, args.root)}))


def tutorial(name: str, root: Path, pin_malloc: bool) -> float:
    cmd = [sys.executable, __file__, "--tutorial-child", "--models", name, "--root", str(root)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(cmd + ["--pin-malloc"] * pin_malloc, capture_output=True, text=True, check=True, env=env)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"])


def tutorial_baseline(name: str, root: Path) -> float:
    """images/s of the loop in the PyTorch transfer-learning tutorial."""
    import torch
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    data = torchvision.datasets.ImageFolder(str(root / "train"), tf)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False, num_workers=0)
    model = build_model(name)
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = [model(x).numpy() for x, _ in loader]
    seconds = time.perf_counter() - t0
    assert sum(len(f) for f in feats) == len(data)
    return len(data) / seconds


def ceilings(name: str, seconds: float = 6.0) -> dict[str, float]:
    """images/s of the model alone on pre-made tensors, best layout and batch size per backend."""
    import torch

    from tlfeat import allocator, onnx_backend

    allocator.pin_malloc_thresholds()  # as `tlfeat extract` runs

    def rate(fn: Any, x: Any, batch: int) -> float:
        fn(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(x)
            n += batch
        return n / (time.perf_counter() - t0)

    model = build_model(name)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for batch in (4, 32):
            x = torch.randn(batch, 3, 224, 224)
            for layout in (torch.contiguous_format, torch.channels_last):
                m = model.to(memory_format=layout)
                out["torch"] = max(out.get("torch", 0.0), rate(m, x.contiguous(memory_format=layout), batch))
    if onnx_backend.available():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            onnx_backend.export(build_model(name), path, 224, ["penultimate"], {"model": name})
            for spin in (True, False):
                session = onnx_backend.Session(path, spin=spin)
                for batch in (4, 32):
                    out["onnxruntime"] = max(
                        out.get("onnxruntime", 0.0), rate(session, torch.randn(batch, 3, 224, 224), batch)
                    )
    return out


def tlfeat_extract(name: str, root: Path, backend: str, cache_dir: Path) -> dict[str, float]:
    """Wall time of `extract` end to end (a fresh cache; the ONNX export made beforehand), then cached."""
    from tlfeat import ExtractConfig, extract

    def cfg(**kw: Any) -> ExtractConfig:
        return ExtractConfig(
            model=name,
            data=str(root),
            splits=("train",),
            untrained=name != "mobilenet_v2",
            backend=backend,
            cache_dir=cache_dir,
            progress=False,
            **kw,
        )

    t0 = time.perf_counter()
    extract(cfg(limit=len(PHOTOS)))  # builds the model once and, for onnxruntime, makes the export
    prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    [fs] = extract(cfg())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    [again] = extract(cfg())
    second = time.perf_counter() - t0
    assert again.reused and np.array_equal(again.X, fs.X)
    return {"images_per_s": len(fs) / first, "first_s": first, "second_s": second, "prepare_s": prepare}


def rss_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: extract, then print peak RSS of this process and of its workers."""
    from tlfeat import ExtractConfig, extract

    t0 = time.perf_counter()
    [fs] = extract(
        ExtractConfig(
            model=args.models,
            data=str(args.root),
            splits=("train",),
            backend=args.backend,
            cache_dir=args.cache_dir,
            progress=False,
        )
    )
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "images": len(fs),
                "seconds": seconds,
                "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def rss(model: str, backend: str, work: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    for count in (n, 10 * n):
        root = make_photo_set(work / f"photos-{count}", count)
        cache_dir = work / f"rss-cache-{model}-{backend}-{count}"
        shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh cache: the run must compute everything
        cmd = [sys.executable, __file__, "--rss-child", "--models", model, "--backend", backend]
        cmd += ["--root", str(root), "--cache-dir", str(cache_dir)]
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "TLFEAT_OFFLINE": "1"}
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rss-images", type=int, default=200, help="N for the RSS runs (N and 10 N images).")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlfeat-bench")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/extract_speed.json"))
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tutorial-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pin-malloc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TLFEAT_OFFLINE", "1")
    if args.rss_child:
        rss_child(args)
        return
    if args.tutorial_child:
        tutorial_child(args)
        return

    from tlfeat import onnx_backend

    backends = ["torch"] + (["onnxruntime"] if onnx_backend.available() else [])
    root = make_photo_set(args.work / f"photos-{args.images}", args.images)
    info = machine()
    print(f"machine: {info}\nimages: {args.images} JPEG files, {SIZE[0]} x {SIZE[1]}, 224 px crops\n", flush=True)
    report: dict[str, Any] = {"machine": info, "images": args.images, "models": {}}
    lines = [
        "| model | route | images/s | × tutorial | % of same-backend ceiling |",
        "|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        base = tutorial(name, root, pin_malloc=False)
        pinned = tutorial(name, root, pin_malloc=True)
        ceil = ceilings(name)
        runs = {}
        for backend in backends:
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                runs[backend] = tlfeat_extract(name, root, backend, Path(tmp))
        report["models"][name] = {
            "tutorial_images_per_s": base,
            "tutorial_pinned_malloc_images_per_s": pinned,
            "ceiling_images_per_s": ceil,
            "tlfeat": runs,
        }
        lines.append(f"| {name} | tutorial loop (batch 4, PIL, no workers) | {base:.1f} | 1.00 | |")
        lines.append(f"| {name} | the same loop, malloc thresholds pinned | {pinned:.1f} | {pinned / base:.2f} | |")
        for backend, value in ceil.items():
            lines.append(
                f"| {name} | model alone, {backend} (best of batch 4/32 and layouts, pre-made tensors) "
                f"| {value:.1f} | {value / base:.2f} | 100% |"
            )
        for backend, r in runs.items():
            speed = r["images_per_s"]
            lines.append(
                f"| {name} | `tlfeat extract --backend {backend}` end to end | {speed:.1f} | {speed / base:.2f} | "
                f"{100 * speed / ceil[backend]:.0f}% |"
            )
        for backend, r in runs.items():
            lines.append(
                f"| {name} | second `extract` ({backend}, cached) | {r['second_s'] * 1000:.0f} ms | | "
                f"{100 * r['second_s'] / r['first_s']:.2f}% of the first |"
            )
        print("\n".join(lines[-(2 + 2 * len(runs) + len(ceil)) :]), flush=True)
    if not args.no_rss:
        model = args.models.split(",")[0]
        rows = rss(model, backends[-1], args.work, args.rss_images)
        report["rss"] = {"model": model, "backend": backends[-1], "runs": rows}
        lines += [
            "",
            "| images | seconds | main process peak RSS (MB) | largest worker peak RSS (MB) |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['images']} | {r['seconds']:.1f} | {r['main_rss_mb']:.0f} | {r['worker_rss_mb']:.0f} |" for r in rows
        ]
        lines.append(
            f"RSS at 10x the images / 1x: {rows[1]['main_rss_mb'] / rows[0]['main_rss_mb']:.3f} (main process)"
        )
        print("\n".join(lines[-5:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
