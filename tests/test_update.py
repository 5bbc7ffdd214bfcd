"""A cache that can't go stale: changed images are noticed, updated incrementally, never reused silently."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tlfeat import ExtractConfig, cache, catalog, config, extract, freshness
from tlfeat.errors import CacheDamaged, StaleFeatures
from tlfeat.fitting import FitConfig, fit
from tlfeat_cli.main import cli

from .conftest import absent_cuda, make_tree


def _cfg(tree: Path, cache_dir: Path, **kw: object) -> ExtractConfig:
    base: dict[str, object] = dict(
        model="resnet18",
        data=str(tree),
        untrained=True,
        image_size=32,
        workers=0,
        batch_size=4,
        cache_dir=cache_dir,
        progress=False,
    )
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


def _noise(path: Path, seed: int, size: int = 40) -> None:
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)).save(path)


def _change(tree: Path) -> None:
    """One image added, one replaced by another picture under the same name, one removed."""
    _noise(tree / "train" / "ants" / "new.png", 1)
    _noise(tree / "train" / "bees" / "1.png", 2)
    (tree / "train" / "disc" / "2.png").unlink()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_changed_folder_is_updated_and_equals_a_fresh_extraction(tmp_path: Path, backend: str) -> None:
    tree = make_tree(tmp_path / "tree", per_class=6)
    cache_dir = tmp_path / "cache"
    [before, _] = extract(_cfg(tree, cache_dir, backend=backend))
    _change(tree)
    [entry] = [e for e in catalog.scan(cache_dir) if e.attrs["split"] == "train"]
    stale = freshness.status(entry)
    assert stale.state == "stale" and stale.changes is not None
    assert stale.changes.summary() == "1 added, 1 removed, 1 modified"

    [after, test] = extract(_cfg(tree, cache_dir, backend=backend))
    assert not after.reused and after.changes is not None and test.reused
    assert after.meta["computed_rows"] == 2 and after.meta["carried_rows"] == 16  # only what changed was computed
    assert after.path == before.path  # same key: the file was replaced, not duplicated
    [fresh, _] = extract(_cfg(tree, tmp_path / "fresh", backend=backend))
    assert np.array_equal(after.X, fresh.X) and after.ids == fresh.ids and np.array_equal(after.y, fresh.y)
    assert after.sha256 == fresh.sha256  # features, labels, ids and fingerprints: the very same file content
    assert freshness.status(next(e for e in catalog.scan(cache_dir) if e.attrs["split"] == "train")).state == "fresh"
    again = extract(_cfg(tree, cache_dir, backend=backend))
    assert all(fs.reused for fs in again)


def test_touch_is_not_a_change_and_verify_content_catches_a_same_size_same_time_edit(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    path = tree / "train" / "ants" / "raw.bmp"  # uncompressed: an edited pixel keeps the file size
    _noise(path, 3)
    cache_dir = tmp_path / "cache"
    extract(_cfg(tree, cache_dir, splits=("train",)))
    st = path.stat()
    os.utime(path, ns=(1, 1))  # only the time changes: the bytes are hashed and found equal
    [same] = extract(_cfg(tree, cache_dir, splits=("train",)))
    assert same.reused

    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one byte of one pixel
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a copy that kept the old time would leave it
    [unseen] = extract(_cfg(tree, cache_dir, splits=("train",)))
    assert unseen.reused  # same size, same time: only the contents tell
    [seen] = extract(_cfg(tree, cache_dir, splits=("train",), verify_content=True))
    assert not seen.reused and seen.meta["computed_rows"] == 1 and seen.changes.summary() == "1 modified"


def test_no_update_refuses_and_names_the_changes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    args = [
        "extract",
        "--model",
        "resnet18",
        "--untrained",
        "--data",
        str(tree),
        "--image-size",
        "32",
        "--workers",
        "0",
        "-q",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    runner = CliRunner()
    assert runner.invoke(cli, args).exit_code == 0
    _change(tree)
    listing = runner.invoke(cli, ["ls", "--cache-dir", str(tmp_path / "c")])
    assert "STALE: 1 added, 1 removed, 1 modified" in listing.output
    refused = runner.invoke(cli, [*args, "--no-update"])
    assert refused.exit_code == 2 and "1 added, 1 removed, 1 modified" in refused.output
    assert "train/ants/new.png" in refused.output and "run without --no-update" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    updated = runner.invoke(cli, args)
    assert (
        updated.exit_code == 0
        and "updated (1 added, 1 removed, 1 modified): 2 computed, 10 carried over" in updated.output
    )


def test_fit_refuses_stale_features_and_refits_updated_ones(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=6)
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    extract(_cfg(tree, cache_dir))
    [first] = fit(FitConfig(C=1.0, cache_dir=cache_dir, results_dir=results))
    _change(tree)
    with pytest.raises(StaleFeatures, match=r"changed since it was extracted \(1 added, 1 removed, 1 modified\)"):
        fit(FitConfig(C=1.0, cache_dir=cache_dir, results_dir=results))
    extract(_cfg(tree, cache_dir))
    [second] = fit(FitConfig(C=1.0, cache_dir=cache_dir, results_dir=results))
    assert not second.reused and second.path != first.path and second.record.n_train == 18


def test_edited_labels_are_caught_by_the_checksum(tmp_path: Path) -> None:
    import h5py

    tree = make_tree(tmp_path / "tree", per_class=4)
    [train, _] = extract(_cfg(tree, tmp_path / "cache"))
    assert train.path is not None
    with h5py.File(train.path, "r+") as h5:
        h5["labels"][0] = (h5["labels"][0] + 1) % 3
    with pytest.raises(CacheDamaged, match="labels, ids or fingerprints checksum differs"):
        cache.read(train.path)
    [rebuilt, _] = extract(_cfg(tree, tmp_path / "cache"))
    assert not rebuilt.reused and np.array_equal(rebuilt.y, train.y)
    assert list((tmp_path / "cache").glob("*.damaged"))


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_named_dataset_whose_files_change_is_updated(tmp_path: Path) -> None:
    """MNIST read from --data-dir: an edited label is relabelled (no image recomputed), an edited image recomputed."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 28, 28)).astype(np.uint8)
    labels = np.arange(40) % 10
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    cfg = _cfg(Path("mnist"), tmp_path / "cache", data="mnist", data_dir=tmp_path / "data", splits=("train",))
    [first] = extract(cfg)
    labels[3] = 9
    _idx(raw / "train-labels-idx1-ubyte.gz", labels)
    [relabelled] = extract(cfg)
    assert relabelled.changes.summary() == "1 relabelled" and relabelled.meta["computed_rows"] == 0
    assert relabelled.y[3] == 9 and np.array_equal(relabelled.X, first.X)
    images[5] = 255 - images[5]
    _idx(raw / "train-images-idx3-ubyte.gz", images)
    [modified] = extract(cfg)
    assert modified.changes.summary() == "1 modified" and modified.meta["computed_rows"] == 1
    assert not np.array_equal(modified.X[5], first.X[5]) and np.array_equal(modified.X[6:], first.X[6:])


def test_resume_over_a_changed_image_list_never_misplaces_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted, then two images swap class folders (same count): rows follow ids, not positions."""
    from tlfeat.writer import Writer

    tree = make_tree(tmp_path / "tree", per_class=8)
    monkeypatch.setenv("TLFEAT_FLUSH_EVERY", "4")
    original = Writer.append
    calls = {"n": 0}

    def stop_after_two_blocks(self: Writer, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Writer, "append", stop_after_two_blocks)
    with pytest.raises(KeyboardInterrupt):
        extract(_cfg(tree, tmp_path / "cache", splits=("train",)))
    monkeypatch.setattr(Writer, "append", original)
    a, b = tree / "train" / "ants" / "0.jpg", tree / "train" / "bees" / "0.jpg"
    tmp = tree / "swap.jpg"
    shutil.move(a, tmp), shutil.move(b, a), shutil.move(tmp, b)
    [resumed] = extract(_cfg(tree, tmp_path / "cache", splits=("train",)))
    [fresh] = extract(_cfg(tree, tmp_path / "fresh", splits=("train",)))
    assert resumed.ids == fresh.ids and np.array_equal(resumed.X, fresh.X)


def test_a_damaged_onnx_export_is_detected_and_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLFEAT_MODEL_CACHE", str(tmp_path / "models"))  # this test damages its export
    tree = make_tree(tmp_path / "tree", per_class=4)
    [good, _] = extract(_cfg(tree, tmp_path / "c1", backend="onnxruntime"))
    [export] = list((config.model_cache_dir() / "onnx").glob("*.onnx"))
    data = bytearray(export.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) // 2, len(data) - 1, 64):
        data[i] ^= 0xFF
    export.write_bytes(bytes(data))
    for path in (tmp_path / "c1").glob("*.h5"):
        path.unlink()  # the features must be computed again, through the export
    [again, _] = extract(_cfg(tree, tmp_path / "c1", backend="onnxruntime"))
    assert np.array_equal(again.X, good.X)
    assert list((config.model_cache_dir() / "onnx").glob("*.onnx.damaged"))
    meta = json.loads(export.with_name(export.name + ".json").read_text())
    assert meta["weights_id"] == "untrained:seed0" and len(meta["sha256"]) == 64


def test_empty_class_folders_are_not_classes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    (tree / "train" / "empty").mkdir()
    (tree / "val" / "empty").mkdir()
    [train, _] = extract(_cfg(tree, tmp_path / "cache"))
    assert train.class_names == ["ants", "bees", "disc"]


def test_file_names_that_are_not_utf8(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    folder = os.fsencode(tree / "train" / "ants")
    shutil.copyfile(tree / "train" / "ants" / "0.jpg", os.fsdecode(folder + b"/caf\xe9.jpg"))
    [train, _] = extract(_cfg(tree, tmp_path / "cache"))
    assert "train/ants/caf\udce9.jpg" in train.ids and len(train) == 13
    listing = CliRunner().invoke(cli, ["ls", "--cache-dir", str(tmp_path / "cache")])
    assert listing.exit_code == 0, listing.output


def test_a_damaged_file_is_never_the_source_of_an_update(tmp_path: Path) -> None:
    """Damage and changed images together: the file is set aside and rebuilt, not carried over."""
    import h5py

    tree = make_tree(tmp_path / "tree", per_class=4)
    cache_dir = tmp_path / "cache"
    [train, _] = extract(_cfg(tree, cache_dir))
    assert train.path is not None
    with h5py.File(train.path, "r+") as h5:
        h5["features"][3, 5] += 1.0
    _change(tree)
    [updated, _] = extract(_cfg(tree, cache_dir))
    assert updated.meta["carried_rows"] == 0  # nothing taken over from the damaged file
    assert list(cache_dir.glob("*.damaged"))
    [fresh, _] = extract(_cfg(tree, tmp_path / "fresh"))
    assert np.array_equal(updated.X, fresh.X) and updated.ids == fresh.ids


def test_load_features_refuses_features_of_changed_images(tmp_path: Path) -> None:
    import tlfeat

    tree = make_tree(tmp_path / "tree", per_class=4)
    cache_dir = tmp_path / "cache"
    extract(_cfg(tree, cache_dir))
    assert tlfeat.load_features("resnet18", str(tree), cache_dir=cache_dir).X.shape[0] == 12
    _change(tree)
    with pytest.raises(
        StaleFeatures, match=r"1 added, 1 removed, 1 modified\); run `tlfeat extract --model resnet18 --data "
    ):
        tlfeat.load_features("resnet18", str(tree), cache_dir=cache_dir)
    assert tlfeat.load_features("resnet18", str(tree), cache_dir=cache_dir, allow_stale=True).X.shape[0] == 12
    extract(_cfg(tree, cache_dir))
    assert tlfeat.load_features("resnet18", str(tree), cache_dir=cache_dir).X.shape[0] == 12


def test_an_update_keeps_the_cost_of_the_rows_it_carries_over(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=6)
    cache_dir = tmp_path / "cache"
    [before, _] = extract(_cfg(tree, cache_dir))
    assert before.path is not None and before.meta["n_images"] == 18
    with h5py.File(before.path, "r+") as h5:
        h5.attrs["extract_seconds"] = 90.0  # what the 18 rows cost then, made a round figure
    _change(tree)  # 1 added, 1 modified, 1 removed: 16 of the 18 rows are carried over
    [after, _] = extract(_cfg(tree, cache_dir))
    assert (after.meta["carried_rows"], after.meta["computed_rows"]) == (16, 2)
    # This run's own time, plus the carried rows' share of the old file's: 90 s x 16 / 18 = 80 s.
    assert after.meta["extract_seconds"] - after.meta["run_seconds"] == pytest.approx(80.0)


def test_a_failed_run_leaves_no_empty_partial_behind(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=2)
    cache_dir = tmp_path / "cache"
    device, _ = absent_cuda()  # fails after the plan, before any row is computed
    result = CliRunner().invoke(
        cli, ["extract", "--model", "resnet18", "--data", str(tree), "--cache-dir", str(cache_dir), "--device", device]
    )
    assert result.exit_code == 2, result.output
    assert not list(cache_dir.glob("*.partial")) and all(e.status != "partial" for e in catalog.scan(cache_dir))
