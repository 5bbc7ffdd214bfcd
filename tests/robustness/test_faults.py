"""Faults found by testing as a hostile user would: each one a clear line (exit 2) or correct results, never a crash."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from tlfeat import cache, catalog, metrics
from tlfeat.classifiers import make_classifier, scores

from ..conftest import make_tree
from .helpers import FAST, assert_one_clear_line, cli, env
from .tmpfs import HOW, tmpfs


def _bomb(path: Path, side: int = 20000) -> None:
    """A PNG whose header says side x side pixels: PIL refuses it before decoding (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_named_and_skippable(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    _bomb(tree / "train" / "ants" / "zz_bomb.png")
    args = ["extract", "--data", tree, *FAST, "--cache-dir", tmp_path / "cache", "--split", "train"]
    assert_one_clear_line(cli(*args), "zz_bomb.png", "decompression bomb")
    skipped = cli(*args, "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 unreadable image(s)" in skipped.stdout and "Traceback" not in skipped.stderr
    assert "DecompressionBombWarning" not in skipped.stderr


def test_a_class_whose_images_are_all_unusable(tmp_path: Path) -> None:
    """Its features are all skipped: fit still works, scores stay aligned with the classes, and the record says so."""
    tree = make_tree(tmp_path / "tree", per_class=6)
    for path in (tree / "train" / "disc").iterdir():
        path.write_bytes(b"not an image")
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    assert cli("extract", "--data", tree, *FAST, "--on-error", "skip", "--cache-dir", cache_dir).returncode == 0
    fitted = cli("fit", "--clf", "logreg", "--C", "1", "--json", "--cache-dir", cache_dir, "--results-dir", results)
    assert fitted.returncode == 0, fitted.stderr
    [record] = json.loads(fitted.stdout)
    assert record["details"]["classes_without_training_images"] == ["disc"]
    assert record["metrics"]["roc_auc"] is not None and len(record["metrics"]["per_class"]) == 3


def test_roc_auc_columns_follow_the_classes_not_their_positions() -> None:
    """Class 1 never seen in training: column c must still score class c (0.875 was reported where 1.0 is right)."""
    rng = np.random.default_rng(0)
    X_train = np.vstack([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
    y_train = np.repeat([0, 2], 20)
    pipe = make_classifier("logreg", C=1.0).fit(X_train, y_train)
    X_test = np.vstack([rng.normal(0, 0.1, (10, 2)), rng.normal(5, 0.1, (10, 2))])
    y_test = np.repeat([0, 2], 10)
    s = scores(pipe, X_test, 3)
    assert s.shape == (20, 3) and np.all(s[:10, 0] > s[:10, 2]) and np.all(s[10:, 2] > s[10:, 0])
    assert metrics.roc_auc(y_test, s, 3) == 1.0


def test_a_block_cut_in_half_is_computed_again(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=8)
    args = ["extract", "--data", tree, *FAST, "--split", "train"]
    assert cli(*args, "--cache-dir", tmp_path / "ref").returncode == 0
    [reference] = [cache.read(e.path) for e in catalog.scan(tmp_path / "ref")]
    cache_dir = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", _STOP_AFTER_BLOCKS, *map(str, args), "--cache-dir", str(cache_dir)],
        env=env(TLFEAT_FLUSH_EVERY="4"),
    )
    assert proc.returncode == 3
    [partial] = list(cache_dir.glob("*.partial"))
    blocks = sorted(partial.glob("*.npz"))
    assert len(blocks) == 3
    blocks[1].write_bytes(blocks[1].read_bytes()[: blocks[1].stat().st_size // 2])
    rerun = cli(*args, "--cache-dir", cache_dir)
    assert rerun.returncode == 0, rerun.stderr
    [fixed] = [cache.read(e.path) for e in catalog.scan(cache_dir)]
    assert fixed.meta["resumed_from"] == 4 and np.array_equal(fixed.X, reference.X)


# Runs `tlfeat ARGS` and stops the process (exit 3) once three blocks are saved: deterministic, no timers.
_STOP_AFTER_BLOCKS = textwrap.dedent(
    """
    import os, sys
    from tlfeat import writer
    original = writer.Writer.flush
    def flush(self):
        original(self)
        if len(list(self.partial.glob("*.npz"))) >= 3:
            os._exit(3)
    writer.Writer.flush = flush
    from tlfeat_cli.main import cli
    cli(sys.argv[1:], prog_name="tlfeat")
    """
)


def test_malformed_records_are_skipped_and_refit(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    assert cli("extract", "--data", tree, *FAST, "--cache-dir", cache_dir).returncode == 0
    fit = ["fit", "--clf", "svm", "--C", "0.1", "--cache-dir", cache_dir, "--results-dir", results]
    assert cli(*fit).returncode == 0
    [record] = list(results.glob("fits/*/record.json"))
    for broken in ("{}", "[1, 2]", record.read_text()[:100]):
        record.write_text(broken)
        listed = cli("results", "--results-dir", results)
        assert listed.returncode == 0 and "skipping record" in listed.stderr, listed.stderr
        again = cli(*fit)
        assert again.returncode == 0 and "reused" not in again.stdout, again.stderr
        assert json.loads(record.read_text())["kind"] == "fit"


def test_zero_byte_and_wrong_architecture_weights(tmp_path: Path) -> None:
    import torch
    import torchvision

    tree = make_tree(tmp_path / "tree", per_class=2)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    args = ["extract", "--data", tree, "--image-size", "32", "--workers", "0", "-q", "--cache-dir", tmp_path / "c"]
    assert_one_clear_line(cli(*args, "--model", "resnet18", "--weights", empty), "is not a loadable weights file")
    other = tmp_path / "resnet18_weights.pt"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    line = assert_one_clear_line(
        cli(*args, "--model", "mobilenet_v2", "--weights", other, "--backend", "torch"), "does not fit mobilenet_v2"
    )
    assert "another architecture" in line


def test_orphan_partial_and_repeated_damage_and_stale_temporary_files(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    cache_dir = tmp_path / "cache"
    args = ["extract", "--data", tree, *FAST, "--split", "train", "--cache-dir", cache_dir]
    assert cli(*args, env=env(TLFEAT_FLUSH_EVERY="4")).returncode == 0
    [final] = list(cache_dir.glob("*.h5"))
    # A run killed between the final rename and the clean-up leaves its .partial beside the file.
    proc = subprocess.run(
        [sys.executable, "-c", _KEEP_PARTIAL, *map(str, args), "--cache-dir", str(tmp_path / "other")],
        env=env(TLFEAT_FLUSH_EVERY="4"),
    )
    assert proc.returncode == 0
    orphan = next((tmp_path / "other").glob("*.partial"))
    shutil.copytree(orphan, final.with_name(final.name + ".partial"))
    listing = cli("ls", "--cache-dir", cache_dir)
    assert "partial" not in listing.stdout, listing.stdout
    # Damaged twice: both damaged files are kept, neither overwritten.
    for _ in range(2):
        final.write_bytes(final.read_bytes()[:300])
        assert cli(*args).returncode == 0
    assert len(list(cache_dir.glob("*.damaged*"))) == 2
    # A fit killed mid-write left a temporary classifier file: the next fit of that config removes it.
    results = tmp_path / "results"
    assert cli("extract", "--data", tree, *FAST, "--split", "test", "--cache-dir", cache_dir).returncode == 0
    fit = ["fit", "--clf", "logreg", "--C", "1", "--cache-dir", cache_dir, "--results-dir", results]
    assert cli(*fit).returncode == 0
    [record] = list(results.glob("fits/*/record.json"))
    stale = record.parent / ".classifier.npz.999999999.tmp"
    stale.write_bytes(b"half")
    record.unlink()
    assert cli(*fit).returncode == 0 and not stale.exists()


_KEEP_PARTIAL = textwrap.dedent(
    """
    import shutil, sys
    from tlfeat import writer
    original = writer.Writer.finish
    def finish(self, extra):
        kept = self.partial.with_name(self.partial.name + ".keep")
        shutil.copytree(self.partial, kept)
        out = original(self, extra)
        kept.rename(self.partial)
        return out
    writer.Writer.finish = finish
    from tlfeat_cli.main import cli
    cli(sys.argv[1:], prog_name="tlfeat")
    """
)


def test_models_calls_a_corrupt_weights_file_corrupt(tmp_path: Path) -> None:
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"not the weights")
    proc = cli("models", env=env(TORCH_HOME=str(tmp_path / "torch")))
    assert proc.returncode == 0, proc.stderr
    line = next(row for row in proc.stdout.splitlines() if row.startswith("resnet18 "))
    assert "corrupt" in line and "hub-cache" not in line


@pytest.mark.parametrize("how", HOW)
def test_disk_filled_by_another_process_during_assembly(tmp_path: Path, how: str) -> None:
    """The space for the whole file is reserved before HDF5 writes: filling the disk right after that
    changes nothing; filling it right before gives one clear line. Never a crash (exit 139).
    On a real tmpfs, mounted or (needing no rights) in a user namespace: fallocate's ENOSPC is the kernel's."""
    with tmpfs(tmp_path / "fs", "3m", how) as fs:
        mnt = fs.path
        tree = make_tree(tmp_path / "tree", per_class=8)
        for when in ("after", "before"):
            cache_dir = mnt / f"cache-{when}"
            args = ["extract", "--data", str(tree), *FAST, "--split", "train", "--cache-dir", str(cache_dir)]
            proc = subprocess.run(
                [sys.executable, "-c", _FILL_DISK, when, str(mnt / f"filler-{when}"), *args],
                env=env(),
                capture_output=True,
                text=True,
            )
            assert proc.returncode in (0, 2), (when, proc.returncode, proc.stderr)
            assert "Traceback" not in proc.stderr and "Segmentation" not in proc.stderr
            if when == "after":
                assert proc.returncode == 0, proc.stderr
                assert [e.status for e in catalog.scan(cache_dir)] == ["ok"]
            else:
                assert_one_clear_line(proc, "no space left on the device")
                assert not list(cache_dir.glob("*.h5")) and [e.status for e in catalog.scan(cache_dir)] == ["partial"]
            (mnt / f"filler-{when}").unlink()


# argv: WHEN FILLER tlfeat-args...: fill the disk just before or just after the writer reserves its space.
_FILL_DISK = textwrap.dedent(
    """
    import sys
    from tlfeat import writer
    when, filler = sys.argv[1], sys.argv[2]
    def fill():
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\\0" * 65536)
                    fh.flush()
            except OSError:
                pass
    original = writer._reserve
    def reserve(fd, size, path):
        if when == "before":
            fill()
        original(fd, size, path)
        if when == "after":
            fill()
    writer._reserve = reserve
    from tlfeat_cli.main import cli
    cli(sys.argv[3:], prog_name="tlfeat")
    """
)


def test_fit_names_a_damaged_file(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", per_class=4)
    cache_dir = tmp_path / "cache"
    assert cli("extract", "--data", tree, *FAST, "--cache-dir", cache_dir).returncode == 0
    [test] = [p for p in cache_dir.glob("*.h5") if "__test__" in p.name]
    test.write_bytes(test.read_bytes()[:500])
    proc = cli("fit", "--cache-dir", cache_dir, "--results-dir", tmp_path / "r")
    assert_one_clear_line(proc, test.name, "damaged")
