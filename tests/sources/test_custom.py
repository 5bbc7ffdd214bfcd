"""A user's own module (`custom:MODULE:FUNCTION`): its identity covers the weights make() loads, its
mistakes are one line, its preprocessing contract is checked, its layers are all selectable, and
its prints stay off tlfeat's stdout."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from tlfeat import backbones, weights
from tlfeat.backbones import custom
from tlfeat.errors import TlfeatError

from ..robustness.helpers import assert_one_clear_line, cli, env

# make() loads a checkpoint beside the module: the module's file never changes when the weights do.
CHECKPOINTED = """
from pathlib import Path
import torch
from torch import nn

PREPROCESSING = {"crop_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def make():
    print("loading the checkpoint")  # a user's print: never on tlfeat's stdout
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    net.load_state_dict(torch.load(Path(__file__).with_name("ck.pt"), weights_only=True))
    return net
"""

# Each function gets one thing wrong.
BAD = """
import torch
from torch import nn

PREPROCESSING = {"crop_size": 32, "resize_size": 40, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class Vec(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


class Pair(nn.Module):
    def forward(self, x):
        print("forward ran")
        return x.mean(dim=(2, 3)), x


def raises():
    raise RuntimeError("checkpoint missing")


def vec():
    return Vec()


def pair():
    return Pair(), PREPROCESSING


def number():
    return 42, PREPROCESSING


def misspelt():
    return nn.Conv2d(3, 4, 3), {"crop_size": 32, "resize": 40, "mean": [0.5] * 3, "std": [0.2] * 3}


def own_dict():
    return nn.Conv2d(3, 4, 3), {"crop_size": 48, "mean": [0.1] * 3, "std": [0.2] * 3, "interpolation": "bicubic"}


def model_only():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
"""

SMALL = ["--data", "digits", "--limit", "60", "--split", "train", "-q"]


def save_conv(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).state_dict(), path)


@pytest.fixture
def mods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "bad_net.py").write_text(BAD)
    (folder / "ck_net.py").write_text(CHECKPOINTED)
    (folder / "broken_net.py").write_text("import a_package_that_is_not_there\n")
    save_conv(folder / "ck.pt", 0)
    monkeypatch.syspath_prepend(str(folder))
    for name in ("bad_net", "ck_net", "broken_net"):
        sys.modules.pop(name, None)
    custom._made.cache_clear()
    backbones.resolve.cache_clear()
    yield folder
    custom._made.cache_clear()
    backbones.resolve.cache_clear()


def run(mods: Path, tmp_path: Path, *args: str | Path, **extra: str) -> Any:
    path = os.pathsep.join([str(mods), *filter(None, [os.environ.get("PYTHONPATH")])])
    homes = {"TLFEAT_HOME": str(tmp_path / "home"), "TLFEAT_MODEL_CACHE": str(tmp_path / "models")}
    return cli(*args, env=env(PYTHONPATH=path, **homes, **extra))


def only_features(folder: Path) -> np.ndarray:
    (path,) = folder.glob("*.h5")
    with h5py.File(path) as f:
        return np.asarray(f["features"])


# --------------------------------------------------------------------------- identity: the weights make() loads


def test_a_changed_checkpoint_is_a_new_model_for_onnx_and_feature_caches(mods: Path, tmp_path: Path) -> None:
    """The module's file stays; make() loads other weights: neither the ONNX export (in the one model
    cache) nor a feature file of the old weights may serve them."""
    spec = "custom:ck_net:make"
    first = run(
        mods, tmp_path, "extract", "--model", spec, *SMALL, "--cache-dir", tmp_path / "c1", TLFEAT_BACKEND="onnxruntime"
    )
    assert first.returncode == 0, first.stderr
    save_conv(mods / "ck.pt", 1)
    second = run(
        mods, tmp_path, "extract", "--model", spec, *SMALL, "--cache-dir", tmp_path / "c2", TLFEAT_BACKEND="onnxruntime"
    )
    reference = run(
        mods, tmp_path, "extract", "--model", spec, *SMALL, "--cache-dir", tmp_path / "c3", "--backend", "torch"
    )
    assert second.returncode == 0 and reference.returncode == 0, second.stderr + reference.stderr
    old, new, ref = (only_features(tmp_path / c) for c in ("c1", "c2", "c3"))
    assert np.abs(old - new).max() > 0.01  # the old export would give exactly the old features
    np.testing.assert_allclose(new, ref, rtol=0, atol=1e-5)
    assert len(list((tmp_path / "models" / "onnx").glob("*.onnx"))) == 2  # one export per weights
    # the same folder: the old file is not reused for the new weights either
    again = run(
        mods, tmp_path, "extract", "--model", spec, *SMALL, "--cache-dir", tmp_path / "c1", "--backend", "torch"
    )
    assert again.returncode == 0, again.stderr
    assert len(list((tmp_path / "c1").glob("*.h5"))) == 2


def test_the_weights_id_covers_the_built_state(mods: Path) -> None:
    spec = "custom:ck_net:make"
    before = weights.weights_id(spec)
    assert before.startswith("code:") and "+state:" in before
    save_conv(mods / "ck.pt", 1)
    custom._made.cache_clear()
    after = weights.weights_id(spec)
    assert after.split("+")[0] == before.split("+")[0] and after != before
    save_conv(mods / "ck.pt", 0)
    custom._made.cache_clear()
    assert weights.weights_id(spec) == before  # the same bytes: the same id in another process


def test_state_digest_sees_names_dtypes_shapes_and_bytes() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    base = custom.state_sha256(net)
    assert custom.state_sha256(net) == base
    renamed = nn.Sequential()
    renamed.add_module("first", net[0])
    assert custom.state_sha256(renamed) != base
    assert custom.state_sha256(nn.Sequential(nn.Linear(3, 2)).double()) != base
    with torch.no_grad():
        net[0].bias[0] += 1e-6
    assert custom.state_sha256(net) != base


# --------------------------------------------------------------------------- mistakes in user code: one line, exit 2


@pytest.mark.parametrize(
    ("function", "needles"),
    [
        ("raises", ["custom:bad_net:raises() raised RuntimeError: checkpoint missing"]),
        (
            "vec",
            ["custom:bad_net:vec returned shape (", "for a batch of", "expected (N, D), (N, C, H, W) or (N, L, D)"],
        ),
        ("pair", ["custom:bad_net:pair returned a tuple", "expected (N, D)"]),
        ("number", ["custom:bad_net:number", "first element is not a torch module but int"]),
        (
            "misspelt",
            ["unknown key(s) 'resize'", "valid keys: crop_size, mean, std, resize_size, interpolation, squash"],
        ),
    ],
)
def test_user_code_mistakes_are_one_line(mods: Path, tmp_path: Path, function: str, needles: list[str]) -> None:
    # ONNX Runtime where it can export: a user's mistake must not be taken (and remembered) as "not exportable"
    proc = run(mods, tmp_path, "extract", "--model", f"custom:bad_net:{function}", *SMALL, TLFEAT_BACKEND="auto")
    assert_one_clear_line(proc, *needles)
    remembered = "".join(p.read_text() for p in (tmp_path / "home" / "models").glob("onnx-exports-*.json"))
    assert "bad_net" not in remembered


def test_a_broken_import_is_one_line(mods: Path) -> None:
    with pytest.raises(
        TlfeatError, match="importing broken_net raised ModuleNotFoundError: No module named 'a_package"
    ):
        backbones.resolve("custom:broken_net:make")
    with pytest.raises(TlfeatError, match="cannot import no_such_net; is it on PYTHONPATH"):
        backbones.resolve("custom:no_such_net:make")


def test_a_model_output_of_the_wrong_shape_is_refused_on_torch(mods: Path) -> None:
    for function, needle in [
        ("vec", r"returned shape \(4,\) for a batch of 4"),
        ("pair", "returned a tuple for a batch of 4"),
    ]:
        with pytest.raises(TlfeatError, match=needle):
            features(f"custom:bad_net:{function}", torch.zeros(4, 3, 32, 32))


def test_untrained_suffix_gives_the_right_advice(mods: Path) -> None:
    with pytest.raises(TlfeatError, match="--model custom:bad_net:model_only --untrained"):
        backbones.resolve("custom:bad_net:model_only:untrained")


# --------------------------------------------------------------------------- the preprocessing contract


def test_preprocessing_the_returned_dict_wins_and_a_model_alone_takes_the_modules(mods: Path) -> None:
    own = backbones.preprocessing("custom:bad_net:own_dict", None, None)
    assert (own.crop_size, own.resize_size, own.mean, own.interpolation) == (48, 48, (0.1, 0.1, 0.1), "bicubic")
    module = backbones.preprocessing("custom:bad_net:model_only", None, None)
    assert (module.crop_size, module.resize_size, module.mean) == (32, 40, (0.5, 0.5, 0.5))


def test_a_model_alone_without_preprocessing_is_refused(mods: Path) -> None:
    (mods / "bare_net.py").write_text("from torch import nn\n\ndef make():\n    return nn.Conv2d(3, 4, 3)\n")
    with pytest.raises(TlfeatError, match="returned no preprocessing and its module has no PREPROCESSING dict"):
        backbones.resolve("custom:bare_net:make").info  # noqa: B018


# --------------------------------------------------------------------------- layers, weights files, stdout


def features(spec: str, x: torch.Tensor, layers: Any = None) -> Any:
    model = weights.build_with_weights(spec, weights.resolve(spec))
    with torch.no_grad():
        return backbones.feature_extractor(model, spec, layers)(x)


def test_every_named_module_is_a_layer_and_models_lists_them(mods: Path, tmp_path: Path) -> None:
    spec = "custom:bad_net:model_only"
    assert backbones.resolve(spec).layer_names() == ["0", "1"]  # a Conv2d and a ReLU: leaves only
    x = torch.randn(2, 3, 32, 32)
    conv, penultimate = features(spec, x, ["0", None])
    net = sys.modules["bad_net"].model_only()
    with torch.no_grad():
        torch.testing.assert_close(conv, net[0](x).mean(dim=(2, 3)), rtol=0, atol=1e-6)
        torch.testing.assert_close(penultimate, net(x).mean(dim=(2, 3)), rtol=0, atol=1e-6)
    proc = run(mods, tmp_path, "models", "--layers", "custom:ck_net:make", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["0", "1"]  # make()'s print went to stderr, not into the JSON
    assert "loading the checkpoint" in proc.stderr


def test_forward_prints_go_to_stderr(mods: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TlfeatError):
        features("custom:bad_net:pair", torch.zeros(2, 3, 32, 32))
    out, err = capsys.readouterr()
    assert "forward ran" not in out and "forward ran" in err


def test_a_weights_file_that_does_not_fit_names_the_users_keys(mods: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "0.bias": torch.zeros(5)}, path)
    spec = "custom:bad_net:model_only"
    with pytest.raises(TlfeatError) as info:
        weights.build_with_weights(spec, weights.resolve(spec, weights_file=path))
    text = str(info.value)
    assert "0.weight" in text and "conv.weight" in text and "0.bias (5,) vs (4,)" in text
    assert "base." not in text
