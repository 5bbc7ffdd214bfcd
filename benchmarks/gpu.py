"""On a GPU: how far tlfeat gets from the card's ceiling, end to end, in one run (issue 20).

    python3 benchmarks/gpu.py --device cuda --data-dir benchmarks/.carry/data --out OUT   # a lent H200: < 5 min
    .venv/bin/python benchmarks/gpu.py --quick                                           # the smoke test, on the CPU
    .venv/bin/python benchmarks/gpu.py --prepare benchmarks/.carry                       # what to carry to the GPU box

Runs with the torch already installed (no pip; see benchmarks/README.md for the PYTHONPATH recipe).
Photos are made here from the photos the installed packages ship (scikit-learn's china.jpg and
flower.jpg, matplotlib's grace_hopper.jpg): random crops, flips and colour changes of them, 500 x 375
(ImageNet-sized) JPEGs, 10 classes. Rows, each timed in this run on the same photos:

  model alone         ResNet-50 on random input on the device, batch 256, channels_last: fp32 and bf16
  decode_jpeg alone   every photo decoded in batches of 256 (nvJPEG on a GPU) + resized and cropped there
  tutorial loop       ImageFolder + DataLoader (one worker per core but one, pinned) + ResNet-50: inner loop, process
  tlfeat --decode cpu / device / device + bf16: "computed in" and process start to exit (untrained ResNet-50)
  MNIST 70,000        `tlfeat extract --model mobilenet_v2 --data mnist` (train + test), defaults
  fine-tuning epoch   a plain PyTorch loop against `tlfeat finetune` (ResNet-18, one epoch, the same images)
  agreement           cosine of the device-decoded features to the CPU-decoded ones; bf16 to fp32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------- photos


def source_photos() -> list[Path]:
    """Real photos that installed packages ship (present on the lent GPU box too)."""
    import matplotlib
    import sklearn

    found = [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [p for p in found if p.is_file()]


def _make(job: tuple[int, str, str]) -> None:
    import numpy as np
    from PIL import Image, ImageEnhance

    index, source, out = job
    rng = np.random.default_rng(index)
    with Image.open(source) as img:
        img = img.convert("RGB")
        w, h = img.size
        portrait = rng.random() < 0.2
        aspect = 3 / 4 if portrait else 4 / 3
        cw = int(min(w, h * aspect) * rng.uniform(0.5, 1.0))
        ch = int(cw / aspect)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((left, top, left + cw, top + ch)).resize((375, 500) if portrait else (500, 375))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        img.save(out, "JPEG", quality=int(rng.integers(75, 96)))


def make_photos(root: Path, n_train: int, n_test: int, classes: int = 10) -> Path:
    """`root/{train,test}/class_k/NNNNN.jpg`, made in parallel; reused when already there."""
    import multiprocessing

    if (root / "done").is_file():
        return root
    sources = [str(p) for p in source_photos()]
    jobs = []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, n_train)):
        for i in range(n):
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((offset + i, sources[(offset + i) % len(sources)], str(folder / f"{offset + i:06d}.jpg")))
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(_make, jobs, chunksize=64)
    (root / "done").write_text("")
    return root


# --------------------------------------------------------------------------- the rows run in this process


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_alone(device: str, size: int, batch: int, model: str, iters: int) -> dict[str, float]:
    import torch
    import torchvision

    net = getattr(torchvision.models, model)().eval().to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    out = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        if dtype is not None and not device.startswith("cuda"):
            continue
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            for _ in range(3):
                net(x)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                net(x)
            _sync(device)
        out[precision] = iters * batch / (time.perf_counter() - t0)
    return out


def decode_alone(root: Path, device: str, size: int, batch: int) -> float:
    """Every photo's bytes in memory, then decode_jpeg in batches + resize and centre crop on the device."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import center_crop, resize

    warnings.filterwarnings("ignore", message=r"The image decoding")
    files = sorted(root.rglob("*.jpg"))
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    resize_to = int(round(size * 256 / 224))
    for warm in (True, False):
        t0 = time.perf_counter()
        for i in range(0, len(data) if not warm else batch, batch):
            for image in decode_jpeg(data[i : i + batch], mode=ImageReadMode.RGB, device=device):
                center_crop(resize(image[None], [resize_to], antialias=True), [size])
        _sync(device)
    return len(data) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- rows run as their own process

TUTORIAL = (
    f"MEAN, STD = {MEAN}, {STD}\n"
    + """
import sys, time
t0 = time.perf_counter()
import numpy as np, torch, torchvision
from torchvision import datasets, transforms
root, device, size, workers, batch, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
net = getattr(torchvision.models, model)()
net.fc = torch.nn.Identity()
net = net.eval().to(device, memory_format=torch.channels_last)
tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(),
                         transforms.Normalize(MEAN, STD)])
data = torch.utils.data.ConcatDataset([datasets.ImageFolder(f"{root}/{s}", tf) for s in ("train", "test")])
loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, pin_memory=device.startswith("cuda"))
feats = []
t1 = time.perf_counter()
with torch.inference_mode():
    for x, _ in loader:
        feats.append(net(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)).float().cpu())
n = len(torch.cat(feats))
print(f"INNER {n} {time.perf_counter() - t1}")
"""
)

PLAIN_TRAIN = (
    f"MEAN, STD = {MEAN}, {STD}\n"
    + """
import sys, time
import torch, torchvision
from torchvision import datasets, transforms
root, device, size, workers, batch, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                         transforms.Normalize(MEAN, STD)])
data = torch.utils.data.Subset(datasets.ImageFolder(f"{root}/train", tf), range(n))
loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                     pin_memory=device.startswith("cuda"))
model = torchvision.models.resnet18(num_classes=10).to(device, memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
model.train()
t0 = time.perf_counter()
for x, y in loader:
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
float(loss)
print(f"EPOCH {time.perf_counter() - t0}")
"""
)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall time from process start to exit, and what it printed; a failure stops the benchmark."""
    cmd = [str(c) for c in cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr.strip() or proc.stdout.strip())[-300:]}")
    return seconds, proc.stdout


def tlfeat(*args: Any) -> list[str]:
    return [sys.executable, "-m", "tlfeat_cli.main", *map(str, args)]


def computed(stdout: str) -> float:
    """Images per second of the computing part, from extract's `N x D  computed in Xs` lines."""
    rows = [(int(n), float(s)) for n, s in re.findall(r"(\d+) x \d+\s+computed in ([\d.]+)s", stdout)]
    return sum(n for n, _ in rows) / max(sum(s for _, s in rows), 1e-9)


def cached_features(cache_dir: Path) -> dict[str, Any]:
    from tlfeat import cache

    return {fs.meta["split"]: fs for fs in (cache.read(p) for p in sorted(cache_dir.rglob("*.h5")))}


def cosines(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    import numpy as np

    out = []
    for split in a:
        x, y = a[split], b[split]
        assert x.ids == y.ids
        out.append((x.X * y.X).sum(1) / np.linalg.norm(x.X, axis=1) / np.linalg.norm(y.X, axis=1))
    values = np.concatenate(out)
    return float(values.min()), float(np.median(values))


# --------------------------------------------------------------------------- the benchmark


def prepare(carry: Path) -> None:
    """MNIST as IDX files and MobileNetV2's weights file, under `carry`, for a machine without either."""
    import gzip

    import numpy as np

    from tlfeat import config, datasets, weights

    raw = carry / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = datasets.load_split("mnist", split, config.default_data_dir())
        pixels = np.asarray(images.arrays, dtype=np.uint8)
        header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in pixels.shape)
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes(), 6))
        labels = images.labels.astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.tobytes(), 6)
        )
    resolved = weights.resolve("mobilenet_v2")
    hub = carry / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    assert resolved.path is not None
    (hub / resolved.path.name).write_bytes(resolved.path.read_bytes())
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    print(
        f"wrote {carry} ({size / 1e6:.1f} MB): carry it, with TORCH_HOME={carry / 'torch'} --data-dir {carry / 'data'}"
    )


class Bench:
    """The rows, each section in its own guard: a failed one is a row saying so, and the rest still run.
    The table is rewritten after every row, so a run cut short keeps what it measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args, self.cores = args, os.cpu_count() or 1
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.startswith("cuda")
        quick = args.quick
        self.size, self.batch = (64, 16) if quick else (224, 256)
        self.n_train, self.n_test = (48, 16) if quick else (args.photos * 5 // 6, args.photos - args.photos * 5 // 6)
        self.model = "resnet18" if quick else "resnet50"
        self.env = {**os.environ, "TLFEAT_OFFLINE": "1", "TLFEAT_BACKEND": "torch"}
        self.rows: list[tuple[str, str, str]] = []
        self.results: dict[str, Any] = {"device": self.device, "quick": quick, "cores": self.cores}
        self.results.update(torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        if self.cuda:
            self.results.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.t0 = time.perf_counter()
        self.photos = Path()

    def row(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"{what:<66} {value:>16}  {note}", flush=True)
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        self.results.update(table=self.rows, total_seconds=time.perf_counter() - self.t0)
        (out / f"gpu-{self.stamp}.json").write_text(json.dumps(self.results, indent=1, default=str))
        lines = ["| what | images/s (or time) | note |", "|---|---:|---|"] + [
            f"| {a} | {b} | {c} |" for a, b, c in self.rows
        ]
        (out / f"gpu-{self.stamp}.md").write_text("\n".join(lines) + "\n")

    def section(self, name: str, fn: Any) -> None:
        if name in self.args.skip.split(","):
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failed row must not cost the others on a lent GPU
            self.row(f"{name}: FAILED", type(exc).__name__, str(exc).strip().splitlines()[-1][:300] if str(exc) else "")

    def setup(self) -> None:
        t0 = time.perf_counter()
        self.photos = make_photos(self.args.work / f"photos-{self.n_train}", self.n_train, self.n_test)
        self.row(
            "setup: photos made (500 x 375 JPEGs)", f"{self.n_train + self.n_test}", f"{time.perf_counter() - t0:.1f} s"
        )
        start, _ = run(
            [sys.executable, "-c", f"import torch; torch.zeros(1, device={self.device!r}).sum().item()"], self.env
        )
        self.results["torch_start"] = start
        self.row(
            f"process start: import torch, first tensor on {self.device}", f"{start:.1f} s", "in every process row"
        )

    def ceilings(self) -> None:
        alone = model_alone(self.device, self.size, self.batch, self.model, 3 if self.args.quick else 20)
        self.results["model_alone"] = alone
        what = f"{self.model} alone, random input, batch {self.batch}, channels_last: " + " / ".join(alone)
        self.row(what, " / ".join(f"{v:,.0f}" for v in alone.values()))
        self.results["decode_alone"] = decode_alone(self.photos, self.device, self.size, self.batch)
        self.row(
            f"decode_jpeg on {self.device} (batches of {self.batch}) + resize + crop",
            f"{self.results['decode_alone']:,.0f}",
        )

    def tutorial(self) -> None:
        script = self.args.work / "tutorial.py"
        script.write_text(TUTORIAL)
        workers = max(1, self.cores - 1)
        secs, out = run(
            [sys.executable, script, self.photos, self.device, self.size, workers, self.batch, self.model], self.env
        )
        n, inner = out.split("INNER ")[1].split()
        self.results["tutorial"] = {"inner": int(n) / float(inner), "process": int(n) / secs, "seconds": secs}
        self.row(f"tutorial loop (ImageFolder, {workers} workers, batch {self.batch}, pinned): inner / process",
                 f"{self.results['tutorial']['inner']:,.0f} / {self.results['tutorial']['process']:,.0f}", f"{secs:.1f} s")  # fmt: skip

    def extract(self) -> None:
        import torch

        runs = {"cpu": ["--decode", "cpu"], "device": ["--decode", "device"]}
        if self.cuda:
            runs["device --precision bf16"] = ["--decode", "device", "--precision", "bf16"]
        if self.cuda and torch.cuda.device_count() > 1:
            every = ",".join(str(i) for i in range(torch.cuda.device_count()))
            runs[f"device --device cuda:{every}"] = ["--decode", "device", "--device", f"cuda:{every}"]
        n_all = self.n_train + self.n_test
        caches = {}
        for name, extra in runs.items():
            cache = self.args.work / f"cache-{len(caches)}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            cmd = tlfeat("extract", "--model", self.model, "--untrained", "--data", self.photos, "--device", self.device,
                         "--backend", "torch", "--image-size", self.size, "--cache-dir", cache, "-q", *extra)  # fmt: skip
            secs, out = run(cmd, self.env)
            self.results[f"tlfeat --decode {name}"] = {
                "computed": computed(out),
                "process": n_all / secs,
                "seconds": secs,
            }
            self.row(f"tlfeat extract --decode {name} (defaults): computed / process",
                     f"{computed(out):,.0f} / {n_all / secs:,.0f}", f"{secs:.1f} s")  # fmt: skip
            caches[name] = cached_features(cache)
        low, mid = cosines(caches["cpu"], caches["device"])
        self.results["agreement_device_vs_cpu"] = {"min": low, "median": mid}
        self.row("agreement: cosine of --decode device to --decode cpu, min / median", f"{low:.6f} / {mid:.6f}")
        if "device --precision bf16" in caches:
            low, mid = cosines(caches["device"], caches["device --precision bf16"])
            self.results["agreement_bf16_vs_fp32"] = {"min": low, "median": mid}
            self.row("agreement: cosine of bf16 to fp32, min / median", f"{low:.6f} / {mid:.6f}")
        if "tutorial" in self.results:
            ratio = self.results["tlfeat --decode device"]["process"] / self.results["tutorial"]["process"]
            self.row("tlfeat --decode device against the tutorial loop, process to process", f"{ratio:.2f}x")

    def mnist(self) -> None:
        cache = self.args.work / "cache-mnist"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        limits = ["--limit", "500", "--test-limit", "100", "--image-size", self.size] if self.args.quick else []
        data_dir = ["--data-dir", self.args.data_dir] if self.args.data_dir else []
        found = "idx files" if self.args.data_dir and (self.args.data_dir / "MNIST" / "raw").is_dir() else "registry"
        secs, out = run(tlfeat("extract", "--model", "mobilenet_v2", "--data", "mnist", "--device", self.device,
                               "--backend", "torch", "--cache-dir", cache, "-q", *data_dir, *limits), self.env)  # fmt: skip
        n = 600 if self.args.quick else 70_000
        self.results["mnist"] = {"computed": computed(out), "process": n / secs, "seconds": secs}
        self.row(f"MNIST {n:,} (mobilenet_v2, {found}, defaults): computed / process",
                 f"{computed(out):,.0f} / {n / secs:,.0f}", f"{secs:.1f} s")  # fmt: skip

    def finetune(self) -> None:
        limit, batch = (32, 8) if self.args.quick else (5000, 256)
        n_train = 0
        for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16"])):
            if name == "bf16" and not self.cuda:
                continue
            results_dir = self.args.work / f"finetune-{name}"
            subprocess.run(["rm", "-rf", str(results_dir)], check=True)
            secs, out = run(tlfeat("finetune", "--model", "resnet18", "--data", self.photos, "--strategy", "full",
                                   "--untrained", "--optimizer", "sgd", "--epochs", 1, "--batch-size", batch, "--limit", limit,
                                   "--test-limit", limit // 5, "--image-size", self.size, "--device", self.device,
                                   "--results-dir", results_dir, "--quiet", "--json", *extra), self.env)  # fmt: skip
            record = json.loads(out)
            epoch, n_train = record["details"]["history"][0], record["n_train"]
            self.results[f"finetune {name}"] = {"epoch": epoch["train_seconds"], "process": secs}
            self.row(f"tlfeat finetune ResNet-18, 1 epoch, {n_train} photos, {name}, augment on {record['params']['augment_on']}",
                     f"{epoch['train_seconds']:.1f} s", f"process {secs:.1f} s")  # fmt: skip
        script = self.args.work / "plain_train.py"
        script.write_text(PLAIN_TRAIN)
        workers = max(1, self.cores - 1)
        secs, out = run(
            [sys.executable, script, self.photos, self.device, self.size, workers, batch, n_train], self.env
        )
        plain = float(out.split("EPOCH ")[1])
        self.results["finetune plain loop"] = {"epoch": plain, "process": secs}
        self.row(f"plain PyTorch loop, the same epoch (augmented in {workers} workers, fp32)",
                 f"{plain:.1f} s", f"process {secs:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test on the CPU")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tlfeat-gpu-bench"), help="photos and caches")
    parser.add_argument("--data-dir", type=Path, default=None, help="where MNIST is (MNIST/raw/*.gz)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="the table and JSON go here")
    parser.add_argument("--prepare", type=Path, default=None, help="write MNIST + MobileNetV2 weights to carry")
    parser.add_argument("--photos", type=int, default=12_000, help="photos to make (5/6 train, 1/6 test)")
    parser.add_argument("--skip", default="", help="comma-separated sections: ceilings,tutorial,extract,mnist,finetune")
    args = parser.parse_args()
    if args.prepare is not None:
        prepare(args.prepare)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    bench.setup()
    for name in ("ceilings", "tutorial", "extract", "mnist", "finetune"):
        bench.section(name, getattr(bench, name))
    print(
        f"\n{len(bench.rows)} rows in {time.perf_counter() - bench.t0:.0f} s; table in {args.out}/gpu-{bench.stamp}.md"
    )


if __name__ == "__main__":
    main()
