"""Bad arguments, and what only a download could bring on a machine without network, are refused in one
line before torch, torchvision, scikit-learn or h5py is imported (that import was most of the 5-19 s a
refusal took). The child runs with those modules unimportable and every connection failing, as on a
machine with no network, and reports any of them that got loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .robustness.helpers import assert_one_clear_line

HEAVY = ("torch", "torchvision", "sklearn", "h5py")
CHILD = """
import socket, sys
heavy = sys.argv[1].split(",")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in heavy:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None
sys.meta_path.insert(0, Blocker())
def no_network(*args, **kwargs):
    raise OSError(101, "Network is unreachable (blocked for this test)")
socket.getaddrinfo = socket.create_connection = no_network
from tlfeat_cli.main import cli
try:
    cli(sys.argv[2:], prog_name="tlfeat")
finally:
    loaded = [m for m in heavy if sys.modules.get(m) is not None]
    if loaded:
        print("LOADED", loaded, file=sys.stderr)
"""

CASES = {
    "unknown classifier": (["fit", "--clf", "foo"], ["--clf must be one of logreg, svm, linear"]),
    "kernel of another classifier": (["fit", "--clf", "logreg", "--kernel", "rbf"], ["--kernel rbf does not apply to --clf logreg"]),
    "weights only a download brings": (
        ["extract", "--model", "resnet50", "--data", "digits"],
        ["no weights for resnet50", "unreachable", "--weights FILE"],
    ),
    "weights only a download brings, torch backend": (
        ["extract", "--model", "resnet50", "--data", "digits", "--backend", "torch"],
        ["no weights for resnet50"],
    ),
    "dataset only a download brings": (
        ["extract", "--model", "mobilenet_v2", "--data", "cifar10"],
        ["cifar10 train not found"],
    ),
    "unknown strategy": (["finetune", "--model", "resnet18", "--data", "digits", "--strategy", "bogus"], ["bogus"]),
    "unknown model in a comparison": (["compare", "--models", "foo", "--data", "digits"], ["unknown model 'foo'"]),
    "image size out of bounds": (["extract", "--model", "mobilenet_v2", "--data", "digits", "--image-size", "5"], ["--image-size"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_any_heavy_import(case: str, tmp_path: Path) -> None:
    args, needles = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != "TLFEAT_OFFLINE"}  # offline only by its network
    env.update(TLFEAT_DATA_DIR=str(tmp_path / "data"), TLFEAT_CACHE_DIR=str(tmp_path / "cache"))
    env.update(TORCH_HOME=str(tmp_path / "torch"), TLFEAT_RESULTS_DIR=str(tmp_path / "results"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(HEAVY), *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert "LOADED" not in proc.stderr, proc.stderr
    assert_one_clear_line(proc, *needles)
