"""Image folder trees: `root/train/<class>/*` with `root/val/` or `root/test/`, or flat `root/<class>/*`.

The tree is listed with `os.scandir` (one `stat` per file, nothing read), in the order of sorted
relative paths. Each file's size and modification time are kept: they are what tells a later run
that the folder changed. Hidden files and folders are ignored; class folders without an image are
dropped with a warning (an empty class would distort every per-class metric).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from tlfeat.datasets.base import SPLIT_SEED, ImageSplit, stratified_split
from tlfeat.errors import TlfeatError, printable
from tlfeat.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)
FLAT_TEST_FRACTION = 0.2


def _subdirs(root: Path) -> list[str]:
    try:
        with os.scandir(root) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise TlfeatError(f"cannot list {printable(str(root))}: {exc.strerror or exc}") from exc


def walk_images(folder: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image under `folder`, in sorted relative-path order.

    Symlinked folders are followed once (a link back up the tree is not followed again).
    """
    out: list[tuple[str, int, int]] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        real = os.path.realpath(path)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", printable(path), exc.strerror or exc)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    visit(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    st = entry.stat()
                    out.append((entry.path, st.st_size, st.st_mtime_ns))
            except OSError:
                continue  # vanished or unreadable while listing: not an image of this listing

    visit(folder)
    return out


def layout(root: Path) -> dict[str, Path | None]:
    """Which sub-folder holds which split. A flat tree maps every split to None."""
    subdirs = {name.lower(): root / name for name in _subdirs(root)}
    if "train" in subdirs and ("test" in subdirs or "val" in subdirs):
        out: dict[str, Path | None] = {"train": subdirs["train"]}
        out["test"] = subdirs.get("test") or subdirs["val"]
        if "test" in subdirs and "val" in subdirs:
            out["val"] = subdirs["val"]
        return out
    return {"train": None, "test": None}


def _classes_with_images(folder: Path) -> tuple[list[str], dict[str, list[tuple[str, int, int]]]]:
    # Measured on 100k files: threads overlapping the stat calls are 2-3x slower (the per-file Python
    # work holds the GIL between short system calls), so one thread lists the tree.
    found = {name: walk_images(str(folder / name)) for name in _subdirs(folder)}
    empty = [name for name, files in found.items() if not files]
    if empty:
        log.warning(
            "%s: ignoring %d class folder(s) without images: %s",
            printable(str(folder)),
            len(empty),
            ", ".join(printable(e) for e in empty[:5]),
        )
    return [name for name in found if found[name]], found


def load_folder(root: Path, split: str) -> ImageSplit:
    root = Path(os.path.abspath(root))
    splits = layout(root)
    if split not in splits:
        raise TlfeatError(f"{printable(str(root))} has no {split!r} split; it has {', '.join(splits)}")
    train_dir = splits["train"]
    if train_dir is not None:
        classes, found = _classes_with_images(train_dir)
        folder = splits[split]
        assert folder is not None
        present = classes
        if folder != train_dir:
            present, found = _classes_with_images(folder)
        unknown = [c for c in present if c not in classes]
        if unknown:
            raise TlfeatError(
                f"{printable(str(folder))} has images of class(es) {', '.join(map(printable, unknown[:5]))} that "
                f"{printable(str(train_dir))} has none of; every class needs training images"
            )
        files = [(f, label) for label, c in enumerate(classes) for f in found.get(c, [])]
        source = str(folder)
    else:
        classes, found = _classes_with_images(root)
        every = [(f, label) for label, c in enumerate(classes) for f in found[c]]
        labels = np.asarray([label for _, label in every], dtype=np.int64)
        train, test = (
            stratified_split(labels, FLAT_TEST_FRACTION, ids=[p[len(str(root)) + 1 :] for (p, _, _), _ in every])
            if len(every)
            else (np.zeros(0, int), np.zeros(0, int))
        )
        files = [every[i] for i in (train if split == "train" else test)]
        source = f"{root} (flat tree, stratified 80/20 split, seed {SPLIT_SEED})"
    if not classes:
        raise TlfeatError(
            f"{printable(str(root))} has no class folders with images; expected root/train/<class>/* or root/<class>/*"
        )
    if not files:
        raise TlfeatError(
            f"{printable(str(root))}: no images found for split {split!r} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    prefix = len(str(root)) + 1
    return ImageSplit(
        dataset=str(root),
        split=split,
        class_names=tuple(classes),
        labels=np.asarray([label for _, label in files], dtype=np.int64),
        ids=tuple(path[prefix:] for (path, _, _), _ in files),
        source=source,
        kind="files",
        refs=tuple(path for (path, _, _), _ in files),
        stats=np.asarray([(size, mtime) for (_, size, mtime), _ in files], dtype=np.int64).reshape(-1, 2),
    )
