"""Image folder trees: `root/train/<class>/*` with `root/val/` or `root/test/`, or flat `root/<class>/*`.

The tree is listed with `os.scandir` (one `stat` per file, nothing read), in the order of sorted
relative paths. Each file's size and modification time are kept: they are what tells a later run
that the folder changed. Hidden files and folders are ignored; class folders without an image are
dropped with a warning (an empty class would distort every per-class metric).

Links are followed at most once per real folder and real file (device and inode), over the whole
tree, every split at once: a link back into the tree or up to a folder that holds it is never
followed (it would list images again under another class, or test images as training ones), and
an image reached twice (a link, a hard link) is listed once: where it really is (not through a
link), else at its first place in train, val, test order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlfeat.datasets.base import SPLIT_SEED, ImageSplit, stratified_split
from tlfeat.errors import TlfeatError, did_you_mean, printable
from tlfeat.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)
FLAT_TEST_FRACTION = 0.2
SPLIT_NAMES = ("train", "val", "test")

File = tuple[str, int, int]  # path, size, mtime_ns


def _subdirs(root: Path) -> list[str]:
    try:
        with os.scandir(root) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise TlfeatError(f"cannot list {printable(str(root))}: {exc.strerror or exc}") from exc


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class _Walk:
    """One listing of a dataset tree: every folder asked for, links followed once, each file once."""

    root: str  # the dataset root, resolved
    dirs: set[tuple[int, int]] = field(default_factory=set)
    owner: dict[tuple[int, int], tuple[bool, int]] = field(default_factory=dict)  # file -> (via a link, place)
    found: list[tuple[str, File, tuple[int, int], bool]] = field(default_factory=list)  # group, file, inode, via link
    refused: list[str] = field(default_factory=list)  # links not followed

    def folder(self, group: str, path: str, via_link: bool = False) -> None:
        """List the images under `path` as members of `group` (depth first, sorted; no recursion, so
        a tree thousands of folders deep is listed like any other)."""
        stack: list[tuple[Iterator[os.DirEntry[str]], bool]] = []
        self._enter(stack, path, via_link)
        while stack:
            entries, linked = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            if entry.name.startswith("."):
                continue
            try:
                link = entry.is_symlink()
                if entry.is_dir():
                    if not link or self._may_follow(entry.path):
                        self._enter(stack, entry.path, linked or link)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    st = entry.stat()
                    self._file(group, (entry.path, st.st_size, st.st_mtime_ns), (st.st_dev, st.st_ino), linked or link)
            except OSError:
                continue  # vanished, unreadable or a link loop while listing: not an image of this listing

    def _enter(self, stack: list[tuple[Iterator[os.DirEntry[str]], bool]], path: str, via_link: bool) -> None:
        """Push the sorted entries of the folder `path`, unless this real folder was listed already."""
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in self.dirs:
                return
            self.dirs.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", printable(path), exc.strerror or exc)
            return
        stack.append((iter(entries), via_link))

    def _may_follow(self, link: str) -> bool:
        """A linked folder is followed unless it lies in the tree or holds the tree."""
        target = os.path.realpath(link)
        if _inside(target, self.root) or _inside(self.root, target):
            self.refused.append(link)
            return False
        return True

    def _file(self, group: str, file: File, inode: tuple[int, int], via_link: bool) -> None:
        place = len(self.found)
        self.found.append((group, file, inode, via_link))
        kept = self.owner.get(inode)
        if kept is None or (kept[0] and not via_link):  # where it really is beats a link to it
            self.owner[inode] = (via_link, place)

    def files(self) -> dict[str, list[File]]:
        """Each group's images, each real file listed once."""
        out: dict[str, list[File]] = {}
        twice = 0
        for place, (group, file, inode, _) in enumerate(self.found):
            if self.owner[inode][1] != place:
                twice += 1
                continue
            out.setdefault(group, []).append(file)
        if twice:
            log.warning(
                "%s: %d image(s) reached more than once (links or hard links) are listed once, where they really are",
                printable(self.root),
                twice,
            )
        if self.refused:
            log.warning(
                "%s: not following %d link(s) back into the dataset or up to a folder holding it (first: %s)",
                printable(self.root),
                len(self.refused),
                printable(self.refused[0]),
            )
        return out


def walk_images(folder: str) -> list[File]:
    """(path, size, mtime_ns) of every image under `folder`, in sorted relative-path order, each once."""
    walk = _Walk(os.path.realpath(folder))
    walk.folder("", folder)
    return walk.files().get("", [])


def layout(root: Path) -> dict[str, Path | None]:
    """Which sub-folder holds which split. A flat tree maps every split to None."""
    names = _subdirs(root)
    subdirs: dict[str, Path] = {}
    for name in names:
        lower = name.lower()
        if lower in SPLIT_NAMES and lower in subdirs:
            raise TlfeatError(
                f"{printable(str(root))} has both {printable(subdirs[lower].name)}/ and {printable(name)}/; split "
                "folders are matched without regard to case, so merge them or rename one"
            )
        if lower in SPLIT_NAMES:
            subdirs[lower] = root / name
    if "train" in subdirs and ("test" in subdirs or "val" in subdirs):
        out: dict[str, Path | None] = {"train": subdirs["train"]}
        out["test"] = subdirs.get("test") or subdirs["val"]
        if "test" in subdirs and "val" in subdirs:
            out["val"] = subdirs["val"]
        real: dict[str, str] = {}
        for split, folder in out.items():
            assert folder is not None
            same = real.setdefault(os.path.realpath(folder), split)
            if same != split:
                raise TlfeatError(
                    f"{printable(str(folder))} is the same folder as {printable(str(out[same]))} (a link); "
                    "the splits must hold different images"
                )
        return out
    return {"train": None, "test": None}


def _classes(folders: dict[str, Path], root: Path) -> tuple[dict[str, list[str]], dict[tuple[str, str], list[File]]]:
    """The class folders of each split folder and their images, every split listed in one walk."""
    walk = _Walk(os.path.realpath(root))
    classes: dict[str, list[str]] = {}
    for split, folder in folders.items():
        classes[split] = _subdirs(folder)
        for name in classes[split]:
            path = folder / name
            if os.path.islink(path) and not walk._may_follow(str(path)):
                continue
            walk.folder(f"{split}\0{name}", str(path), os.path.islink(path))
    files = walk.files()
    found = {(split, name): files.get(f"{split}\0{name}", []) for split in classes for name in classes[split]}
    for split, folder in folders.items():
        empty = [name for name in classes[split] if not found[(split, name)]]
        if empty:
            log.warning(
                "%s: ignoring %d class folder(s) without images: %s",
                printable(str(folder)),
                len(empty),
                ", ".join(printable(e) for e in empty[:5]),
            )
        classes[split] = [name for name in classes[split] if found[(split, name)]]
    return classes, found


def _named_hint(root: Path) -> str:
    from tlfeat.datasets.named import named_datasets

    name = root.name.lower().replace("_", "-")
    if name in named_datasets():
        return f" (a path that exists is always read as a folder; for the named dataset write --data named:{name})"
    return ""


def load_folder(root: Path, split: str) -> ImageSplit:
    # Measured on 100k files: threads overlapping the stat calls are 2-3x slower (the per-file Python
    # work holds the GIL between short system calls), so one thread lists the tree.
    root = Path(os.path.abspath(root))
    splits = layout(root)
    if split not in splits:
        raise TlfeatError(
            f"{printable(str(root))} has no {split!r} split; it has {', '.join(splits)}."
            + did_you_mean(split, list(splits))
        )
    train_dir = splits["train"]
    if train_dir is not None:
        folders = {s: f for s, f in splits.items() if f is not None}
        classes_of, found = _classes(folders, root)
        classes = classes_of["train"]
        present = classes_of[split]
        unknown = [c for c in present if c not in classes]
        if unknown:
            raise TlfeatError(
                f"{printable(str(splits[split]))} has images of class(es) {', '.join(map(printable, unknown[:5]))} "
                f"that {printable(str(train_dir))} has none of; every class needs training images"
            )
        files = [(f, label) for label, c in enumerate(classes) for f in found.get((split, c), [])]
        source = str(splits[split])
    else:
        classes_of, found = _classes({"": root}, root)
        classes = classes_of[""]
        every = [(f, label) for label, c in enumerate(classes) for f in found[("", c)]]
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
            f"{printable(str(root))} has no class folders with images; expected root/train/<class>/* or "
            f"root/<class>/*{_named_hint(root)}"
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
