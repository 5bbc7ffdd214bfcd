"""Is `--decode device` faithful? Features and accuracy against the CPU (PIL) pipeline, in one run.

    .venv/bin/python benchmarks/decode_agreement.py                          # CPU device: libjpeg-turbo + torch resize
    python3 benchmarks/decode_agreement.py --device cuda                     # a GPU: nvJPEG
    .venv/bin/python benchmarks/decode_agreement.py --data mnist --limit 5000 --test-limit 2000

1. Photos: real MobileNetV2 (ImageNet weights) features of real photos re-encoded as JPEGs at three
   sizes, decoded by the device pipeline and by the CPU pipeline (with and without its reduced-size
   DCT decoding of large photos): per-image cosine.
2. A real dataset (digits by default; in-memory images, uploaded as uint8 and resized on the device):
   logistic regression (C chosen once, on the CPU features) on each feature set, the test accuracy of
   each and McNemar's paired test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def photo_folder(root: Path) -> Path:
    """scikit-image's sample photos where installed, else the photos scikit-learn and matplotlib ship."""
    from PIL import Image

    try:
        import skimage.data

        names = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field")
        sources = [(n, Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in names]
    except ImportError:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from gpu import source_photos

        sources = [(p.stem, Image.open(p).convert("RGB")) for p in source_photos()]
    for k, (name, image) in enumerate(sources):
        for scale in (0.35, 1.0, 1.9):
            folder = root / f"class_{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC).save(
                buf, "JPEG", quality=90
            )
            (folder / f"{name}_{scale}.jpg").write_bytes(buf.getvalue())
    return root


def cosines(a: Any, b: Any) -> np.ndarray:
    assert a.ids == b.ids
    return (a.X * b.X).sum(1) / np.linalg.norm(a.X, axis=1) / np.linalg.norm(b.X, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="digits", help="the real dataset of part 2")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None, help="default: the weights' 224")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args()
    os.environ.setdefault("TLFEAT_OFFLINE", "1")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlfeat.config import ExtractConfig
    from tlfeat.extraction import extract
    from tlfeat.stats import mcnemar, wilson

    work = Path(tempfile.mkdtemp(prefix="tlfeat-agreement-"))
    base = dict(model="mobilenet_v2", device=args.device, backend="torch", progress=False, workers=args.workers)
    out: dict[str, Any] = {"device": args.device, "date": time.strftime("%Y-%m-%d")}

    photos = photo_folder(work / "photos")
    runs = {
        name: extract(ExtractConfig(data=str(photos), cache_dir=work / name, **base, **kw))  # type: ignore[arg-type]
        for name, kw in (
            ("cpu", {"decode": "cpu"}),
            ("cpu-whole", {"decode": "cpu", "fast_decode": False}),
            ("device", {"decode": "device"}),
        )
    }
    for ref in ("cpu-whole", "cpu"):
        c = np.concatenate([cosines(a, b) for a, b in zip(runs[ref], runs["device"], strict=True)])
        out[f"photos: device vs {ref}"] = {"n": len(c), "min": float(c.min()), "median": float(np.median(c))}
        print(
            f"photos ({len(c)}): cosine of --decode device to --decode {ref}: min {c.min():.6f}, median {np.median(c):.6f}"
        )

    data = dict(data=args.data, limit=args.limit, test_limit=args.test_limit, image_size=args.image_size, **base)
    correct, accuracy, seconds, tests = {}, {}, {}, {}
    C = None
    for decode in ("cpu", "device"):
        t0 = time.perf_counter()
        train, test = extract(ExtractConfig(decode=decode, cache_dir=work / f"data-{decode}", **data))  # type: ignore[arg-type]
        seconds[decode] = time.perf_counter() - t0
        if C is None:  # chosen once, on the CPU pipeline's features, and used for both
            grid = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                                {"logisticregression__C": [0.01, 0.1, 1.0]}, cv=3)  # fmt: skip
            C = grid.fit(train.X, train.y).best_params_["logisticregression__C"]
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000)).fit(train.X, train.y)
        correct[decode] = clf.predict(test.X) == test.y
        accuracy[decode] = float(correct[decode].mean())
        low, high = wilson(int(correct[decode].sum()), len(test.y))
        print(f"{args.data} --decode {decode}: test accuracy {accuracy[decode]:.4f} ({low:.4f}-{high:.4f}), n_train {len(train.y)}, "
              f"n_test {len(test.y)}, C {C}, extraction {seconds[decode]:.0f} s")  # fmt: skip
        tests[decode] = test
    c = cosines(tests["cpu"], tests["device"])
    out["dataset: test features cosine"] = {"min": float(c.min()), "median": float(np.median(c))}
    print(f"{args.data} test features: cosine of device to cpu: min {c.min():.6f}, median {np.median(c):.6f}")
    test_result = mcnemar(correct["cpu"], correct["device"])
    out[args.data] = {
        "accuracy": accuracy,
        "C": C,
        "mcnemar_p": test_result.p_value,
        "b": test_result.b,
        "c": test_result.c,
    }
    print(f"McNemar (cpu vs device, same test images): b={test_result.b} c={test_result.c} p={test_result.p_value:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode_agreement-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    shutil.rmtree(work)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
