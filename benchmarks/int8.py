"""int8 under ONNX Runtime: is it faster here, and as accurate? (It is not kept: see the figures.)

    .venv/bin/python benchmarks/int8.py --limit 2000 --test-limit 2000

Static quantization (QDQ format, per-channel int8 weights, uint8 activations calibrated on the
dataset's first 256 training images) of tlfeat's MobileNetV2 export at 224 px. In one run: the
model alone on the same tensors in fp32 and int8 (2 threads, best of batch 16 and 64), and logistic
regression (C = 0.1) on features of each precision, MNIST and Fashion-MNIST (a fixed stratified
subset of training images and of test images), with McNemar's test between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def quantize(fp32: Path, int8: Path, calibration: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    prepped = int8.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
    quantize_static(
        str(prepped),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def features(session: object, split: object, prep: object) -> np.ndarray:
    from tlfeat.pool import decode_batch
    from tlfeat.preprocess import Normalizer

    normalize, out = Normalizer(prep), []  # type: ignore[arg-type]
    for start in range(0, len(split), 64):  # type: ignore[arg-type]
        crops = decode_batch(split.items(range(start, min(start + 64, len(split)))), prep, skip=False).crops  # type: ignore[attr-defined]
        out.append(session(normalize(crops))[0])  # type: ignore[operator]
    return np.concatenate(out)


def speed(session: object) -> float:
    best = 0.0
    for batch in (16, 64):
        x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
        session(x)  # type: ignore[operator]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 8:
            session(x)  # type: ignore[operator]
            n += batch
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist,fashion-mnist")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlfeat-int8")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/int8.json"))
    args = parser.parse_args()
    os.environ.setdefault("TLFEAT_OFFLINE", "1")
    from tlfeat import ExtractConfig, backbones, datasets, extract, inference, onnx_backend, stats
    from tlfeat.classifiers import make_classifier

    extract(
        ExtractConfig(model="mobilenet_v2", data="digits", limit=8, test_limit=8, cache_dir=args.work, progress=False)
    )
    spec = inference.ModelSpec(
        "mobilenet_v2", (None,), "IMAGENET1K_V1", None, None, False, 0, 224, "onnxruntime", "fp32", "cpu", args.work
    )
    fp32_path, int8_path = spec.onnx_path(), args.work / "mobilenet_v2_int8.onnx"
    prep = backbones.preprocessing("mobilenet_v2", None, None, fast_decode=False)
    report: dict[str, object] = {"datasets": {}}
    for data in args.data.split(","):
        train = datasets.load_split(data, "train", limit=args.limit)
        test = datasets.load_split(data, "test", limit=args.test_limit)
        from tlfeat.pool import decode_batch
        from tlfeat.preprocess import Normalizer

        calibration = [
            Normalizer(prep)(decode_batch(train.items(range(s, s + 32)), prep, skip=False).crops).copy()
            for s in range(0, 256, 32)
        ]
        quantize(fp32_path, int8_path, calibration)
        sessions = {"fp32": onnx_backend.Session(fp32_path), "int8": onnx_backend.Session(int8_path)}
        correct = {}
        for precision, session in sessions.items():
            clf = make_classifier("logreg", C=0.1).fit(features(session, train, prep), train.labels)
            correct[precision] = clf.predict(features(session, test, prep)) == test.labels
        a, b = correct["fp32"], correct["int8"]
        p = stats.mcnemar(a, b).p_value
        row = {
            "fp32": float(a.mean()),
            "int8": float(b.mean()),
            "points": float(100 * (b.mean() - a.mean())),
            "mcnemar_p": p,
            "n_test": int(len(a)),
        }
        report["datasets"][data] = row  # type: ignore[index]
        print(
            f"{data}: logreg fp32 {a.mean():.4f}, int8 {b.mean():.4f} ({row['points']:+.2f} points, McNemar p = {p:.3f})",
            flush=True,
        )
    rates = {k: speed(onnx_backend.Session(path, spin=True)) for k, path in (("fp32", fp32_path), ("int8", int8_path))}
    report["model_alone_img_s"] = rates
    print(
        f"model alone: fp32 {rates['fp32']:.1f} img/s, int8 {rates['int8']:.1f} img/s ({rates['int8'] / rates['fp32']:.2f}x)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
