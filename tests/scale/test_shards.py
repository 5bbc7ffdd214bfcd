"""The formats large image sets are kept in: WebDataset tar shards and Parquet, read in place."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tlfeat import ExtractConfig, datasets, extract
from tlfeat.datasets.shards import braceexpand
from tlfeat_cli.main import cli

from ..conftest import make_tree


def _samples(tree: Path, split: str) -> list[tuple[str, bytes, int, str]]:
    """(key, image bytes, label, extension) of every image of a folder tree's split."""
    classes = sorted(p.name for p in (tree / "train").iterdir())
    out = []
    for label, cls in enumerate(classes):
        for path in sorted((tree / split / cls).iterdir()):
            out.append((f"{cls}_{path.stem}", path.read_bytes(), label, path.suffix.lstrip(".")))
    return out


def _tar(path: Path, samples: list[tuple[str, bytes, int, str]], field: str = "cls") -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, label, ext in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.{field}", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _parquet(path: Path, samples: list[tuple[str, bytes, int, str]], hf_style: bool = False) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": d, "path": None} for _, d, _, _ in samples] if hf_style else [d for _, d, _, _ in samples]
    table = pa.table(
        {
            "__key__": [k for k, *_ in samples],
            "image" if hf_style else "jpg": images,
            "label" if hf_style else "cls": [lab for _, _, lab, _ in samples],
        }
    )
    pq.write_table(table, path, row_group_size=5)


@pytest.fixture(scope="module")
def tree_and_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    tree = make_tree(root / "tree", per_class=6)
    for split, folder in (("train", "train"), ("val", "val")):
        samples = _samples(tree, folder)
        half = len(samples) // 2
        (root / "wds" / split).mkdir(parents=True)
        _tar(root / "wds" / split / "00000.tar", samples[:half])
        _tar(root / "wds" / split / "00001.tar", samples[half:])
        (root / "pq" / split).mkdir(parents=True)
        _parquet(root / "pq" / split / "part-0.parquet", samples, hf_style=split == "val")
    return tree, root


def _cfg(data: str, cache_dir: Path, **kw: object) -> ExtractConfig:
    return ExtractConfig(
        model="resnet18",
        data=data,
        untrained=True,
        image_size=32,
        workers=0,
        batch_size=4,
        cache_dir=cache_dir,
        progress=False,
        **kw,
    )  # type: ignore[arg-type]


def _by_key(fs: object) -> dict[str, np.ndarray]:
    out = {}
    for i, x in zip(fs.ids, fs.X, strict=True):  # type: ignore[attr-defined]
        parts = i.split("/")
        out[f"{parts[-2]}_{Path(parts[-1]).stem}" if len(parts) > 1 else i] = x
    return out


def test_braces_expand_like_webdataset() -> None:
    assert braceexpand("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert braceexpand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


@pytest.mark.parametrize("kind", ["wds", "pq"])
def test_shards_give_the_features_of_the_same_images_in_a_folder(
    tree_and_shards: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    tree, root = tree_and_shards
    suffix = "tar" if kind == "wds" else "parquet"
    spec = f"train={root / kind / 'train'}/*.{suffix},test={root / kind / 'val'}/*.{suffix}"
    folder_sets = extract(_cfg(str(tree), tmp_path / "folder"))
    shard_sets = extract(_cfg(spec, tmp_path / kind))
    for f, s in zip(folder_sets, shard_sets, strict=True):
        assert s.class_names == ["0", "1", "2"] and len(s) == len(f) and np.array_equal(np.sort(s.y), np.sort(f.y))
        a, b = _by_key(f), _by_key(s)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(fs.reused for fs in extract(_cfg(spec, tmp_path / kind)))


def test_a_folder_of_shards_and_a_brace_pattern(tree_and_shards: tuple[Path, Path], tmp_path: Path) -> None:
    _, root = tree_and_shards
    assert datasets.splits(str(root / "wds")) == ("train", "test")
    pattern = str(root / "wds" / "train" / "{00000..00001}.tar")
    assert datasets.splits(pattern) == ("train", "test")  # one pattern: split 80/20 like a flat folder
    train = datasets.load_split(pattern, "train")
    test = datasets.load_split(pattern, "test")
    assert len(train) + len(test) == 18 and not set(train.ids) & set(test.ids)


def test_a_changed_shard_is_noticed_and_updated(tree_and_shards: tuple[Path, Path], tmp_path: Path) -> None:
    tree, root = tree_and_shards
    shards = tmp_path / "wds"
    for split in ("train", "val"):
        (shards / split).mkdir(parents=True)
        for p in (root / "wds" / split).iterdir():
            (shards / split / p.name).write_bytes(p.read_bytes())
    [first, _] = extract(_cfg(str(shards), tmp_path / "cache"))
    samples = _samples(tree, "train")
    samples[0] = (samples[0][0], samples[3][1], samples[0][2], samples[3][3])  # another picture, same key
    _tar(shards / "train" / "00000.tar", samples[: len(samples) // 2])
    [updated, test] = extract(_cfg(str(shards), tmp_path / "cache"))
    assert updated.changes is not None and updated.changes.summary() == "1 modified" and test.reused
    assert updated.meta["computed_rows"] == 1


def test_shard_errors_are_one_line(tree_and_shards: tuple[Path, Path], tmp_path: Path) -> None:
    _, root = tree_and_shards
    bad = tmp_path / "bad"
    bad.mkdir()
    _tar(bad / "00000.tar", [("a", b"x", 0, "jpg")], field="label")
    runner = CliRunner()
    base = ["extract", "--model", "resnet18", "--untrained", "-q", "--cache-dir", str(tmp_path / "c")]
    missing = runner.invoke(cli, [*base, "--data", str(root / "wds" / "train" / "{00000..00009}.tar")])
    assert missing.exit_code == 2 and "8 of 10 file(s) missing" in missing.output
    no_label = runner.invoke(cli, [*base, "--data", str(bad / "00000.tar")])
    assert no_label.exit_code == 2 and "has no .cls member" in no_label.output and "--label-field" in no_label.output
    relabelled = runner.invoke(
        cli, [*base, "--data", str(bad / "00000.tar"), "--label-field", "label", "--split", "train"]
    )
    assert (
        relabelled.exit_code == 2 and "cannot decode image" in relabelled.output
    )  # found the label, then the bad image


def test_a_parquet_row_without_a_label_is_refused(tree_and_shards: tuple[Path, Path], tmp_path: Path) -> None:
    tree, _ = tree_and_shards
    samples = _samples(tree, "train")[:4]
    samples[2] = (samples[2][0], samples[2][1], None, samples[2][3])  # type: ignore[assignment]
    _parquet(tmp_path / "part.parquet", samples)
    result = CliRunner().invoke(
        cli, ["extract", "--model", "resnet18", "--untrained", "-q", "--cache-dir", str(tmp_path / "c"),
              "--data", str(tmp_path / "part.parquet")]
    )  # fmt: skip
    assert result.exit_code == 2 and "has no label" in result.output, result.output


def test_a_tar_with_an_empty_label_or_a_key_twice_is_refused(
    tree_and_shards: tuple[Path, Path], tmp_path: Path
) -> None:
    tree, _ = tree_and_shards
    samples = _samples(tree, "train")[:4]
    base = ["extract", "--model", "resnet18", "--untrained", "-q", "--cache-dir", str(tmp_path / "c")]
    _tar(tmp_path / "twice.tar", [*samples, (samples[0][0], samples[1][1], 1, samples[0][3])])
    result = CliRunner().invoke(cli, [*base, "--data", str(tmp_path / "twice.tar")])
    assert result.exit_code == 2 and "more than once" in result.output, result.output
    _tar(tmp_path / "empty.tar", [*samples[:3], (samples[3][0], samples[3][1], "", samples[3][3])])  # type: ignore[list-item]
    result = CliRunner().invoke(cli, [*base, "--data", str(tmp_path / "empty.tar")])
    assert result.exit_code == 2 and "ants_3.cls: label is empty" in result.output, result.output
