"""Where users feel speed: process start to features on disk, cache hits, --help, and memory.

    .venv/bin/python benchmarks/startup.py                 # 200 and 1000 photos, MobileNetV2, 224 px

In one run, on the same JPEG photos (400 x 300), each command in a fresh process, wall time from
process start to exit:
  - the tutorial loop: torchvision ImageFolder + transforms, batch 4, no workers, torch;
  - `tlfeat extract` (default route: ONNX Runtime), with its ONNX export already made (any
    earlier extraction of the model made it) and cold (the export made in the run);
  - `tlfeat extract` a second time (the cache hit), `tlfeat --help`, `tlfeat extract --help`;
  - peak PSS of the whole process tree (main process and every worker, sampled every 20 ms) for
    the default route and for `--backend torch`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from extract_speed import make_photo_set  # noqa: E402

TUTORIAL = """
import sys, time
import numpy as np, torch, torchvision
from torchvision import datasets, transforms
from tlfeat import weights
root, out = sys.argv[1], sys.argv[2]
model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(weights.resolve("mobilenet_v2").path, weights_only=True))
model.classifier = torch.nn.Identity()
model.eval()
tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                         transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
loader = torch.utils.data.DataLoader(datasets.ImageFolder(root, tf), batch_size=4, shuffle=False, num_workers=0)
feats = []
with torch.no_grad():
    for x, _ in loader:
        feats.append(model(x).numpy())
np.save(out, np.concatenate(feats))
"""


def tlfeat(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "tlfeat_cli.main", *map(str, args)]


def extract_train(root: Path, cache_dir: Path, *extra: str | Path) -> list[str]:
    """`tlfeat extract` of the photo set's training split with MobileNetV2, quietly, into `cache_dir`."""
    return tlfeat(
        "extract", "--model", "mobilenet_v2", "--data", root, "--split", "train", "-q", "--cache-dir", cache_dir, *extra
    )


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "TLFEAT_OFFLINE": "1", **(env or {})})
    return time.perf_counter() - t0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def peak_tree_pss(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak PSS in MB of the process and all its descendants), sampled every 20 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TLFEAT_OFFLINE": "1"}
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_pss_kb(p) for p in _tree(proc.pid)))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed")
    return time.perf_counter() - t0, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlfeat-startup")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/startup.json"))
    args = parser.parse_args()
    import extract_speed

    extract_speed.SIZE = (400, 300)
    report: dict[str, object] = {}
    rows = []
    for n in map(int, args.sizes.split(",")):
        root = make_photo_set(args.work / f"photos-{n}", n)
        tutorial = timed([sys.executable, "-c", TUTORIAL, str(root / "train"), str(args.work / "tutorial.npy")])
        warm_cache = args.work / f"warm-{n}"
        shutil.rmtree(warm_cache, ignore_errors=True)
        # Any earlier extraction of the model leaves its export: make it on an 8-image subset (another key).
        timed(extract_train(root, warm_cache, "--limit", "8"))
        warm = timed(extract_train(root, warm_cache))
        hit = timed(extract_train(root, warm_cache))
        cold_cache = args.work / f"cold-{n}"
        shutil.rmtree(cold_cache, ignore_errors=True)
        cold = timed(extract_train(root, cold_cache))
        rows.append((n, tutorial, warm, cold, hit))
        print(
            f"{n} photos: tutorial {tutorial:.2f} s, tlfeat {warm:.2f} s ({tutorial / warm:.2f}x; cold, export included: {cold:.2f} s, {tutorial / cold:.2f}x), cache hit {hit:.2f} s",
            flush=True,
        )
    helps = {" ".join(a): min(timed(tlfeat(*a)) for _ in range(5)) for a in (["--help"], ["extract", "--help"])}
    n = int(args.sizes.split(",")[-1])
    root = args.work / f"photos-{n}"
    memory = {}
    for backend in ("auto", "torch"):
        cache_dir = args.work / f"pss-{backend}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        if backend == "auto":  # the export exists, as after any earlier use of the model
            timed(extract_train(root, cache_dir, "--limit", "8"))
        memory[backend] = peak_tree_pss(extract_train(root, cache_dir, "--backend", backend, "--limit", str(n - 8)))
    print(f"--help: {helps['--help']:.3f} s, extract --help: {helps['extract --help']:.3f} s (best of 5)")
    for backend, (seconds, pss) in memory.items():
        print(f"peak tree PSS, --backend {backend}: {pss:.0f} MB ({seconds:.1f} s)")
    report = {
        "rows": [
            dict(zip(("images", "tutorial_s", "tlfeat_s", "tlfeat_cold_s", "cache_hit_s"), r, strict=True))
            for r in rows
        ],
        "help_s": helps,
        "peak_tree_pss_mb": {k: v[1] for k, v in memory.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
