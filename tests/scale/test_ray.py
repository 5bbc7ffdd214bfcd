"""Extraction on Ray: the same bits as the local engine, resumable, surviving a lost node, one-line errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tlfeat import ExtractConfig, cache, catalog, extract

from ..conftest import make_tree
from ..robustness.helpers import assert_one_clear_line, cli, env
from ..robustness.test_interrupt import STOPPING_CHILD, wait_until_stopped

ray = pytest.importorskip("ray", reason="Ray is installed by `pip install '.[dev]'`; CI has it")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray() -> object:
    """One local Ray for the module (2 CPUs): tlfeat joins the running instance."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(tree: Path, cache_dir: Path, **kw: object) -> ExtractConfig:
    base: dict[str, object] = dict(
        model="resnet18",
        data=str(tree),
        untrained=True,
        image_size=32,
        batch_size=8,
        cache_dir=cache_dir,
        progress=False,
        workers=0,
    )
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_ray_features_equal_the_local_engine_bit_for_bit(local_ray: object, tmp_path: Path, backend: str) -> None:
    tree = make_tree(tmp_path / "tree", per_class=10)
    local = extract(_cfg(tree, tmp_path / "local", backend=backend))
    for workers in (1, 2):
        remote = extract(_cfg(tree, tmp_path / f"ray{workers}", backend=backend, engine="ray", num_workers=workers))
        for a, b in zip(local, remote, strict=True):
            assert a.ids == b.ids and np.array_equal(a.X, b.X) and a.sha256 == b.sha256
            assert b.meta["engine"] == "ray"
    assert all(
        fs.reused for fs in extract(_cfg(tree, tmp_path / "ray1", backend=backend))
    )  # the local engine reuses them


def test_named_datasets_go_through_the_object_store(local_ray: object, tmp_path: Path) -> None:
    kw = dict(data="digits", limit=40, test_limit=20)
    local = extract(_cfg(Path("digits"), tmp_path / "local", **kw))
    remote = extract(_cfg(Path("digits"), tmp_path / "ray", engine="ray", num_workers=2, **kw))
    assert all(np.array_equal(a.X, b.X) and a.ids == b.ids for a, b in zip(local, remote, strict=True))


def test_a_killed_driver_resumes_with_only_the_missing_blocks(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=40)
    args: list[str | Path] = [
        "extract",
        "--data",
        tree,
        "--model",
        "resnet18",
        "--untrained",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "-q",
        "--split",
        "train",
    ]
    reference = extract(_cfg(tree, tmp_path / "ref", splits=("train",)))[0]
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            STOPPING_CHILD,
            *map(str, args),
            "--engine",
            "ray",
            "--num-workers",
            "1",
            "--cache-dir",
            str(cache_dir),
        ],
        env=env(STOP_AFTER="2", TLFEAT_FLUSH_EVERY="8", RAY_ADDRESS=""),
        start_new_session=True,  # its Ray processes go with it
    )
    wait_until_stopped(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
    [partial] = catalog.scan(cache_dir)
    done = int(partial.attrs["n_done"])
    assert partial.status == "partial" and 0 < done < 120, partial
    rerun = cli(*args, "--cache-dir", cache_dir)  # the local engine finishes what Ray started
    assert rerun.returncode == 0, rerun.stderr
    [resumed] = [cache.read(e.path) for e in catalog.scan(cache_dir)]
    assert resumed.meta["resumed_from"] == done and resumed.meta["computed_rows"] == 120 - done
    assert np.array_equal(resumed.X, reference.X) and resumed.ids == reference.ids


def test_a_killed_local_run_is_finished_by_ray(local_ray: object, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8)
    args: list[str | Path] = ["extract", "--data", tree, "--model", "resnet18", "--untrained", "--image-size", "32"]
    args += ["--batch-size", "4", "--workers", "0", "-q", "--split", "train", "--cache-dir", tmp_path / "cache"]
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPING_CHILD, *map(str, args)], env=env(STOP_AFTER="2", TLFEAT_FLUSH_EVERY="4")
    )
    wait_until_stopped(proc.pid)
    proc.kill()
    proc.wait(timeout=60)
    [partial] = catalog.scan(tmp_path / "cache")
    assert partial.status == "partial" and int(partial.attrs["n_done"]) == 8, partial
    [resumed] = extract(_cfg(tree, tmp_path / "cache", splits=("train",), engine="ray", num_workers=1))
    [reference] = extract(_cfg(tree, tmp_path / "ref", splits=("train",)))
    assert resumed.meta["engine"] == "ray" and resumed.meta["resumed_from"] == 8
    assert resumed.meta["computed_rows"] == 16 and np.array_equal(resumed.X, reference.X)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_ray_workers_need_no_weights_file(
    local_ray: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """Real MobileNetV2 weights from a --weights file (or its ONNX export), gone from disk once the
    driver has loaded them: the replicas rebuild the network from the object store alone."""
    from tlfeat import ray_engine, weights

    models = tmp_path / "models"  # this test's own ONNX model cache, which it empties and hides
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(models))
    weights_file = tmp_path / "mobilenet_v2.pth"
    weights_file.write_bytes(weights.resolve("mobilenet_v2").path.read_bytes())  # type: ignore[union-attr]
    tree = make_tree(tmp_path / "tree", per_class=4)
    kw = dict(model="mobilenet_v2", untrained=False, weights_file=weights_file, backend=backend, splits=("train",))
    [local] = extract(_cfg(tree, tmp_path / "local", **kw))
    shutil.rmtree(tmp_path / "local")
    shutil.rmtree(models, ignore_errors=True)  # the export too: the Ray run makes its own

    hidden = []
    original = ray_engine.payload

    def payload_then_hide(spec: object) -> object:
        out = original(spec)  # type: ignore[arg-type]
        for path in [
            weights_file,
            *(tmp_path / "ray").rglob("*.onnx"),
            *models.rglob("*.onnx"),
        ]:
            path.rename(path.with_name(path.name + ".hidden"))
            hidden.append(path)
        return out

    monkeypatch.setattr(ray_engine, "payload", payload_then_hide)
    [remote] = extract(_cfg(tree, tmp_path / "ray", engine="ray", num_workers=1, **kw))
    assert weights_file in hidden and len(hidden) == (2 if backend == "onnxruntime" else 1), hidden
    assert remote.meta["weights_sha256"] == local.meta["weights_sha256"] and remote.meta["pretrained"]
    if backend == "onnxruntime":
        assert np.array_equal(remote.X, local.X)
    else:  # a replica runs torch on one thread (Ray's OMP_NUM_THREADS=1): MobileNetV2 moves by ~1e-5 relative
        assert np.allclose(remote.X, local.X, rtol=1e-4, atol=1e-5 * np.abs(local.X).max())


# A cluster of a head and two worker nodes on this machine. Each replica labels its rows with the
# node it ran on (a subclass defined here, in __main__, which Ray ships to the actors by value); the
# first worker node to deliver rows is removed at once, while rows are still outstanding. Prints OK
# when that node had computed rows, rows were still to come, and the features equal the local engine's.
NODE_LOSS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from tlfeat import ExtractConfig, extract, ray_engine

    class NodeEmbed(ray_engine.Embed):
        def __call__(self, batch):
            out = super().__call__(batch)
            out["node"] = np.full(len(batch["row"]), ray.get_runtime_context().get_node_id())
            return out

    ray_engine.Embed = NodeEmbed
    tree, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = {node.node_id: node for node in (cluster.add_node(num_cpus=1) for _ in range(2))}
    cluster.wait_for_nodes()
    computed_on = {}  # row -> the node its features came from
    removed = []  # (node id, rows received when it was removed)
    original = ray_engine._iterate
    def iterate(ds):
        for batch in original(ds):
            for row, node in zip(batch["row"], batch["node"]):
                computed_on[int(row)] = str(node)
            node = str(batch["node"][0])
            if not removed and node in workers and len(computed_on) <= n - 2 * ray_engine.BATCH:
                cluster.remove_node(workers[node], allow_graceful=False)
                removed.append((node, len(computed_on)))
            yield batch
    ray_engine._iterate = iterate
    kw = dict(model="resnet18", data=tree, untrained=True, image_size=32, batch_size=4, progress=False, workers=0, splits=("train",))
    local = extract(ExtractConfig(**kw, cache_dir=cache + "/local"))[0]
    remote = extract(ExtractConfig(**kw, cache_dir=cache + "/ray", engine="ray", address=cluster.address, num_workers=2))[0]
    assert removed, "no worker node delivered rows early enough to be removed"
    victim, received = removed[0]
    held = sum(1 for node in computed_on.values() if node == victim)
    assert held > 0, "the removed node had computed nothing"
    assert received < len(remote) == n, "no rows were left when the node was removed"
    assert remote.ids == local.ids and np.array_equal(remote.X, local.X), "features differ"
    print("OK", len(remote), "rows; the removed node had computed", held, "of the", received, "received before", flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_losing_a_node_mid_run_completes_with_equal_features(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=80, size=32)
    proc = subprocess.run(
        [sys.executable, "-c", NODE_LOSS, str(tree), str(tmp_path / "cache"), "240"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert proc.returncode == 0 and "OK 240 rows" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_ray_errors_are_one_line(local_ray: object, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    base = [
        "extract",
        "--data",
        tree,
        "--model",
        "resnet18",
        "--untrained",
        "--image-size",
        "32",
        "-q",
        "--engine",
        "ray",
    ]
    nowhere = cli(*base, "--address", "127.0.0.1:9", "--cache-dir", tmp_path / "c1")
    assert_one_clear_line(nowhere, "cannot reach a Ray cluster at 127.0.0.1:9")
    assert not list((tmp_path / "c1").glob("*.h5"))
    have = int(ray.cluster_resources().get("GPU", 0))  # what this machine's Ray sees: one more than that is missing
    gpu = cli(*base, "--gpus-per-worker", str(have + 1), "--cache-dir", tmp_path / "c2")
    assert_one_clear_line(gpu, f"--gpus-per-worker {have + 1} but the Ray cluster has {have} GPU(s)")
    blocked = (
        "import sys; sys.modules['ray'] = None; from tlfeat_cli.main import cli; cli(sys.argv[1:], prog_name='tlfeat')"
    )
    no_ray = subprocess.run(
        [sys.executable, "-c", blocked, *map(str, base), "--cache-dir", str(tmp_path / "c3")],
        capture_output=True,
        text=True,
        env=env(),
    )
    assert_one_clear_line(no_ray, "pip install 'tlfeat[ray]'")


def test_an_image_a_worker_cannot_read(local_ray: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listed by the driver, gone when a worker reads it: named, and skipped with --on-error skip."""
    from tlfeat import ray_engine

    tree = make_tree(tmp_path / "tree", per_class=4)
    victim = tree / "train" / "bees" / "2.png"
    original = ray_engine._rows_dataset

    def vanish(ray_: object, images: object, rows: list[int]) -> object:
        victim.unlink(missing_ok=True)
        return original(ray_, images, rows)

    monkeypatch.setattr(ray_engine, "_rows_dataset", vanish)
    from tlfeat.errors import TlfeatError

    with pytest.raises(TlfeatError, match=r"cannot read image .*2\.png: No such file"):
        extract(_cfg(tree, tmp_path / "c", engine="ray", num_workers=1, splits=("train",)))
    assert not list((tmp_path / "c").glob("*.h5"))
    victim.write_bytes(b"")  # listed again next time, then removed again by the hook
    [train] = extract(_cfg(tree, tmp_path / "c", engine="ray", num_workers=1, splits=("train",), on_error="skip"))
    assert [s["id"] for s in train.meta["skipped"]] == ["train/bees/2.png"] and len(train) == 11


def test_shards_under_ray_equal_the_local_engine(local_ray: object, tmp_path: Path) -> None:
    """Tar members are read by the workers by their byte range; Parquet bytes go through the object store."""
    from .test_shards import _parquet, _samples, _tar

    tree = make_tree(tmp_path / "tree", per_class=6)
    samples = _samples(tree, "train")
    _tar(tmp_path / "s.tar", samples)
    _parquet(tmp_path / "s.parquet", samples)
    for data in (str(tmp_path / "s.tar"), str(tmp_path / "s.parquet")):
        local = extract(_cfg(tree, tmp_path / "local", data=data))
        remote = extract(_cfg(tree, tmp_path / "ray", data=data, engine="ray", num_workers=2))
        assert all(a.ids == b.ids and np.array_equal(a.X, b.X) for a, b in zip(local, remote, strict=True))
