"""Every command, fed random and hostile arguments, ends with a clear message and exit code 0 or 2.

Exit code 70 (tlfeat's "internal error") or an escaped exception fails the test: the message
must say what the user got wrong, not where tlfeat broke. An OSError is the user's (exit 2) only when
it is a failed write or names a path the user gave (`cli/main.py`), so a bug's OSError fails here too.
Examples are derandomised (conftest's hypothesis profile): every run tries the same arguments.
"""

from __future__ import annotations

import os
import time

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlfeat_cli.main import cli

from ..conftest import absent_cuda, make_tree

HOSTILE = [
    "",
    " ",
    "-",
    "--",
    "-1",
    "0",
    "1",
    "3",
    "1e309",
    "nan",
    "-inf",
    "99999999999999999999999",
    "ünïcødé-ß-日本語",
    "📁/🐝",
    "../../../../etc/passwd",
    "/dev/null",
    "/proc/self/mem",
    "a" * 300,
    "x\ty\nz",
    "resnet18",
    "resnet18:untrained",
    "resnet_18",
    "mobilenet_v9",
    "cifar10",
    "MNIST ",
    "svm",
    "logreg,svm,finetune:freeze:99",
    "finetune:head,scratch,nope",
    "layer3,penultimate,nope",
    "features.99",
    "full",
    "freeze:-2",
    "discriminative:0",
]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").mkdir()
    one = make_tree(root / "one-image-classes", per_class=1, size=16)
    flat = make_tree(root / "flat", per_class=1, splits=("",), size=16)
    (root / "a file.txt").write_text("not a folder")
    (root / "zero.pt").write_bytes(b"")
    return {
        "empty": str(root / "empty"),
        "one": str(one),
        "flat": str(flat),
        "file": str(root / "a file.txt"),
        "zero_bytes": str(root / "zero.pt"),
        "missing": str(root / "missing" / "ünï"),
        "root": str(root),
        "no_gpu": absent_cuda()[0],
    }


def _options(command: click.Command) -> list[click.Option]:
    # `models --all` builds all 80 architectures (20 s): correct, too slow to repeat hundreds of times.
    return [p for p in command.params if isinstance(p, click.Option) and p.name not in ("help", "show_all")]


@st.composite
def invocations(draw: st.DrawFn, places: dict[str, str]) -> list[str]:
    ctx = click.Context(cli)
    name = draw(st.sampled_from(sorted(cli.list_commands(ctx))))  # type: ignore[attr-defined]
    command = cli.get_command(ctx, name)  # type: ignore[attr-defined]
    args = [name]
    if isinstance(command, click.Group):  # `analyze cka|rsa|...`: a subcommand and its options
        sub = draw(st.sampled_from(sorted(command.list_commands(ctx))))
        command = command.get_command(ctx, sub)
        args.append(sub)
    values = st.one_of(
        st.sampled_from(HOSTILE),
        st.sampled_from(list(places.values())),
        st.text(min_size=0, max_size=12).filter(lambda s: "\x00" not in s),
        st.integers(min_value=-(10**12), max_value=10**12).map(str),
    )
    for option in draw(st.lists(st.sampled_from(_options(command)), max_size=6)):
        flag = option.opts[-1]
        if option.is_flag:
            args.append(flag)
        else:
            args += [flag, draw(values)]
    if draw(st.booleans()):
        args.append(draw(values))  # a stray positional argument
    return args


def _check(args: list[str], places: dict[str, str]) -> None:
    env = {
        "TLFEAT_OFFLINE": "1",
        "TLFEAT_CACHE_DIR": os.path.join(places["root"], "cache"),
        "TLFEAT_RESULTS_DIR": os.path.join(places["root"], "results"),
        "TLFEAT_DATA_DIR": os.path.join(places["root"], "data"),
    }
    t0 = time.perf_counter()
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=places["root"]):  # `report .` and friends write to the cwd
        result = runner.invoke(cli, args, env=env)
    if os.environ.get("TLFEAT_FUZZ_TIMES"):
        print(f"{time.perf_counter() - t0:6.2f}s {result.exit_code} {args!r}"[:300])
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.output)
    # compare ends 1 when a cell failed (the report is written and says why); everything else 0 or 2
    partial = args[0] == "compare" and result.exit_code == 1 and "cell(s) failed" in result.output
    assert result.exit_code in (0, 2) or partial, (args, result.exit_code, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    if result.exit_code == 2:
        assert any(line.startswith(("error:", "Error:")) for line in result.output.splitlines()), (args, result.output)


def test_hostile_arguments_get_a_clear_line(places: dict[str, str]) -> None:
    @settings(
        max_examples=int(os.environ.get("TLFEAT_FUZZ_EXAMPLES", "150")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(args=invocations(places))
    def run(args: list[str]) -> None:
        _check(args, places)

    run()


@pytest.mark.parametrize(
    "args",
    [
        ["extract", "--model", "resnet18", "--data", "{empty}"],
        ["extract", "--model", "resnet18", "--untrained", "--data", "{one}", "--image-size", "16", "--workers", "0"],
        ["extract", "--model", "resnet18", "--data", "{file}"],
        ["extract", "--model", "resnet18", "--data", "{missing}"],
        ["extract", "--model", "resnet18", "--data", "cifar10"],
        ["extract", "--model", "nope", "--data", "{one}"],
        ["extract", "--model", "resnet18", "--untrained", "--data", "{one}", "--layer", "nope"],
        ["extract", "--model", "resnet18", "--data", "{one}", "--image-size", "-3"],
        ["extract", "--model", "resnet18", "--data", "{one}", "--limit", "0"],
        ["fit", "--clf", "svm", "--C", "nan"],
        ["fit", "--clf", "svm", "--C", "-1"],
        ["fit", "--clf", "nope"],
        [
            "finetune",
            "--model",
            "resnet18",
            "--data",
            "{one}",
            "--strategy",
            "scratch",
            "--epochs",
            "1",
            "--workers",
            "0",
        ],
        ["finetune", "--model", "resnet18", "--data", "{one}", "--epochs", "99999999999"],
        ["compare", "--models", "resnet18:untrained", "--data", "{flat}", "--methods", "logreg", "--image-size", "16"],
        ["compare", "--models", "", "--data", "", "--methods", ""],
        ["extract", "--model", "resnet18", "--data", ""],
        [
            "extract",
            "--model",
            "resnet18",
            "--untrained",
            "--data",
            "{one}",
            "--device",
            "{no_gpu}",
            "--backend",
            "torch",
        ],
        ["extract", "--model", "resnet18", "--untrained", "--data", "{one}", "--device", "bogus"],
        ["extract", "--model", "resnet18", "--data", "{one}", "--weights", "{zero_bytes}"],
        ["report", "{empty}"],
        ["report", "{missing}"],
        ["results", "--model", "ünï"],
        ["ls", "--cache-dir", "{file}"],
        ["models", "--layers-of", "nope"],
    ],
)
def test_known_hostile_cases(args: list[str], places: dict[str, str]) -> None:
    _check([a.format(**places) for a in args], places)
