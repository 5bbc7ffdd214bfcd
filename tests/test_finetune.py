from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tlfeat import backbones, strategies
from tlfeat.errors import TlfeatError
from tlfeat.finetune import FinetuneConfig, finetune, finetune_one
from tlfeat.weights import build_with_weights, resolve
from tlfeat_cli.main import cli

from .conftest import make_tree


def _model(name: str = "resnet18"):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = backbones.build(name)
    strategies.replace_head(model, name, 3)
    return model


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("name", "n_blocks"),
    [("resnet50", 5), ("vgg16", 6), ("alexnet", 4), ("densenet121", 5), ("mobilenet_v2", 19), ("efficientnet_b0", 9)],
)
def test_blocks_follow_the_architecture(name: str, n_blocks: int) -> None:
    assert len(strategies.blocks(backbones.build(name, device="meta"), name)) == n_blocks


def test_head_strategy_trains_only_the_new_head() -> None:
    model = _model()
    groups = strategies.apply(model, "resnet18", strategies.parse("head"), lr=0.01)
    assert _trainable(model) == {"fc.weight", "fc.bias"}
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 0.01)]
    assert model.fc.out_features == 3


def test_freeze_k_freezes_the_first_k_blocks() -> None:
    model = _model()
    strategies.apply(model, "resnet18", strategies.parse("freeze:2"), lr=0.01)
    trainable = _trainable(model)
    assert not any(n.startswith(("conv1", "bn1", "layer1.")) for n in trainable)
    assert {"layer2.0.conv1.weight", "layer4.1.bn2.bias", "fc.weight"} <= trainable
    for k in (0, 5):
        m = _model()
        strategies.apply(m, "resnet18", strategies.parse(f"freeze:{k}"), lr=0.01)
        assert len(_trainable(m)) == (len(list(m.parameters())) if k == 0 else 2)
    with pytest.raises(TlfeatError, match="more than the 5 blocks of resnet18"):
        strategies.apply(_model(), "resnet18", strategies.parse("freeze:6"), lr=0.01)


def test_frozen_batchnorm_stays_in_eval_mode() -> None:
    model = _model()
    strategies.apply(model, "resnet18", strategies.parse("freeze:2"), lr=0.01)
    model.train()
    strategies.freeze_batchnorm_stats(model)
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training


def test_discriminative_rates_rise_geometrically_to_the_head() -> None:
    model = _model()
    groups = strategies.apply(model, "resnet18", strategies.parse("discriminative"), lr=1e-3)
    lrs = [g["lr"] for g in groups]
    assert [g["name"] for g in groups] == ["block0", "block1", "block2", "block3", "block4", "head"]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == 1e-3
    assert all(a < b for a, b in zip(lrs, lrs[1:], strict=False))
    assert np.allclose(np.diff(np.log(lrs)), np.log(100) / 5)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_optimizer_groups_match_the_record(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", per_class=6)
    [res] = finetune(
        FinetuneConfig(
            model="resnet18",
            data=str(tree),
            strategy="discriminative:0.1",
            epochs=1,
            image_size=32,
            workers=0,
            batch_size=8,
            weights_file=_resnet_weights(tmp_path),
            results_dir=tmp_path / "r",
            progress=False,
        )
    )
    rec = res.record.details
    assert rec["param_group_lrs"]["head"] == 1e-3
    assert rec["param_group_lrs"]["block0"] == pytest.approx(1e-4)
    assert rec["trainable_params"] == rec["total_params"] == 11178051


def _resnet_weights(tmp_path: Path) -> Path:
    """A stand-in 'pretrained' ResNet-18 file (no real ResNet weights are available offline)."""
    path = tmp_path / "resnet18_seed7.pt"
    if not path.exists():
        torch.manual_seed(7)
        import torchvision

        torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real epoch of MobileNetV2 (ImageNet weights) with the head strategy on a tiny tree."""
    root = tmp_path_factory.mktemp("ft")
    tree = make_tree(root / "tree", per_class=6)
    cfg = FinetuneConfig(
        model="mobilenet_v2",
        data=str(tree),
        strategy="head",
        epochs=1,
        image_size=64,
        workers=0,
        batch_size=8,
        results_dir=root / "results",
        progress=False,
    )
    return cfg, finetune_one(cfg)


def test_one_epoch_writes_history_plot_and_checkpoints(head_run) -> None:  # type: ignore[no-untyped-def]
    cfg, res = head_run
    rec, folder = res.record, res.path.parent
    assert rec.kind == "finetune" and rec.method == "finetune:head"
    assert rec.details["trainable_params"] == 1280 * 3 + 3
    assert set(rec.metrics) >= {"accuracy", "balanced_accuracy", "roc_auc", "confusion_matrix", "accuracy_ci95"}
    assert rec.params["augment"] == "standard" and rec.params["optimizer"] == "adam"  # the transfer recipe
    [epoch] = json.loads((folder / "history.json").read_text())
    assert set(epoch) >= {"train_loss", "val_loss", "val_accuracy", "val_roc_auc", "epoch_seconds"}
    with Image.open(folder / "history.png") as img:
        assert img.size[0] > 500 and img.size[1] > 300
    assert torch.load(folder / "best.pt", weights_only=True)["model_name"] == "mobilenet_v2"
    assert not (folder / "last.pt").exists() and rec.details["checkpoints"] == {"best": "best.pt", "last": None}
    again = finetune_one(cfg)
    assert again.reused and again.record.to_json() == rec.to_json()


def test_resume_continues_from_the_saved_epoch(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", per_class=6)
    base = dict(
        model="resnet18",
        data=str(tree),
        strategy="full",
        image_size=32,
        workers=0,
        batch_size=8,
        weights_file=_resnet_weights(tmp_path),
        results_dir=tmp_path / "r",
        progress=False,
    )
    one = finetune_one(FinetuneConfig(epochs=1, keep_last=True, **base))  # type: ignore[arg-type]
    assert (one.path.parent / "last.pt").is_file() and one.record.details["checkpoints"]["last"] == "last.pt"
    # Make the 1-epoch run look interrupted in a 3-epoch configuration: same folder layout.
    cfg3 = FinetuneConfig(epochs=3, **base)  # type: ignore[arg-type]
    from tlfeat.finetune import run_dir

    folder3, _ = run_dir(cfg3)
    folder3.mkdir(parents=True)
    for name in ("last.pt", "best.pt", "history.json"):
        (folder3 / name).write_bytes((one.path.parent / name).read_bytes())
    with pytest.raises(TlfeatError, match="add --resume"):
        finetune_one(cfg3)
    resumed = finetune_one(FinetuneConfig(epochs=3, resume=True, **base))  # type: ignore[arg-type]
    history = resumed.record.details["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0] == one.record.details["history"][0]  # epoch 1 was not run again


def test_resume_from_another_models_checkpoint_is_refused(tmp_path: Path, head_run) -> None:  # type: ignore[no-untyped-def]
    _, res = head_run
    from tlfeat.training import load_checkpoint

    with pytest.raises(TlfeatError, match="checkpoint of 'mobilenet_v2', not 'resnet18'"):
        load_checkpoint(res.path.parent / "best.pt", "resnet18")


def test_scratch_starts_from_other_weights_than_pretrained() -> None:
    pretrained = build_with_weights("mobilenet_v2", resolve("mobilenet_v2"))
    scratch = build_with_weights("mobilenet_v2", resolve("mobilenet_v2", untrained=True, seed=0))
    w_pre, w_scr = pretrained.features[0][0].weight, scratch.features[0][0].weight
    assert w_pre.shape == w_scr.shape and not torch.allclose(w_pre, w_scr)


def test_fine_tuned_checkpoint_feeds_extract(head_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Multi-stage transfer: best.pt of a fine-tune is a --weights file for extract."""
    from tlfeat import ExtractConfig, extract

    cfg, res = head_run
    [train] = extract(
        ExtractConfig(
            model="mobilenet_v2",
            data=cfg.data,
            splits=("train",),
            image_size=64,
            workers=0,
            weights_file=res.path.parent / "best.pt",
            cache_dir=tmp_path,
            progress=False,
        )
    )
    assert train.X.shape == (18, 1280) and train.meta["weights_id"].startswith("file:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "freeze"], "unknown strategy 'freeze'"),
        (["--strategy", "freeze:99"], "more than the 5 blocks of resnet18"),
        (["--optimizer", "rmsprop"], "--optimizer must be one of adam, sgd, got 'rmsprop'"),
        (["--epochs", "0"], "--epochs must be an integer between 1 and 10000, got 0"),
        (["--augment", "mirror"], "--augment must be one of auto, none, flip, crop, standard"),
    ],
)
def test_finetune_cli_errors(tmp_path: Path, args: list[str], message: str) -> None:
    tree = make_tree(tmp_path / "t", per_class=2)
    result = CliRunner().invoke(
        cli, ["finetune", "--model", "resnet18", "--data", str(tree), *args, "--results-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_one_class_and_undecodable_image(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one", per_class=4, classes=("only",))
    with pytest.raises(TlfeatError, match="one class only"):
        finetune_one(
            FinetuneConfig(
                model="resnet18",
                data=str(one),
                strategy="scratch",
                epochs=1,
                image_size=32,
                workers=0,
                results_dir=tmp_path / "r",
                progress=False,
            )
        )
    tree = make_tree(tmp_path / "t", per_class=4)
    (tree / "train" / "ants" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            "--model",
            "resnet18",
            "--data",
            str(tree),
            "--strategy",
            "scratch",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--workers",
            "1",
            "-q",
            "--batch-size",
            "4",
            "--results-dir",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2 and "cannot decode image" in result.output and "zz_broken.png" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_cli_json_and_repeats(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", per_class=6)
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            "--model",
            "resnet18",
            "--data",
            str(tree),
            "--strategy",
            "scratch",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--workers",
            "0",
            "-q",
            "--repeats",
            "2",
            "--json",
            "--keep-last",
            "--results-dir",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["seed"] for r in payload["runs"]] == [0, 1]
    assert len(list((tmp_path / "r").glob("finetunes/*/last.pt"))) == 2  # --keep-last
    assert payload["summary"]["runs"] == 2 and "accuracy_std" in payload["summary"]
    assert payload["runs"][0]["pretrained"] is False and payload["runs"][0]["method"] == "scratch"
