"""Where users feel speed: process start to features on disk, cache hits, --help, and memory.

    .venv/bin/python benchmarks/startup.py                 # 200 and 1000 photos, MobileNetV2, 224 px
    .venv/bin/python benchmarks/startup.py --quick         # 40 photos: checks that it runs

In one run, on the same JPEG photos (400 x 300), each command in a fresh process, wall time from
process start to exit, every `tlfeat extract` into a fresh cache folder:
  - the tutorial loop: torchvision ImageFolder + transforms, batch 4, no workers, torch;
  - `tlfeat extract` (default route: ONNX Runtime) with the model's ONNX export in the model cache
    (any earlier extraction of the model on this machine made it), and with no export on the
    machine (an empty TLFEAT_MODEL_CACHE: the export is made in the run, while decoding starts);
  - `tlfeat extract --backend torch` (what computing the first blocks with torch would run at);
  - `tlfeat extract` a second time (the cache hit), `tlfeat --help`, `tlfeat extract --help`;
  - what the first use costs, piece by piece: a fresh process importing torch and torchvision, and
    `torch.onnx.export` of MobileNetV2 and ResNet-50 (one thread, as tlfeat exports);
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


EXPORT_ONLY = """
import sys, time, torch
from tlfeat import backbones, onnx_backend
from tlfeat.weights import build_with_weights, resolve
name, out = sys.argv[1], sys.argv[2]
extractor = backbones.feature_extractor(build_with_weights(name, resolve(name, untrained=True)), name, [None])
t0 = time.perf_counter()
onnx_backend.export(extractor, __import__("pathlib").Path(out), 224, ["penultimate"], {"model": name})
print(time.perf_counter() - t0)
"""


def first_use_pieces(work: Path) -> dict[str, float]:
    """Seconds: a fresh process importing torch + torchvision; torch.onnx.export alone, per model."""
    pieces = {"spawn_import_torch_torchvision_s": timed([sys.executable, "-c", "import torch, torchvision"])}
    for name in ("mobilenet_v2", "resnet50"):
        out = subprocess.run(
            [sys.executable, "-c", EXPORT_ONLY, name, str(work / f"{name}.onnx")],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "TLFEAT_OFFLINE": "1"},
        )
        pieces[f"export_{name}_s"] = float(out.stdout.split()[-1])
    return pieces


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
    parser.add_argument("--quick", action="store_true", help="40 photos: a smoke test of the script")
    args = parser.parse_args()
    if args.quick:
        args.sizes = "40"
    import extract_speed

    extract_speed.SIZE = (400, 300)
    report: dict[str, object] = {}
    rows = []
    models = args.work / "models"  # this benchmark's model cache, never the user's
    os.environ["TLFEAT_MODEL_CACHE"] = str(models)

    def fresh(name: str) -> Path:
        shutil.rmtree(args.work / name, ignore_errors=True)
        return args.work / name

    for n in map(int, args.sizes.split(",")):
        root = make_photo_set(args.work / f"photos-{n}", n)
        tutorial = timed([sys.executable, "-c", TUTORIAL, str(root / "train"), str(args.work / "tutorial.npy")])
        # No export on the machine: an empty model cache, a fresh cache folder; the export is made in the run.
        shutil.rmtree(models, ignore_errors=True)
        cold = timed(extract_train(root, fresh(f"cold-{n}")))
        # The export in the model cache (the run above made it), a fresh cache folder.
        warm_cache = fresh(f"warm-{n}")
        warm = timed(extract_train(root, warm_cache))
        hit = timed(extract_train(root, warm_cache))
        torch_only = timed(extract_train(root, fresh(f"torch-{n}"), "--backend", "torch"))
        rows.append((n, tutorial, warm, cold, torch_only, hit))
        print(
            f"{n} photos: tutorial {tutorial:.2f} s; tlfeat, export on the machine {warm:.2f} s ({tutorial / warm:.2f}x); "
            f"no export on the machine {cold:.2f} s ({tutorial / cold:.2f}x); --backend torch {torch_only:.2f} s "
            f"({tutorial / torch_only:.2f}x); cache hit {hit:.2f} s",
            flush=True,
        )
    pieces = first_use_pieces(args.work)
    print("first use, piece by piece: " + ", ".join(f"{k} {v:.2f}" for k, v in pieces.items()), flush=True)
    helps = {" ".join(a): min(timed(tlfeat(*a)) for _ in range(5)) for a in (["--help"], ["extract", "--help"])}
    n = int(args.sizes.split(",")[-1])
    root = args.work / f"photos-{n}"
    memory = {}
    for backend in ("auto", "torch"):
        cache_dir = args.work / f"pss-{backend}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        memory[backend] = peak_tree_pss(extract_train(root, cache_dir, "--backend", backend))
    print(f"--help: {helps['--help']:.3f} s, extract --help: {helps['extract --help']:.3f} s (best of 5)")
    for backend, (seconds, pss) in memory.items():
        print(f"peak tree PSS, --backend {backend}: {pss:.0f} MB ({seconds:.1f} s)")
    report = {
        "rows": [
            dict(
                zip(
                    ("images", "tutorial_s", "tlfeat_s", "tlfeat_no_export_s", "torch_s", "cache_hit_s"), r, strict=True
                )
            )
            for r in rows
        ],
        "first_use_pieces": pieces,
        "help_s": helps,
        "peak_tree_pss_mb": {k: v[1] for k, v in memory.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
