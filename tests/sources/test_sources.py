"""Every source against its own library: features equal the library's forward pass, preprocessing its
own transform, blocks its own grouping; names, keys and file names stay what they were for torchvision."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tlfeat import backbones, extraction, strategies, weights
from tlfeat.config import ExtractConfig, FinetuneConfig
from tlfeat.errors import TlfeatError

from . import hubs


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hubs")
    made = hubs.all_hubs(root / "hf", root)
    made["cache"] = root / "hf"
    return made


@pytest.fixture(autouse=True)
def _hf_cache(hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))


def features(spec: str, x: torch.Tensor, layers: Any = None, pool: str | None = None) -> Any:
    resolved = weights.resolve(spec)
    model = weights.build_with_weights(spec, resolved)
    with torch.no_grad():
        return backbones.feature_extractor(model, spec, layers, pool)(x)


# --------------------------------------------------------------------------- torchvision stays as it was

# Computed on main (84fa014) before sources existed: `extraction.plan(ExtractConfig(**config))`.
PINNED = [
    ({"model": "mobilenet_v2", "backend": "torch"}, "train", "mobilenet_v2__digits__train__ebf4c3736641a84b.h5"),
    ({"model": "mobilenet_v2", "backend": "torch"}, "test", "mobilenet_v2__digits__test__bd2c5d4815b4ce40.h5"),
    ({"model": "mobilenet_v2", "backend": "onnxruntime", "image_size": 64, "limit": 100}, "train", "mobilenet_v2__digits__train__bb11fef146b47d04.h5"),
    (
        {"model": "resnet50", "backend": "torch", "layer": "layer3,penultimate", "image_size": 112, "test_limit": 50, "fast_decode": False},
        "test",
        "resnet50__digits__layer3__test__22f144b54dc4b95d.h5",
    ),
    (
        {"model": "resnet50", "backend": "torch", "layer": "layer3,penultimate", "image_size": 112, "test_limit": 50, "fast_decode": False},
        "train",
        "resnet50__digits__train__52b43a4c89c72e36.h5",
    ),
    ({"model": "resnet18", "backend": "torch", "untrained": True, "seed": 3}, "test", "resnet18__digits__test__e0ae8ffe1baa9cc5.h5"),
    (
        {"model": "efficientnet_b0", "backend": "torch", "weights_id": "IMAGENET1K_V1", "subset_seed": 2, "limit": 10},
        "train",
        "efficientnet_b0__digits__train__e83792ddde15f2c7.h5",
    ),
    (
        {"model": "vit_b_16", "backend": "torch", "weights_id": "IMAGENET1K_SWAG_E2E_V1", "splits": ("test",)},
        "test",
        "vit_b_16__digits__test__64ac04933a165e69.h5",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("config", "split", "name"), PINNED)
def test_torchvision_cache_file_names_and_keys_are_unchanged(
    config: dict[str, Any], split: str, name: str, tmp_path: Path
) -> None:
    targets = extraction.plan(ExtractConfig(data="digits", cache_dir=tmp_path, **config))
    assert name in [t.path.name for t in targets if t.split == split]


def test_finetune_run_folders_of_torchvision_models_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name the code before backbone sources gave. The images' signature is pinned: it holds the
    path and time of scikit-learn's digits file, which differ from one installation to the next."""
    from tlfeat import finetune

    monkeypatch.setattr(finetune, "images_signature", lambda cfg: "0" * 64)
    cfg = FinetuneConfig(
        model="mobilenet_v2", data="digits", strategy="head", epochs=1, image_size=32, limit=100, results_dir=tmp_path
    )
    assert finetune.run_dir(cfg)[0].name == "mobilenet_v2__digits__finetune-head__seed0__64bebe1eb7383c92"


def test_names_split_into_source_and_variant_without_ambiguity() -> None:
    assert backbones.split_source("resnet18") == ("torchvision", "resnet18")
    assert backbones.split_source("timm:resnet18") == ("timm", "resnet18")
    assert backbones.split_source("custom:pkg.mod:make") == ("custom", "pkg.mod:make")
    assert backbones.split_variant("resnet18:untrained") == ("resnet18", True)
    assert backbones.split_variant("timm:resnet18:untrained") == ("timm:resnet18", True)
    assert backbones.split_variant("timm:resnet18") == ("timm:resnet18", False)
    for spec in ("hf:facebook/dinov2-small", "open_clip:ViT-B-32/laion2b_s34b_b79k", "custom:a.b:c", "timm:x__y"):
        slug = backbones.slug(spec)
        assert "/" not in slug and ":" not in slug and "__" not in slug, slug
    assert backbones.slug("mobilenet_v2") == "mobilenet_v2"


def test_unknown_names_say_where_to_look() -> None:
    with pytest.raises(
        TlfeatError, match=r"unknown model 'timm:convnext_tinny'.*Did you mean convnext_tiny.*--source timm"
    ):
        backbones.resolve("timm:convnext_tinny")
    with pytest.raises(TlfeatError, match=r"unknown model 'resnet05'.*Did you mean resnet50"):
        backbones.resolve("resnet05")
    with pytest.raises(TlfeatError, match="not in the Hugging Face cache"):
        backbones.resolve("hf:nobody/nothing")


# --------------------------------------------------------------------------- timm


@pytest.mark.parametrize(("arch", "layer", "index"), [("test_vit", "blocks.2", 2), ("test_convnext", "stages.1", 1)])
def test_timm_features_equal_forward_head_pre_logits(hub: dict[str, Any], arch: str, layer: str, index: int) -> None:
    """ConvNeXt's pre-logits are pooled, then normed: not the mean of its last feature map."""
    model = hub["timm" if arch == "test_vit" else "timm_convnext"]
    x = torch.randn(2, 3, 160, 160)
    got = features(f"timm:{arch}", x, [layer, None])
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        inter = model.forward_intermediates(x, indices=[index], intermediates_only=True)[0].mean(dim=(2, 3))
    torch.testing.assert_close(got[1], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0], inter, rtol=0, atol=1e-6)
    assert weights.resolve(f"timm:{arch}").source == "hf-cache"


def test_timm_token_pooling(hub: dict[str, Any]) -> None:
    vit = hub["timm"]
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = vit.forward_features(x)
    prefix = vit.num_prefix_tokens
    torch.testing.assert_close(features("timm:test_vit", x, pool="cls"), tokens[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(features("timm:test_vit", x, pool="mean"), tokens[:, prefix:].mean(1), rtol=0, atol=1e-6)
    both = features("timm:test_vit", x, pool="cls+mean")
    assert both.shape == (2, 2 * tokens.shape[-1])
    assert backbones.resolve("timm:test_vit").pooling(None, "mean") == "mean"


def test_timm_preprocessing_is_its_pretrained_cfg_bit_for_bit(hub: dict[str, Any]) -> None:
    from timm.data import create_transform, resolve_data_config

    from tlfeat.preprocess import Normalizer

    prep = backbones.preprocessing("timm:test_vit", None, None)
    transform = create_transform(**resolve_data_config({}, model=hub["timm"]))
    rng = np.random.default_rng(0)
    for size in ((300, 200), (150, 170), (90, 400)):
        img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        ours = Normalizer(prep)(prep.resize_crop(img)[None])[0]
        np.testing.assert_allclose(ours, transform(img).numpy(), rtol=0, atol=2e-6)


def test_timm_blocks_are_its_group_matcher(hub: dict[str, Any]) -> None:
    bb = backbones.resolve("timm:test_vit")
    model = bb.build()
    blocks = bb.blocks(model)
    assert len(blocks) == 7  # stem (patch embedding, class token, position embedding) + 6 transformer blocks
    assert "cls_token" in blocks[0] and all(p.startswith("blocks.5.") for p in blocks[-1] if "norm." not in p)
    strategies.replace_head(model, "timm:test_vit", 3)
    strategies.apply(model, "timm:test_vit", strategies.parse("freeze:3"), lr=0.1)
    assert not model.cls_token.requires_grad and not model.blocks[1].attn.qkv.weight.requires_grad
    assert model.blocks[2].attn.qkv.weight.requires_grad and model.head.weight.requires_grad
    assert model.head.out_features == 3


# --------------------------------------------------------------------------- Hugging Face transformers


def test_hf_features_equal_pooler_output_and_hidden_states(hub: dict[str, Any]) -> None:
    x = torch.randn(2, 3, 32, 32)
    spec = "hf:" + hub["dinov2_repo"]
    got = features(spec, x, [None, "encoder.layer.0"])
    with torch.no_grad():
        out = hub["dinov2"](pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(got[0], out.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], out.hidden_states[1][:, 1:].mean(1), rtol=0, atol=1e-6)
    resolved = weights.resolve(spec)
    assert resolved.source == "hf-cache" and resolved.weights_id == f"rev:{hubs.REVISION[:12]}"


def test_hf_register_tokens_are_left_out_of_the_mean(hub: dict[str, Any]) -> None:
    x = torch.randn(2, 3, 32, 32)
    spec = "hf:" + hub["dinov2_reg_repo"]
    with torch.no_grad():
        tokens = hub["dinov2_reg"](pixel_values=x).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 16
    torch.testing.assert_close(features(spec, x, pool="mean"), tokens[:, 5:].mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(features(spec, x, pool="cls"), tokens[:, 0], rtol=0, atol=1e-6)


def test_hf_local_folder_and_its_image_processor(hub: dict[str, Any]) -> None:
    from transformers import AutoImageProcessor

    spec = f"hf:{hub['dinov2_folder']}"
    resolved = weights.resolve(spec)
    assert resolved.source == "local" and resolved.weights_id.startswith("file:")
    prep = backbones.preprocessing(spec, None, None)
    assert (prep.crop_size, prep.resize_size, prep.interpolation) == (32, 36, "bicubic")
    processor = AutoImageProcessor.from_pretrained(str(hub["dinov2_folder"]))
    from tlfeat.preprocess import Normalizer

    rng = np.random.default_rng(1)
    for size in ((80, 60), (40, 90)):
        img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        ours = Normalizer(prep)(prep.resize_crop(img)[None])[0]
        theirs = processor(images=img, return_tensors="np")["pixel_values"][0]
        assert np.abs(ours - theirs).max() < 0.1 and np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.995


def test_hf_file_of_another_architecture_is_refused(hub: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 7)}, str(bad))
    resolved = weights.resolve("hf:" + hub["dinov2_repo"], weights_file=bad)
    with pytest.raises(TlfeatError, match="do not fit"):
        weights.build_with_weights("hf:" + hub["dinov2_repo"], resolved)


# --------------------------------------------------------------------------- open_clip


def test_open_clip_features_equal_encode_image_before_and_after_the_projection(hub: dict[str, Any]) -> None:
    clip = hub["clip"]
    x = torch.randn(2, 3, 32, 32)
    got = features("open_clip:hf-hub:tiny/clip", x, [None, "pre-projection", "transformer.resblocks.0"])
    with torch.no_grad():
        ref = clip.encode_image(x)
    torch.testing.assert_close(got[0], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1] @ clip.visual.proj, ref, rtol=0, atol=1e-5)
    assert got[2].shape == (2, 32)
    bb = backbones.resolve("open_clip:hf-hub:tiny/clip")
    assert bb.cut(None) != bb.cut("pre-projection")  # the key says which side of the projection


def test_open_clip_preprocessing_is_its_own(hub: dict[str, Any]) -> None:
    from open_clip.transform import image_transform

    from tlfeat.preprocess import Normalizer

    prep = backbones.preprocessing("open_clip:hf-hub:tiny/clip", None, None)
    theirs = image_transform(32, is_train=False, mean=hubs.OPENAI_MEAN, std=hubs.OPENAI_STD)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (70, 50, 3), dtype=np.uint8))
    ours = Normalizer(prep)(prep.resize_crop(img)[None])[0]
    np.testing.assert_allclose(ours, theirs(img).numpy(), rtol=0, atol=2e-6)


def test_open_clip_blocks_and_head(hub: dict[str, Any]) -> None:
    bb = backbones.resolve("open_clip:hf-hub:tiny/clip")
    model = bb.build()
    blocks = bb.blocks(model)
    assert len(blocks) == 4 and "base.proj" in blocks[-1] and "base.class_embedding" in blocks[0]
    bb.replace_head(model, 5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


# --------------------------------------------------------------------------- a user's own module


def test_custom_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_tiny_net.py").write_text(hubs.CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "custom:my_tiny_net:make"
    assert backbones.preprocessing(spec, None, None).resize_size == 36
    x = torch.randn(2, 3, 32, 32)
    got = features(spec, x)
    net, _ = sys.modules["my_tiny_net"].make()
    with torch.no_grad():
        ref = net.eval()(x).mean(dim=(2, 3))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert weights.resolve(spec).weights_id.startswith("code:")
    with pytest.raises(TlfeatError, match="has no function 'nope'"):
        backbones.resolve("custom:my_tiny_net:nope")


def test_a_missing_package_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlfeat.backbones import base

    monkeypatch.setattr(base, "_installed", lambda package: False)
    with pytest.raises(TlfeatError, match=r"timm: models need the timm package.*pip install 'tlfeat\[timm\]'"):
        backbones.build("timm:test_vit")
