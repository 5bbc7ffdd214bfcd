from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tlfeat_cli.main import cli

from .conftest import absent_cuda


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize(
    "command",
    [[], ["models"], ["datasets"], ["extract"], ["ls"], ["fit"], ["finetune"], ["compare"], ["report"], ["results"]],
)
def test_help_reads(runner: CliRunner, command: list[str]) -> None:
    result = runner.invoke(cli, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_extract_then_ls(runner: CliRunner, tree: Path, tmp_path: Path) -> None:
    args = [
        "extract",
        "--model",
        "resnet18",
        "--data",
        str(tree),
        "--untrained",
        "--image-size",
        "64",
        "--workers",
        "0",
        "-q",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "train: 12 x 512  computed" in first.output and "UNTRAINED" in first.output
    second = runner.invoke(cli, args)
    assert second.output.count("cached, no work done") == 2

    listing = runner.invoke(cli, ["ls", "--cache-dir", str(tmp_path / "c")])
    assert listing.exit_code == 0
    assert "resnet18" in listing.output and "bugs" in listing.output and "(UNTRAINED)" in listing.output


def test_models_lists_dims_and_local_weights(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["models"])
    assert result.exit_code == 0
    line = next(row for row in result.output.splitlines() if row.startswith("mobilenet_v2 "))
    assert "1280" in line and ("hub-cache" in line or "registry" in line)
    assert "resnet50            2048" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "--model", "resnet5", "--data", "digits"], "unknown model 'resnet5'"),
        (["extract", "--model", "resnet18", "--data", "nowhere/at/all"], "unknown dataset 'nowhere/at/all'"),
        (
            ["extract", "--model", "resnet18", "--data", "digits", "--limit", "-3"],
            "--limit must be an integer between 1",
        ),
        (["extract", "--model", "resnet18", "--data", ""], "--data must be a non-empty name"),
        (
            ["extract", "--model", "resnet18", "--data", "digits", "--device", "bogus"],
            "--device must be cpu, cuda, cuda:N or mps",
        ),
        (
            ["extract", "--model", "resnet18", "--data", "digits", "--batch-size", "0"],
            "--batch-size must be an integer between 1 and 65536",
        ),
        (
            ["extract", "--model", "resnet18", "--untrained", "--data", "digits", "--precision", "bf16"],
            "--precision bf16 is for GPUs",
        ),
        (["extract", "--model", "resnet18", "--data", "digits", "--split", "val"], "has no split 'val'"),
        (["extract", "--model", "resnet18", "--data", "digits", "--layer", "layer9"], "has no layer 'layer9'"),
        (
            ["extract", "--model", "resnet18", "--data", "digits", "--image-size", "4"],
            "--image-size must be an integer between 16 and 2048, got 4",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_gpu_that_is_not_there_is_one_line(runner: CliRunner) -> None:
    device, message = absent_cuda()  # "cuda" on a CPU machine, cuda:N past the last GPU on a GPU machine
    args = ["extract", "--model", "resnet18", "--data", "digits", "--untrained", "--backend", "torch"]
    result = runner.invoke(cli, [*args, "--device", device])
    assert (
        result.exit_code == 2 and result.output.startswith(f"error: --device {device}: ") and message in result.output
    )
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_missing_weights_exit_2(runner: CliRunner, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = runner.invoke(cli, ["extract", "--model", "resnet18", "--data", str(tree), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: no weights for resnet18 IMAGENET1K_V1")
    assert "--weights FILE" in result.output
