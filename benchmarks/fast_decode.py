"""Large photos: decoding a 4000 x 3000 JPEG at reduced size (fast decode, the default: DCT-domain scaling)
against a full decode, for speed, for the features, and for the accuracy of a classifier on them.

    .venv/bin/python benchmarks/fast_decode.py --train 400 --test 200
    .venv/bin/python benchmarks/fast_decode.py --quick     # 16 + 16 photos: checks that it runs


The photos are 4000 x 3000 JPEGs (quality 90, like a phone's): a random crop of one of
scikit-image's sample photographs, upscaled, with an MNIST digit drawn over it in a random colour;
the label is the digit. In one run: `tlfeat extract` end to end (MobileNetV2, ONNX Runtime, 224 px,
the export already made) with fast decoding (the default) and with `--no-fast-decode`, the cosine similarity of each image's
two feature vectors, and logistic regression (C = 1) trained and tested on each, with McNemar's
test between the two classifiers on the same test images. First, in this process, the decode alone
(decode, resize and crop of one photo, no network): full, the default, and the earlier
rule (drafted down to the resize itself, which lost the antialiasing: the default no longer does it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SIZE = (4000, 3000)


def make_set(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    import skimage.data
    from PIL import Image

    from tlfeat import datasets

    marker = root / f".made-{n_train}-{n_test}"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    for split, n in (("train", n_train), ("test", n_test)):
        digits = datasets.load_split("mnist", "train" if split == "train" else "test", limit=n)
        assert digits.arrays is not None
        for i in range(n):
            photo = photos[int(rng.integers(len(photos)))]
            w, h = photo.size
            cw, ch = int(w * 0.6), int(h * 0.6)
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            background = photo.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.BICUBIC)
            mask = Image.fromarray(digits.arrays[i]).resize((SIZE[1], SIZE[1]), Image.BICUBIC)
            colour = Image.new("RGB", (SIZE[1], SIZE[1]), tuple(int(c) for c in rng.integers(0, 256, 3)))
            background.paste(colour, ((SIZE[0] - SIZE[1]) // 2, 0), mask)
            folder = root / split / str(int(digits.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            background.save(folder / f"{i:05d}.jpg", quality=90)
    marker.touch()
    return root


def decode_costs(root: Path, n: int = 12, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per photo to decode, resize and crop (one process, no network): full decode, the
    default's draft rule, and the earlier rule (draft to the resize, then resize the reduced image)."""
    import io

    from PIL import Image

    from tlfeat import backbones, images

    prep = backbones.preprocessing("mobilenet_v2", None, None, fast_decode=True)
    full = backbones.preprocessing("mobilenet_v2", None, None, fast_decode=False)
    photos = [p.read_bytes() for p in sorted(root.glob("train/*/*.jpg"))[:n]]

    def earlier(data: bytes) -> object:
        img = Image.open(io.BytesIO(data))
        if min(img.size) >= 2 * prep.resize_size:
            img.draft("RGB", (prep.resize_size, prep.resize_size))
        return prep.resize_crop(images.to_rgb(img))

    ways = {
        "full": lambda d: full.crop_of(d, "x"),
        "default": lambda d: prep.crop_of(d, "x"),
        "earlier_rule": earlier,
    }
    out = {}
    for name, way in ways.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for data in photos:
                way(data)
            best = min(best, (time.perf_counter() - t0) / len(photos))
        out[name] = best * 1000
    return out


def tlfeat_extract(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "tlfeat_cli.main", "extract", "--model", "mobilenet_v2", "-q", *map(str, args)]


def extract(root: Path, cache: Path, fast: bool) -> float:
    """Seconds to extract the photo set; fast decoding is the default, `--no-fast-decode` turns it off."""
    cmd = tlfeat_extract("--data", root, "--cache-dir", cache, *([] if fast else ["--no-fast-decode"]))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TLFEAT_OFFLINE": "1"})
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlfeat-fast-decode")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/fast_decode.json"))
    parser.add_argument("--quick", action="store_true", help="16 + 16 photos: a smoke test of the script")
    args = parser.parse_args()
    if args.quick:
        args.train, args.test = 16, 16
    os.environ.setdefault("TLFEAT_OFFLINE", "1")
    from tlfeat import load_features, stats
    from tlfeat.classifiers import make_classifier

    t0 = time.perf_counter()
    root = make_set(args.work / f"photos-{args.train}-{args.test}", args.train, args.test)
    print(
        f"{args.train} + {args.test} photos of {SIZE[0]} x {SIZE[1]} ({time.perf_counter() - t0:.0f} s to make)",
        flush=True,
    )
    costs = decode_costs(root)
    print(
        "decode + resize + crop, ms per photo: "
        + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
        + f" (default {costs['full'] / costs['default']:.2f}x faster than full, "
        f"earlier rule {costs['full'] / costs['earlier_rule']:.2f}x)",
        flush=True,
    )
    n = args.train + args.test
    cache = args.work / "cache"
    # The export, made once on a few digits so that neither timed run pays for it.
    subprocess.run(
        tlfeat_extract("--data", "digits", "--limit", "8", "--test-limit", "8", "--cache-dir", cache), check=True
    )
    results = {}
    for fast in (False, True):
        for path in cache.glob("mobilenet_v2__photos*"):
            path.unlink()
        seconds = extract(root, cache, fast)
        train = load_features("mobilenet_v2", str(root), "train", cache)
        test = load_features("mobilenet_v2", str(root), "test", cache)
        clf = make_classifier("logreg", C=1.0).fit(train.X, train.y)
        pred = clf.predict(test.X)
        results[fast] = {"seconds": seconds, "img_s": n / seconds, "train": train, "test": test, "pred": pred}
        print(
            f"fast_decode={fast}: {seconds:.1f} s, {n / seconds:.1f} img/s, logreg accuracy {np.mean(pred == test.y):.4f}",
            flush=True,
        )
    full, fast_ = results[False], results[True]
    X_full = np.vstack([full["train"].X, full["test"].X])
    X_fast = np.vstack([fast_["train"].X, fast_["test"].X])
    cosine = (X_full * X_fast).sum(1) / np.linalg.norm(X_full, axis=1) / np.linalg.norm(X_fast, axis=1)
    y = full["test"].y
    test = stats.mcnemar(full["pred"] == y, fast_["pred"] == y)
    acc = {k: float(np.mean(v["pred"] == y)) for k, v in (("full", full), ("fast", fast_))}
    ci = {k: stats.wilson(int(round(a * len(y))), len(y)) for k, a in acc.items()}
    print(
        f"speed-up {full['seconds'] / fast_['seconds']:.2f}x; feature cosine mean {cosine.mean():.4f}, min {cosine.min():.4f}"
    )
    print(
        f"accuracy full {acc['full']:.4f} {ci['full']}, fast {acc['fast']:.4f} {ci['fast']}; McNemar p = {test.p_value:.3f} (b={test.b}, c={test.c})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "images": n,
                "decode_ms_per_photo": costs,
                "seconds": {"full": full["seconds"], "fast": fast_["seconds"]},
                "cosine_mean": float(cosine.mean()),
                "cosine_min": float(cosine.min()),
                "accuracy": acc,
                "ci95": ci,
                "mcnemar_p": test.p_value,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
