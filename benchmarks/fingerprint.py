"""What checking a folder dataset for changes costs: listing, signature, row-by-row comparison.

Generates a tree of N small files (100 class folders), then times, in one run:
- listing it (`os.scandir` + one `stat` per file, what every `extract`, `ls` and `fit` does);
- its signature (the digest that says "unchanged" without comparing rows);
- a full row-by-row comparison with a stored index (what happens when the signature differs);
- the same after touching 1% of the files (their bytes are hashed to tell a touch from an edit);
- `--verify-content`: every file hashed.

    .venv/bin/python benchmarks/fingerprint.py --files 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_tree(root: Path, n: int, classes: int = 100) -> None:
    payload = b"\x89PNG" + b"\0" * 60  # empty-ish: what is measured is the listing, not the decoding
    for c in range(classes):
        folder = root / "train" / f"class{c:03d}"
        folder.mkdir(parents=True)
        for i in range(n // classes):
            (folder / f"{i:06d}.png").write_bytes(payload)
    (root / "val" / "class000").mkdir(parents=True)
    (root / "val" / "class000" / "x.png").write_bytes(payload)


def timed(fn, repeat: int = 3):  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args()

    from tlfeat import cache, datasets, fingerprint

    tmp = Path(tempfile.mkdtemp(prefix="tlfeat-fp-"))
    try:
        t0 = time.perf_counter()
        make_tree(tmp, args.files)
        made = time.perf_counter() - t0
        listing_s, split = timed(lambda: datasets.load_split(str(tmp), "train"))
        n = len(split)
        signature_s, signature = timed(split.signature)
        stored = cache.Index(
            labels=split.labels,
            ids=list(split.ids),
            class_names=list(split.class_names),
            stats=split.stats,
            digests=np.frombuffer(b"".join(split.content_digest(i) for i in range(n)), np.uint8).reshape(n, 32),
            skipped_index=np.zeros(0, np.int64),
            skipped_error=[],
        )
        quick_s, _ = timed(lambda: fingerprint.compare(stored, signature, split))
        rows_s, changes = timed(lambda: fingerprint.compare(stored, "forced-mismatch", split))
        assert not changes.stale
        touched = split.refs[::100]
        for path in touched:
            os.utime(path, ns=(1, 1))
        touched_split = datasets.load_split(str(tmp), "train")
        touch_s, changes = timed(lambda: fingerprint.compare(stored, "forced-mismatch", touched_split), repeat=1)
        assert not changes.stale and len(changes.digests) == len(touched)
        verify_s, _ = timed(lambda: fingerprint.compare(stored, signature, split, verify_content=True), repeat=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("list the folder (scandir + stat per file)", listing_s),
        ("signature of the listing", signature_s),
        ("unchanged: signature equal, nothing compared", quick_s),
        ("row-by-row comparison (signature differs)", rows_s),
        (f"row-by-row, {len(touched)} files touched (1%, their bytes hashed)", touch_s),
        ("--verify-content (every file hashed)", verify_s),
    ]
    print(f"{n} files ({made:.1f} s to create), best of 3 (the last two: one run)")
    for name, seconds in rows:
        print(f"  {name:<62} {seconds:7.3f} s   {seconds / n * 1e6:6.2f} us/file")
    print(
        f"  => a cache hit of this folder costs {listing_s + signature_s + quick_s:.2f} s; 1 M files ~{(listing_s + signature_s + quick_s) * 1e6 / n:.0f} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fingerprint.json").write_text(json.dumps({"files": n, "seconds": dict(rows)}, indent=2))


if __name__ == "__main__":
    main()
