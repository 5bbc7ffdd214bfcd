"""The tensor pipeline (`--decode device`) and the replicas, on every device there is.

Each test that touches a device runs on the CPU everywhere and on CUDA where a GPU is present (the
CUDA variants are skipped, with the reason, elsewhere): the same code, decode_jpeg with libjpeg-turbo
on the CPU and nvJPEG on a GPU. Faithfulness is measured with the real pretrained MobileNetV2 on
real photos and on a real dataset.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tree
from tests.robustness.helpers import assert_one_clear_line, cli
from tlfeat import cache, replicas
from tlfeat.config import ExtractConfig
from tlfeat.devicepipe import Fetched, Prepared, jpeg_kind
from tlfeat.errors import TlfeatError
from tlfeat.extraction import extract, plan


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


GPUS = _cuda_count()
needs_cuda = pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU here; the cpu variant of this test ran instead")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=needs_cuda)]


def _jpeg(image: Image.Image, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def _without_tables(data: bytes) -> bytes:
    """A JPEG whose markers look whole but which no decoder can decode (its quantisation tables removed)."""
    out, i = bytearray(data[:2]), 2
    while data[i + 1] != 0xDA:
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if data[i + 1] != 0xDB:
            out += data[i : i + 2 + length]
        i += 2 + length
    return bytes(out + data[i:])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --------------------------------------------------------------------------- which JPEGs the device takes


def test_jpeg_kind_sends_only_plain_colour_jpegs_to_the_device() -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    baseline = _jpeg(rgb)
    assert jpeg_kind(baseline) == "baseline"
    assert jpeg_kind(_jpeg(rgb, progressive=True)) == "progressive"
    assert jpeg_kind(_jpeg(rgb.convert("L"))) is None  # grey: the CPU path makes it RGB
    assert jpeg_kind(_jpeg(rgb.convert("CMYK"))) is None
    assert jpeg_kind(baseline[: len(baseline) // 2]) is None  # cut short: the CPU path names it
    assert jpeg_kind(baseline[:-2] + b"\0\0") is None  # no end-of-image marker
    assert jpeg_kind(b"\xff\xd8\xff") is None
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert jpeg_kind(png.getvalue()) is None
    twelve_bit = bytearray(baseline)
    sof = twelve_bit.index(b"\xff\xc0")
    twelve_bit[sof + 4] = 12  # sample precision
    assert jpeg_kind(bytes(twelve_bit)) is None
    lossless = bytearray(baseline)
    lossless[sof + 1] = 0xC3
    assert jpeg_kind(bytes(lossless)) is None


# --------------------------------------------------------------------------- faithful to the CPU pipeline


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's sample photos as JPEGs at three sizes: below the crop, ImageNet-like, and large
    enough for the CPU path's reduced-size (DCT) decoding."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field"):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for scale in (0.35, 1.0, 1.9):
            size = (int(image.width * scale), int(image.height * scale))
            folder = root / ("animal" if name in ("chelsea", "astronaut") else "thing")
            folder.mkdir(exist_ok=True)
            (folder / f"{name}_{scale}.jpg").write_bytes(_jpeg(image.resize(size, Image.Resampling.BICUBIC)))
    return root


@pytest.mark.parametrize("device", DEVICES)
def test_device_decoding_is_faithful_on_real_photos(
    photos: Path, tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real MobileNetV2 features of every photo within cosine 0.999 of the CPU (PIL) pipeline's,
    every JPEG decoded by decode_jpeg, in the same rows with the same fingerprints.

    The reference decodes every JPEG whole (--no-fast-decode), as decode_jpeg does: the CPU path's
    reduced-size decoding of photos of twice the resize and more is another approximation (its own
    features were at cosine 0.980 to a whole decode here, on a 512 x 512 photo)."""
    import torchvision.io

    decoded = []
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, **kw: decoded.append(len(data)) or real(data, **kw))
    base = dict(model="mobilenet_v2", data=str(photos), device=device, backend="torch", progress=False, batch_size=8)
    cpu = extract(ExtractConfig(**base, decode="cpu", fast_decode=False, cache_dir=tmp_path / "cpu"))
    assert decoded == []
    dev = extract(ExtractConfig(**base, decode="device", fast_decode=False, cache_dir=tmp_path / "device"))
    assert sum(decoded) == 18  # every photo, in batches
    for a, b in zip(cpu, dev, strict=True):
        assert a.ids == b.ids and np.array_equal(a.y, b.y)
        assert np.array_equal(cache.stored_index(a.path).digests, cache.stored_index(b.path).digests)
        assert _cosines(a.X, b.X).min() >= 0.999
        assert not np.array_equal(a.X, b.X)  # another decoder and resize: close, not the same bits


@pytest.mark.parametrize("device", DEVICES)
def test_formats_the_device_cannot_take_go_to_the_cpu_workers_in_their_rows(tmp_path: Path, device: str) -> None:
    """PNG (grey, RGBA, 16-bit), grey, CMYK and undecodable JPEGs beside device-decoded ones: the
    CPU workers' rows are the CPU pipeline's, in place, and a damaged file is skipped the same way."""
    tree = make_tree(tmp_path / "bugs", per_class=5)
    rng = np.random.default_rng(1)
    colour = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    extra = {
        "cmyk.jpg": _jpeg(colour.convert("CMYK")),
        "grey.jpg": _jpeg(colour.convert("L")),
        "progressive.jpg": _jpeg(colour, progressive=True),
        "damaged.jpg": _without_tables(_jpeg(colour)),
    }
    for split in ("train", "val"):
        for name, data in extra.items():
            (tree / split / "ants" / name).write_bytes(data)
    base = dict(
        model="resnet18", untrained=True, data=str(tree), device=device, backend="torch", image_size=32,
        on_error="skip", progress=False, batch_size=6, workers=1,
    )  # fmt: skip
    cpu = extract(ExtractConfig(**base, decode="cpu", fast_decode=False, cache_dir=tmp_path / "cpu"))
    dev = extract(ExtractConfig(**base, decode="device", cache_dir=tmp_path / "device"))
    for a, b in zip(cpu, dev, strict=True):
        assert a.ids == b.ids
        on_device = np.array([i.endswith(".jpg") and jpeg_kind((tree / i).read_bytes()) is not None for i in a.ids])
        assert on_device.sum() >= 4 and (~on_device).sum() >= 8
        assert np.array_equal(cache.stored_index(a.path).digests, cache.stored_index(b.path).digests)
        assert a.meta["skipped"] == b.meta["skipped"] and len(a.meta["skipped"]) == 1
        assert "damaged.jpg" in b.meta["skipped"][0]["error"]
        if device == "cpu":
            np.testing.assert_array_equal(a.X[~on_device], b.X[~on_device])
        else:
            assert _cosines(a.X[~on_device], b.X[~on_device]).min() >= 0.99999
        assert _cosines(a.X[on_device], b.X[on_device]).min() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_a_damaged_jpeg_stops_the_device_pipeline_with_one_line(tmp_path: Path, device: str) -> None:
    tree = make_tree(tmp_path / "bugs", per_class=4)
    (tree / "train" / "ants" / "damaged.jpg").write_bytes(_without_tables(_jpeg(Image.new("RGB", (30, 30)))))
    cfg = ExtractConfig(
        model="resnet18", untrained=True, data=str(tree), device=device, decode="device", image_size=32,
        cache_dir=tmp_path / "c", progress=False, workers=0,
    )  # fmt: skip
    with pytest.raises(TlfeatError, match="cannot decode image .*damaged.jpg"):
        extract(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_device_decoding_keeps_the_accuracy_on_a_real_dataset(tmp_path: Path, device: str) -> None:
    """digits (in-memory 8 x 8 images, uploaded as uint8 and resized on the device), real MobileNetV2:
    logistic regression on either feature set makes the same predictions, up to McNemar's test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlfeat.stats import mcnemar

    base = dict(model="mobilenet_v2", data="digits", device=device, image_size=64, progress=False, workers=0)
    correct = []
    feats = []
    for decode in ("cpu", "device"):
        train, test = extract(ExtractConfig(**base, decode=decode, cache_dir=tmp_path / decode))
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(train.X, train.y)
        correct.append(clf.predict(test.X) == test.y)
        feats.append(test.X)
    assert _cosines(*feats).min() >= 0.999
    assert min(c.mean() for c in correct) >= 0.9
    assert abs(correct[0].mean() - correct[1].mean()) <= 0.01
    assert mcnemar(correct[0], correct[1]).p_value >= 0.5


# --------------------------------------------------------------------------- the key


def test_decode_enters_the_key_only_where_it_changes_the_bits(tree: Path, tmp_path: Path) -> None:
    def names(**kw: Any) -> set[str]:
        cfg = ExtractConfig(model="resnet18", data=str(tree), backend="torch", cache_dir=tmp_path, **kw)
        return {t.path.name for t in plan(cfg)}

    def fields(**kw: Any) -> dict[str, Any]:
        cfg = ExtractConfig(model="resnet18", data=str(tree), backend="torch", cache_dir=tmp_path, **kw)
        return plan(cfg)[0].key_fields

    assert "decode" not in fields() and "decode" not in fields(decode="cpu")  # earlier files keep their keys
    assert names() == names(decode="cpu") == names(decode="auto")
    assert fields(decode="device")["decode"] == "device" and names(decode="device") != names()
    assert fields(device="cuda")["decode"] == "device"  # auto on CUDA
    assert names(device="cuda") == names(device="cuda", decode="device") != names(device="cuda", decode="cpu")
    assert names(device="cuda:0,1") == names(device="cuda") == names(device="cuda:1")  # one GPU or four: same bits


def test_the_machine_sets_the_defaults() -> None:
    from tlfeat import config, engine

    assert replicas.batch_for_memory(140 << 30) == replicas.MAX_BATCH  # an H200
    assert replicas.batch_for_memory(20 << 30) == 64  # 20 GiB free: 106 images fit, in whole micro-batches
    assert replicas.batch_for_memory(40 << 30) == 192
    assert replicas.batch_for_memory(1 << 30) == 64  # never below one micro-batch
    assert replicas.default_batch(["cpu"]) == 64
    assert engine.default_workers("cuda:0") == max(1, config.cores() - 1)
    assert engine.default_workers("cpu") == max(1, min(4, config.cores()))


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--device", "cuda:0,63", "--backend", "torch"], ["--device cuda:0,63"]),
        (["--device", "cuda:0,0"], ["names a GPU twice"]),
        (["--device", "cuda", "--decode", "device", "--engine", "ray"], ["--decode device runs with --engine local"]),
        (["--device", "cuda:0,1", "--engine", "ray"], ["--gpus-per-worker"]),
        (["--device", "mps", "--decode", "device"], ["--decode device needs --device cpu or cuda"]),
        (["--decode", "gpu"], ["--decode must be one of auto, cpu, device"]),
    ],
)
def test_device_mistakes_are_one_clear_line(tree: Path, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    if GPUS > 63 and "cuda:0,63" in args:
        pytest.skip("this machine has 64 GPUs")
    proc = cli("extract", "--model", "resnet18", "--untrained", "--data", tree, "--cache-dir", tmp_path, *args)
    assert_one_clear_line(proc, *needles)


# --------------------------------------------------------------------------- several devices, one writer


def test_replicas_standing_in_for_gpus_give_the_bits_of_one_device(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three model replicas (CPU stand-ins for three GPUs) share the batches; the file is the same,
    bit for bit, as one device's, rows in order."""
    base = dict(
        model="resnet18", untrained=True, data=str(tree), backend="torch", image_size=32, progress=False,
        batch_size=2, workers=1,
    )  # fmt: skip
    one = extract(ExtractConfig(**base, cache_dir=tmp_path / "one"))
    built: list[replicas.Replica] = []
    build = replicas.build
    monkeypatch.setattr(replicas, "build", lambda *a: built.extend(build(*a)) or built[-3:])
    monkeypatch.setattr(ExtractConfig, "devices", lambda self: ["cpu", "cpu", "cpu"])
    three = extract(ExtractConfig(**base, cache_dir=tmp_path / "three"))
    assert len(built) == 6  # three replicas for each split
    assert len({id(r.runner) for r in built[:3]}) == 3
    for a, b in zip(one, three, strict=True):
        assert a.path.name == b.path.name
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.X, b.X)
        assert np.array_equal(cache.stored_index(a.path).digests, cache.stored_index(b.path).digests)
    assert sum(r.batches for r in built[:3]) == 6  # 12 training images in batches of 2


@pytest.mark.skipif(GPUS < 2, reason=f"{GPUS} CUDA GPU(s) here; the stand-in replicas above ran instead")
def test_two_gpus_write_the_file_one_gpu_writes(tree: Path, tmp_path: Path) -> None:
    base = dict(model="resnet18", untrained=True, data=str(tree), image_size=32, progress=False, batch_size=2)
    one = extract(ExtractConfig(**base, device="cuda:0", cache_dir=tmp_path / "one"))
    two = extract(ExtractConfig(**base, device="cuda:0,1", cache_dir=tmp_path / "two"))
    for a, b in zip(one, two, strict=True):
        assert a.path.name == b.path.name and a.ids == b.ids
        np.testing.assert_array_equal(a.X, b.X)


@needs_cuda
def test_the_batch_on_a_gpu_fits_its_free_memory() -> None:
    batch = replicas.default_batch(["cuda:0"])
    assert 64 <= batch <= replicas.MAX_BATCH and batch % 64 == 0


class FakePreparer:
    """Stands in for a device's Preparer: the batch's row numbers as its 'pixels'."""

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self.fail_on: int | None = None
        self.seen: list[int] = []

    def __call__(self, fetched: Fetched) -> Prepared:
        import torch

        self.seen += [int(r) for r in fetched.rows]
        if self.fail_on is not None and self.fail_on in fetched.rows:
            raise TlfeatError(f"cannot decode image {self.fail_on}")
        return Prepared(fetched, torch.tensor(fetched.rows, dtype=torch.float32))


class FakeRunner:
    """A network whose feature of row r is [r, 2r]; hooks let a test hold or break it."""

    def __init__(self, before_start: Any = None, before_result: Any = None) -> None:
        self.before_start, self.before_result = before_start, before_result
        self.rows: list[int] = []

    def start(self, x: Any) -> Any:
        if self.before_start is not None:
            self.before_start(x)
        runner = self

        class Handle:
            def result(self) -> list[np.ndarray]:
                if runner.before_result is not None:
                    runner.before_result(x)
                runner.rows += [int(v) for v in x]
                return [np.stack([x.numpy(), 2 * x.numpy()], 1)]

        return Handle()


def _fetched(n_batches: int, size: int = 3) -> list[Fetched]:
    return [
        Fetched(k, np.arange(k * size, (k + 1) * size), np.zeros((size, 32), np.uint8), [""] * size)
        for k in range(n_batches)
    ]


def _check(chunks: list[Any], n_rows: int) -> None:
    rows = np.concatenate([c[0] for c in chunks])
    np.testing.assert_array_equal(rows, np.arange(n_rows))  # every row once, in order
    features = np.concatenate([c[1][0] for c in chunks])
    np.testing.assert_array_equal(features, np.stack([rows, 2 * rows], 1).astype(np.float32))


def test_results_come_back_in_row_order_whoever_finishes_first() -> None:
    """The replica holding batch 0 is held until the other one has finished two later batches."""
    finished_elsewhere = threading.Semaphore(0)

    def hold_first(x: Any) -> None:
        if 0 in x:
            for _ in range(2):
                assert finished_elsewhere.acquire(timeout=60), "the other replica never ran"

    def count(x: Any) -> None:
        if 0 not in x:
            finished_elsewhere.release()

    runners = [FakeRunner(before_result=lambda x: (hold_first(x), count(x))) for _ in range(2)]
    reps = [replicas.Replica(f"gpu{k}", r, FakePreparer()) for k, r in enumerate(runners)]  # type: ignore[arg-type]
    chunks = list(replicas.run(_fetched(8), 8, reps))
    _check(chunks, 24)
    assert all(r.batches >= 1 for r in reps) and sum(r.batches for r in reps) == 8


def test_a_replica_that_fails_mid_run_leaves_its_batches_to_the_others(caplog: pytest.LogCaptureFixture) -> None:
    failed = threading.Event()

    def break_down(x: Any) -> None:
        failed.set()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def wait_for_the_failure(x: Any) -> None:
        assert failed.wait(timeout=60), "the failing replica never got a batch"

    healthy = FakeRunner(before_result=wait_for_the_failure)
    broken = FakeRunner(before_start=break_down)
    reps = [replicas.Replica("gpu0", healthy, FakePreparer()), replicas.Replica("gpu1", broken, FakePreparer())]  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="tlfeat.replicas"):
        chunks = list(replicas.run(_fetched(7), 7, reps))
    _check(chunks, 21)
    assert sorted(healthy.rows) == list(range(21)) and broken.rows == []
    assert "replica gpu1 failed (CUDA error: an illegal memory access" in caplog.text


def test_with_every_replica_failed_the_run_stops_with_the_error() -> None:
    def break_down(x: Any) -> None:
        raise RuntimeError("CUDA error: device lost")

    reps = [replicas.Replica(f"gpu{k}", FakeRunner(before_start=break_down), FakePreparer()) for k in range(3)]  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="device lost"):
        list(replicas.run(_fetched(5), 5, reps))


def test_out_of_memory_is_one_line_naming_the_fix() -> None:
    def oom(x: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    reps = [replicas.Replica("cuda:0", FakeRunner(before_start=oom), FakePreparer())]  # type: ignore[arg-type]
    with pytest.raises(TlfeatError, match=r"cuda:0 ran out of memory .* lower --batch-size"):
        list(replicas.run(_fetched(2), 2, reps))


def test_an_image_error_stops_the_run_and_is_not_retried_elsewhere() -> None:
    preparers = [FakePreparer() for _ in range(2)]
    for p in preparers:
        p.fail_on = 10  # row 10 is in batch 3
    runners = [FakeRunner() for _ in range(2)]
    reps = [replicas.Replica(f"gpu{k}", r, p) for k, (r, p) in enumerate(zip(runners, preparers, strict=True))]  # type: ignore[arg-type]
    got = []
    with pytest.raises(TlfeatError, match="cannot decode image 10"):
        for chunk in replicas.run(_fetched(6), 6, reps):
            got.append(chunk)
    assert len(got) <= 3  # the batches before it, at most
    assert 10 not in runners[0].rows + runners[1].rows
    assert (preparers[0].seen + preparers[1].seen).count(10) == 1  # the other device did not try it again


# --------------------------------------------------------------------------- fine-tuning on the device


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_batches_made_on_the_device_equal_the_cpu_transform(tree: Path, device: str) -> None:
    import torch

    from tlfeat import backbones, datasets, training

    split = datasets.load_split(str(tree), "train", tree)
    prep = backbones.preprocessing("resnet18", None, 48)
    cpu = training.loader(split, training.EvalTransform(prep), 5, 0)
    pixels = training.loader(split, training.Pixels(prep, prep.crop_size), 5, 0)
    on_device = training.OnDevice(pixels, prep, "standard", device, seed=None)
    for (a, ya), (b, yb) in zip(cpu, on_device, strict=True):
        assert b.device.type == torch.device(device).type and b.shape == a.shape == (len(ya), 3, 48, 48)
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0 if device == "cpu" else 1e-6)
        assert torch.equal(yb.cpu(), ya)


@pytest.mark.parametrize("device", DEVICES)
def test_training_crops_on_the_device_follow_random_resized_crop(device: str) -> None:
    import torch

    from tlfeat import backbones, training

    prep = backbones.preprocessing("resnet18", None, 48)  # canvas 55 px, crop 48
    size = prep.resize_size
    boxes = training.random_boxes(4000, size, (0.08, 1.0), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all() and (w >= 1).all() and (h >= 1).all()
    area = w * h / size**2
    assert area.min() < 0.15 and area.max() > 0.9  # the whole 8-100% range is drawn
    ratio = (w / h)[area < 0.5]  # small boxes are never clipped by the canvas: their ratio is as drawn
    assert ratio.min() > 0.6 and ratio.max() < 1.6 and (ratio < 0.9).any() and (ratio > 1.1).any()
    again = training.random_boxes(4000, size, (0.08, 1.0), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)

    canvas = torch.arange(2 * 3 * size * size, dtype=torch.float32).reshape(2, 3, size, size) % 251
    batch = canvas.to(torch.uint8).to(device)
    crops = training.OnDevice(torch.utils.data.DataLoader([]), prep, "crop", device, seed=0)
    assert crops.train_crops(batch, torch.Generator().manual_seed(0)).shape == (2, 3, 48, 48)
    from torchvision.ops import roi_align

    # aligned boxes in pixel corners: the whole canvas at its own size is the canvas itself
    rois = torch.tensor([[0, 0, 0, size, size]], dtype=torch.float32, device=device)
    same = roi_align(batch[:1].float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(same, batch[:1].float(), rtol=0, atol=1e-4)
    flips = training.OnDevice(torch.utils.data.DataLoader([]), prep, "flip", device, seed=0)
    out = flips.train_crops(batch.repeat(8, 1, 1, 1), torch.Generator().manual_seed(3))
    centre = batch[:, :, 4:52, 4:52].float().repeat(8, 1, 1, 1)  # round(3.5) = 4, as torchvision's centre crop
    flipped = [not torch.equal(o, c) for o, c in zip(out, centre, strict=True)]
    assert all(torch.equal(o, c.flip(-1)) for o, c, f in zip(out, centre, flipped, strict=True) if f)
    assert 0 < sum(flipped) < 16


@pytest.mark.parametrize("device", DEVICES)
def test_fine_tuning_with_augmentation_on_the_device_in_bf16(
    tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlfeat import constraints, finetune, training
    from tlfeat.config import FinetuneConfig

    tree = make_tree(tmp_path / "t", per_class=6)
    import torch

    crops, autocast_in_training = [], []
    real = training.OnDevice.train_crops
    monkeypatch.setattr(training.OnDevice, "train_crops", lambda self, x, g: crops.append(len(x)) or real(self, x, g))
    loss = torch.nn.functional.cross_entropy

    def spy(logits: Any, y: Any, **kw: Any) -> Any:
        if logits.requires_grad:  # a training step
            autocast_in_training.append(torch.is_autocast_enabled(logits.device.type))
        return loss(logits, y, **kw)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    base = dict(
        model="resnet18", data=str(tree), strategy="full", untrained=True, epochs=1, image_size=32, workers=0,
        batch_size=4, precise_bn=1, device=device, results_dir=tmp_path / "r", progress=False,
    )  # fmt: skip
    plain = finetune.finetune_one(FinetuneConfig(**base, augment_on="cpu"))
    assert crops == [] and autocast_in_training and not any(autocast_in_training)
    autocast_in_training.clear()
    fast = finetune.finetune_one(FinetuneConfig(**base, augment_on="device", precision="bf16"))
    assert sum(crops) >= 8  # every training batch of the epoch (and the BatchNorm re-estimation)
    assert autocast_in_training and all(autocast_in_training)  # every step's forward pass and loss in bf16
    assert fast.record.params["precision"] == "bf16" and fast.record.params["augment_on"] == "device"
    assert fast.path != plain.path and fast.record.key != plain.record.key
    assert fast.record.details["history"][0]["train_loss"] != plain.record.details["history"][0]["train_loss"]
    assert 0 <= fast.record.metrics["accuracy"] <= 1

    if device == "cpu":  # runs made before these two options keep their keys: the default adds neither
        cfg = FinetuneConfig(**base)
        fields = {n: getattr(cfg, n) for n in constraints.key_fields(cfg) if n not in ("precision", "augment_on")}
        fields.update(
            data=str(tree), weights_file=None, weights="untrained:seed0", images=finetune.images_signature(cfg)
        )
        assert cache.cache_key({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}) == plain.record.key
