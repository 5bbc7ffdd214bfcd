from __future__ import annotations

import json

import pytest
import torch

from tlfeat import backbones
from tlfeat.errors import TlfeatError

# The penultimate-layer sizes published for these architectures.
DOCUMENTED_DIMS = {
    "alexnet": 4096,
    "vgg16": 4096,
    "vgg19": 4096,
    "resnet18": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "densenet121": 1024,
    "densenet161": 2208,
    "densenet169": 1664,
    "googlenet": 1024,
    "mobilenet_v2": 1280,
    "mobilenet_v3_large": 1280,
    "mobilenet_v3_small": 1024,
    "efficientnet_b0": 1280,
    "squeezenet1_1": 512,
    "convnext_tiny": 768,
}


def test_every_studied_backbone_is_registered() -> None:
    assert set(DOCUMENTED_DIMS) == set(backbones.STUDIED)
    assert len(backbones.available_models()) >= 60  # every torchvision classifier


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DIMS))
def test_feature_dim_matches_documentation(name: str) -> None:
    assert backbones.feature_dim(name) == DOCUMENTED_DIMS[name]


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DIMS))
def test_extractor_forward_yields_documented_dim(name: str) -> None:
    """The wrapped model (head removed) really outputs (n, dim) on a forward pass."""
    model = backbones.build(name, device="meta")
    extractor = backbones.feature_extractor(model, name)
    with torch.no_grad():
        out = extractor(torch.zeros(2, 3, 224, 224, device="meta"))
    assert tuple(out.shape) == (2, DOCUMENTED_DIMS[name])


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1", "googlenet", "mobilenet_v3_small"])
def test_real_cpu_forward_of_untrained_models(name: str) -> None:
    torch.manual_seed(0)
    extractor = backbones.feature_extractor(backbones.build(name), name)
    with torch.inference_mode():
        out = extractor(torch.randn(2, 3, 96, 96))
    assert tuple(out.shape) == (2, DOCUMENTED_DIMS[name])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "layer", "dim"),
    [
        ("resnet50", "layer3", 1024),
        ("resnet50", "layer2", 512),
        ("vgg16", "features", 512),
        ("densenet121", "features.denseblock3", 1024),
        ("mobilenet_v2", "features.13", 96),
    ],
)
def test_earlier_layer_is_pooled(name: str, layer: str, dim: int) -> None:
    assert backbones.feature_dim(name, layer) == dim


def test_earlier_layer_stops_the_forward_pass() -> None:
    """Features of layer1 must not depend on the layers after it."""
    torch.manual_seed(0)
    model = backbones.build("resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        direct = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))).mean(dim=(2, 3))
    extractor = backbones.feature_extractor(model, "resnet18", "layer1")
    with torch.inference_mode():
        before = extractor(x)
        model.layer4[0].conv1.weight.zero_()
        after = extractor(x)
    assert torch.equal(before, after)
    assert torch.allclose(before, direct)


def test_unknown_layer_names_alternatives() -> None:
    with pytest.raises(TlfeatError, match=r"has no layer 'layer5'.*tlfeat models --layers"):
        backbones.feature_extractor(backbones.build("resnet18", device="meta"), "resnet18", "layer5")


def test_unknown_model_suggests_the_right_one() -> None:
    with pytest.raises(TlfeatError, match=r"unknown model 'resnet05'.*Did you mean resnet50"):
        backbones.check_model("resnet05")


def test_weights_entries_come_from_torchvision() -> None:
    assert backbones.default_weights_id("resnet50") == "IMAGENET1K_V1"
    assert backbones.weights_entry("resnet50", "IMAGENET1K_V2").resize_size == 232
    with pytest.raises(TlfeatError, match="valid entries: IMAGENET1K_V1, IMAGENET1K_V2"):
        backbones.weights_entry("resnet50", "IMAGENET22K")


def test_the_model_snapshot_equals_torchvisions_enums() -> None:
    """models.json (what tlfeat reads without importing torch) is torchvision's metadata, checked here."""
    import torchvision

    from tlfeat import modelinfo

    snapshot = json.loads(modelinfo.SNAPSHOT.read_text())
    assert snapshot["torchvision"] == torchvision.__version__.split("+")[0]
    live = modelinfo.from_torchvision()
    assert set(live) == set(snapshot["models"])
    for name, info in live.items():
        assert json.loads(json.dumps(info.encode())) == snapshot["models"][name], name
