from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import tlfeat
from tlfeat import ExtractConfig, cache, catalog, extract, load_features
from tlfeat.errors import CacheMismatch, TlfeatError
from tlfeat.writer import Listing, Writer


def small(tree: Path, tmp_path: Path, **kw: object) -> ExtractConfig:
    """A fast config: small untrained ResNet-18 at 64 px over the tiny tree."""
    base: dict[str, object] = dict(
        model="resnet18",
        data=str(tree),
        untrained=True,
        image_size=64,
        workers=0,
        batch_size=4,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


def test_cache_file_round_trips_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 7)).astype(np.float32)
    ids = [f"id/{i}" for i in range(9)] + ["caf\udce9.jpg"]  # a file name that is not valid UTF-8
    listing = Listing(ids, np.arange(10) % 3, ["a", "b", "c"], np.zeros((10, 2), np.int64), "sig")
    writer = Writer(tmp_path / "f.h5", "k", {"model": "m", "dataset": "d", "split": "train"}, listing)
    writer.append(X[:4])
    writer.append(X[4:])
    path = writer.finish({"created": "now"})
    fs = cache.read(path)
    assert fs.X.dtype == np.float32 and np.array_equal(fs.X, X)
    assert fs.y.tolist() == (np.arange(10) % 3).tolist()
    assert fs.ids == ids and fs.class_names == ["a", "b", "c"]
    assert fs.meta["model"] == "m" and fs.meta["complete"] is True and fs.meta["signature"] == "sig"
    assert not (tmp_path / "f.h5.partial").exists()


def test_extract_writes_provenance_and_second_run_is_a_no_op(tree: Path, tmp_path: Path) -> None:
    first = extract(small(tree, tmp_path))
    assert [fs.split for fs in first] == ["train", "test"] and not any(fs.reused for fs in first)
    train = first[0]
    assert train.X.shape == (12, 512) and train.class_names == ["ants", "bees", "disc"]
    meta = train.meta
    for field in (
        "model",
        "weights_id",
        "layer",
        "preprocessing",
        "dataset",
        "split",
        "n_images",
        "torch_version",
        "torchvision_version",
        "tlfeat_version",
        "created",
    ):
        assert meta[field] not in ("", None), field
    assert meta["pretrained"] is False and meta["weights_id"] == "untrained:seed0"
    assert meta["image_size"] == 64 and '"resize_size": 73' in meta["preprocessing"]
    mtime = train.path.stat().st_mtime_ns  # type: ignore[union-attr]

    second = extract(small(tree, tmp_path))
    assert all(fs.reused for fs in second)
    assert train.path.stat().st_mtime_ns == mtime  # type: ignore[union-attr]
    assert np.array_equal(second[0].X, train.X)


def test_every_numeric_option_gets_its_own_file(tree: Path, tmp_path: Path) -> None:
    paths = {
        extract(small(tree, tmp_path, splits=("train",), **kw))[0].path
        for kw in ({}, {"image_size": 48}, {"limit": 6}, {"layer": "layer3"}, {"seed": 1})
    }
    assert len(paths) == 5


def test_load_features_reuses_the_cache_from_python(tree: Path, tmp_path: Path) -> None:
    [train, _] = extract(small(tree, tmp_path))
    loaded = load_features("resnet18", str(tree), split="train", cache_dir=tmp_path / "cache")
    assert isinstance(loaded, tlfeat.FeatureSet)
    assert np.array_equal(loaded.X, train.X) and loaded.ids == train.ids

    extract(small(tree, tmp_path, image_size=48))
    with pytest.raises(CacheMismatch, match="2 cached feature sets match"):
        load_features("resnet18", str(tree), cache_dir=tmp_path / "cache")
    picked = load_features("resnet18", str(tree), cache_dir=tmp_path / "cache", image_size=48)
    assert picked.meta["image_size"] == 48
    with pytest.raises(CacheMismatch, match="none has layer=layer2"):
        load_features("resnet18", str(tree), cache_dir=tmp_path / "cache", layer="layer2")
    with pytest.raises(CacheMismatch, match="run `tlfeat extract --model vgg16"):
        load_features("vgg16", str(tree), cache_dir=tmp_path / "cache")


def test_a_file_under_the_wrong_key_is_never_reused(tree: Path, tmp_path: Path) -> None:
    [a] = extract(small(tree, tmp_path, splits=("train",)))
    [b] = extract(small(tree, tmp_path, splits=("train",), image_size=48))
    assert a.path is not None and b.path is not None
    shutil.copyfile(b.path, a.path)  # a's name, b's content
    with pytest.raises(CacheMismatch, match="preprocessing"):
        extract(small(tree, tmp_path, splits=("train",)))


def test_interrupted_extraction_resumes_and_equals_an_uninterrupted_run(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = extract(small(tree, tmp_path / "ref", splits=("train",)))[0]

    monkeypatch.setenv("TLFEAT_FLUSH_EVERY", "4")
    calls = {"n": 0}
    original = Writer.append

    def crash_on_third_batch(self: Writer, feats: np.ndarray, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, feats, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Writer, "append", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(small(tree, tmp_path, splits=("train",)))
    [entry] = catalog.scan(tmp_path / "cache")
    assert entry.status == "partial" and entry.attrs["n_done"] == 8

    monkeypatch.setattr(Writer, "append", original)
    resumed = extract(small(tree, tmp_path, splits=("train",)))[0]
    assert resumed.meta["resumed_from"] == 8
    assert np.array_equal(resumed.X, reference.X)


def test_damaged_cache_file_is_reported(tree: Path, tmp_path: Path) -> None:
    [fs] = extract(small(tree, tmp_path, splits=("train",)))
    assert fs.path is not None
    import h5py

    with h5py.File(fs.path, "r+") as h5:
        h5["features"][0, 0] += 1.0
    with pytest.raises(TlfeatError, match="checksum"):
        cache.read(fs.path)
    fs.path.write_bytes(fs.path.read_bytes()[:200])
    with pytest.raises(TlfeatError, match="damaged"):
        cache.read(fs.path)


def test_large_jpegs_are_decoded_fast_by_default_and_small_ones_exactly(tmp_path: Path) -> None:
    """Photos far above the resize are decoded at reduced size (features close to a full decode, not
    equal); images below it are decoded the same either way (bit-identical features)."""
    import skimage.data
    from PIL import Image

    root = tmp_path / "photos"
    photos = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea()}
    for split in ("train", "val"):
        for name, pixels in photos.items():
            (root / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(root / split / name / "large.jpg", quality=90)  # 300-600 px a side
            Image.fromarray(pixels).resize((40, 40)).save(root / split / name / "small.jpg", quality=90)
    assert ExtractConfig(model="resnet18", data=str(root)).fast_decode  # the default
    [fast] = extract(small(root, tmp_path, image_size=32, splits=("train",)))  # resize 37: 74 px and up is large
    [full] = extract(small(root, tmp_path, image_size=32, splits=("train",), fast_decode=False))
    assert fast.meta["fast_decode"] and not full.meta["fast_decode"] and fast.path != full.path  # in the key
    assert fast.ids == full.ids
    large = np.array(["large" in i for i in fast.ids])
    assert np.array_equal(fast.X[~large], full.X[~large])
    assert not np.array_equal(fast.X[large], full.X[large])
    cosine = np.sum(fast.X * full.X, axis=1) / np.linalg.norm(fast.X, axis=1) / np.linalg.norm(full.X, axis=1)
    assert cosine.min() > 0.95, cosine
