"""Another torchvision than the shipped model table's: a command reads only the models it names, once."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from ..robustness.helpers import env

# Put first on the child's PYTHONPATH: torchvision reports another version, and every model that
# torchvision's registry constructs is written to $COUNT_FILE.
SITECUSTOMIZE = """
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys

_version = importlib.metadata.version


def version(name):
    return os.environ["FAKE_TORCHVISION"] if name == "torchvision" else _version(name)


importlib.metadata.version = version


def _count(name, builder):
    @functools.wraps(builder)  # list_models() filters builders by their module
    def counted(*args, **kwargs):
        with open(os.environ["COUNT_FILE"], "a") as fh:
            fh.write(name + "\\n")
        return builder(*args, **kwargs)

    return counted


class _AfterTorchvisionModels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision.models":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from torchvision.models import _api

            for key, builder in list(_api.BUILTIN_MODELS.items()):
                _api.BUILTIN_MODELS[key] = _count(key, builder)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterTorchvisionModels())
"""


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
def test_another_torchvision_reads_only_the_named_model_once(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    counts = tmp_path / "constructed.txt"
    counts.touch()
    environment = env(
        PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        FAKE_TORCHVISION="0.26.0",
        COUNT_FILE=str(counts),
        TLFEAT_HOME=str(tmp_path / "home"),
    )
    args = ["extract", "--model", "resnet18", "--untrained", "--data", "digits", "--limit", "30", "--test-limit", "20",
            "--image-size", "32", "-q", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip

    def tlfeat(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tlfeat_cli.main", *argv],
            capture_output=True,
            text=True,
            env=environment,
            timeout=600,
        )

    first = tlfeat(*args)
    assert first.returncode == 0 and first.stdout.count("computed") == 2, first.stderr[-2000:]
    built = counts.read_text().split()
    assert built and set(built) == {"resnet18"}, built  # no other model constructed to read the table
    store = json.loads((tmp_path / "home" / "models" / "torchvision-0.26.0.json").read_text())
    assert list(store["info"]) == ["resnet18"] and "resnet18" in store["names"]["all"]

    counts.write_text("")
    before = child_cpu()
    hit = tlfeat(*args)
    spent = child_cpu() - before  # CPU time, not wall time: a busy machine cannot make this fail
    assert hit.returncode == 0 and hit.stdout.count("cached, no work done") == 2, hit.stderr
    assert counts.read_text() == "", counts.read_text()
    assert spent < 1.0, f"a cache hit with another torchvision took {spent:.2f} s of CPU"

    listed = tlfeat("models", "--filter", "resnet18")
    assert listed.returncode == 0 and "resnet18 " in listed.stdout, listed.stderr
    assert "torchvision 0.26.0 (the snapshot is of" in listed.stdout and str(tmp_path / "home") in listed.stdout
    assert set(counts.read_text().split()) <= {"resnet18"}
