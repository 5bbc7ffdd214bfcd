"""Real pretrained MobileNetV2 (fetched from a registry package) against a plain torchvision run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tlfeat import ExtractConfig, extract, weights
from tlfeat.errors import TlfeatError, WeightsNotFound


@pytest.fixture(scope="module")
def mobilenet_weights() -> weights.ResolvedWeights:
    return weights.resolve("mobilenet_v2")


def test_mobilenet_v2_resolves_offline_with_verified_hash(mobilenet_weights: weights.ResolvedWeights) -> None:
    assert mobilenet_weights.weights_id == "IMAGENET1K_V1"
    assert mobilenet_weights.sha256 is not None and mobilenet_weights.sha256.startswith("b0353104")
    assert mobilenet_weights.path is not None and mobilenet_weights.path.is_file()


def test_features_match_plain_torchvision_forward(
    photos: Path, tmp_path: Path, mobilenet_weights: weights.ResolvedWeights
) -> None:
    [train, _test] = extract(
        ExtractConfig(
            model="mobilenet_v2", data=str(photos), workers=0, batch_size=3, cache_dir=tmp_path, progress=False
        )
    )
    assert train.X.dtype == np.float32 and train.X.shape == (4, 1280)

    # The reference: torchvision's model and transforms, used as its documentation shows.
    entry = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = torchvision.models.mobilenet_v2()
    assert mobilenet_weights.path is not None
    model.load_state_dict(torch.load(mobilenet_weights.path, weights_only=True))
    model.eval()
    preprocess = entry.transforms()
    batch = torch.stack(
        [preprocess(Image.open(photos / "train" / c / f"{c}.png").convert("RGB")) for c in train.class_names]
    )
    with torch.inference_mode():
        pooled = torch.nn.functional.adaptive_avg_pool2d(model.features(batch), 1).flatten(1)
        logits = model.classifier(pooled)
    order = [train.ids.index(f"train/{c}/{c}.png") for c in train.class_names]
    np.testing.assert_allclose(train.X[order], pooled.numpy(), rtol=1e-4, atol=1e-4)

    # And the weights are really ImageNet's: the cat is a cat (classes 281-285), the cup a cup.
    top5 = logits.topk(5).indices
    cat = train.class_names.index("chelsea")
    assert set(top5[cat].tolist()) & set(range(281, 286))
    coffee = train.class_names.index("coffee")
    assert set(top5[coffee].tolist()) & {504, 967, 968}  # coffee mug, espresso, cup


@pytest.mark.parametrize(("model", "size"), [("mobilenet_v2", None), ("mobilenet_v2", 112), ("efficientnet_b0", None)])
def test_worker_and_batch_halves_of_preprocessing_equal_torchvisions_bit_for_bit(
    photos: Path, model: str, size: int | None
) -> None:
    """Workers send resized uint8 crops; the batch is normalised in the main process. Same bits."""
    import skimage.data
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    from tlfeat.backbones import preprocessing
    from tlfeat.preprocess import Normalizer

    prep = preprocessing(model, None, size)
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("train/*/*.png"))]
    images.append(Image.fromarray(skimage.data.camera()).convert("RGB"))  # grey, 512 x 512
    images.append(images[0].resize((37, 900)))  # tall and smaller than the crop on one side
    images.append(images[0].resize((20, 15)))  # smaller than the crop on both sides: zero padding
    torchvision_transform = ImageClassification(
        crop_size=prep.crop_size,
        resize_size=prep.resize_size,
        mean=prep.mean,
        std=prep.std,
        interpolation=InterpolationMode(prep.interpolation),
        antialias=prep.antialias,
    )
    reference = torch.stack([torchvision_transform(img) for img in images]).numpy()
    # The same transform without torch: uint8 crops (what decoding workers send), normalised in one buffer.
    halves = Normalizer(prep)(np.stack([prep.resize_crop(img) for img in images]))
    assert halves.dtype == np.float32 and halves.shape == reference.shape
    assert np.array_equal(halves, reference)


def test_missing_weights_name_the_three_ways(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFound) as info:
        weights.resolve("resnet18")
    message = str(info.value)
    assert "--weights FILE" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "internet" in message
    assert "\n" not in message


def test_hub_file_with_wrong_hash_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"not the real weights")
    with pytest.raises(TlfeatError, match="expected f37072fd"):
        weights.resolve("resnet18")


def test_explicit_custom_weights_file_loads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    path = tmp_path / "my_resnet18.pt"
    torch.save(source.state_dict(), path)
    resolved = weights.resolve("resnet18", weights_file=path)
    assert resolved.weights_id.startswith("file:") and resolved.source == "file"
    loaded = weights.build_with_weights("resnet18", resolved)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_weights_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": Path("/etc/passwd")}, path)  # a Path object: loading it needs unpickling
    resolved = weights.resolve("resnet18", weights_file=path)
    with pytest.raises(TlfeatError, match="not a loadable weights file"):
        weights.build_with_weights("resnet18", resolved)
