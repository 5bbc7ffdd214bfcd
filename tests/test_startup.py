"""No torch where none is needed: cache hits, ls, results, report, --help and ONNX Runtime extraction
with the export in place run with torch and torchvision made unimportable; and every path still
works where ONNX Runtime is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tlfeat import cache, catalog

from .conftest import make_tree
from .robustness.helpers import env

# Runs `tlfeat ARGS` with the named modules unimportable (as if not installed), then checks none was loaded.
BLOCKING = """
import sys
blocked = sys.argv[1].split(",")
class Blocker:  # `import torch` fails as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked and name.split(".")[0] not in ("onnx", "onnxruntime"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None
sys.meta_path.insert(0, Blocker())
for name in ("onnx", "onnxruntime"):
    if name in blocked:  # torch itself asks find_spec("onnx"): None is what a missing package answers
        sys.modules[name] = None
from tlfeat_cli.main import cli
try:
    cli(sys.argv[2:], prog_name="tlfeat")
finally:
    loaded = [m for m in blocked if sys.modules.get(m) is not None]
    if loaded:
        print("LOADED", loaded, file=sys.stderr)
"""


def run_without(blocked: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKING, blocked, *map(str, args)],
        capture_output=True,
        text=True,
        env=env(TLFEAT_BACKEND="auto"),
        timeout=600,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("startup")
    tree = make_tree(root / "tree", per_class=6)
    first = subprocess.run(
        [sys.executable, "-m", "tlfeat_cli.main", "extract", "--model", "mobilenet_v2", "--data", str(tree), "--image-size", "64", "-q", "--cache-dir", str(root / "cache")],
        capture_output=True, text=True, env=env(TLFEAT_BACKEND="auto"),
    )  # fmt: skip
    assert first.returncode == 0 and "[onnxruntime]" in first.stdout, first.stderr
    return {"root": root, "tree": tree, "cache": root / "cache"}


def test_cache_hit_ls_and_help_import_no_torch(made: dict[str, Path]) -> None:
    hit = run_without(
        "torch,torchvision",
        "extract",
        "--model",
        "mobilenet_v2",
        "--data",
        made["tree"],
        "--image-size",
        "64",
        "-q",
        "--cache-dir",
        made["cache"],
    )
    assert hit.returncode == 0 and hit.stdout.count("cached, no work done") == 2, hit.stderr
    listing = run_without("torch,torchvision", "ls", "--cache-dir", made["cache"])
    assert listing.returncode == 0 and listing.stdout.count(" ok ") == 2, listing.stdout + listing.stderr
    for args in (["--help"], ["extract", "--help"], ["fit", "--help"]):
        helped = run_without("torch,torchvision,numpy,h5py", *args)
        assert helped.returncode == 0 and "Usage:" in helped.stdout, helped.stderr


def test_onnx_extraction_with_the_export_in_place_imports_no_torch(made: dict[str, Path]) -> None:
    """A new dataset (and a new limit): decoding, preprocessing and inference without torch, same numbers."""
    args = ["extract", "--model", "mobilenet_v2", "--data", made["tree"], "--image-size", "64", "-q", "--limit", "9"]
    free = run_without("torch,torchvision", *args, "--cache-dir", made["cache"])
    assert free.returncode == 0 and "computed" in free.stdout and "LOADED" not in free.stderr, free.stderr
    fit = run_without(
        "torch,torchvision",
        "fit",
        "--clf",
        "logreg",
        "--C",
        "1",
        "--cache-dir",
        made["cache"],
        "--results-dir",
        made["root"] / "results",
    )
    assert fit.returncode == 0 and "LOADED" not in fit.stderr, fit.stderr
    for cmd in (["results", "--results-dir", made["root"] / "results"],):
        out = run_without("torch,torchvision", *cmd)
        assert out.returncode == 0 and "LOADED" not in out.stderr, out.stderr
    # The same features as an extraction that may use torch (a fresh cache, the export made again).
    with_torch = subprocess.run(
        [sys.executable, "-m", "tlfeat_cli.main", *map(str, args), "--cache-dir", str(made["root"] / "other")],
        capture_output=True,
        text=True,
        env=env(TLFEAT_BACKEND="auto"),
    )
    assert with_torch.returncode == 0, with_torch.stderr
    for split in ("train", "test"):
        a = [
            cache.read(e.path)
            for e in catalog.scan(made["cache"])
            if e.attrs["split"] == split and e.attrs["limit"] == (9 if split == "train" else 0)
        ]
        b = [cache.read(e.path) for e in catalog.scan(made["root"] / "other") if e.attrs["split"] == split]
        assert np.array_equal(a[0].X, b[0].X) and a[0].ids == b[0].ids


def test_everything_works_without_onnx_runtime(made: dict[str, Path]) -> None:
    cache_dir = made["root"] / "no-ort"
    args = [
        "extract",
        "--model",
        "resnet18",
        "--untrained",
        "--data",
        made["tree"],
        "--image-size",
        "32",
        "-q",
        "--cache-dir",
        cache_dir,
    ]
    out = run_without("onnxruntime,onnx", *args)
    assert out.returncode == 0 and "[torch]" in out.stdout and "LOADED" not in out.stderr, out.stderr
    fit = run_without(
        "onnxruntime,onnx", "fit", "--C", "1", "--cache-dir", cache_dir, "--results-dir", made["root"] / "r2"
    )
    assert fit.returncode == 0, fit.stderr
    asked = run_without("onnxruntime,onnx", *args, "--backend", "onnxruntime")
    assert asked.returncode == 2 and "needs the onnxruntime and onnx packages" in asked.stderr


def test_decoding_workers_import_only_numpy_and_pil(tmp_path: Path) -> None:
    """A worker that has decoded a batch (JPEG, PNG, 16-bit, RGBA) has imported no third-party module but
    numpy and PIL (besides what every Python start here loads: site-packages' .pth hooks)."""
    from tlfeat.backbones import preprocessing
    from tlfeat.pool import DecodePool

    tree = make_tree(tmp_path / "tree", per_class=4)
    items = [("path", str(p)) for p in sorted((tree / "train").rglob("*.*"))]
    loaded_by = "sorted({n.split('.')[0] for n, m in __import__('sys').modules.items() if 'site-packages' in str(getattr(m, '__file__', None))})"
    with DecodePool(preprocessing("mobilenet_v2", None, 32), workers=1, skip=False) as pool:
        [decoded] = list(pool.map([items]))
        third_party = pool._pool.submit(eval, loaded_by).result()
    at_start = subprocess.run([sys.executable, "-c", f"print({loaded_by})"], capture_output=True, text=True, env=env())
    assert decoded.crops.shape == (12, 3, 32, 32) and decoded.crops.any()
    assert set(third_party) - set(eval(at_start.stdout)) == {"numpy", "PIL"}, (third_party, at_start.stdout)
