"""Tiny models with random weights, saved in each hub's own file layout (no network).

Hugging Face's hub cache: `models--ORG--NAME/{refs/main, snapshots/<rev>/<file> -> ../../blobs/<sha256>}`,
which timm (its `timm/<arch>.<tag>` repositories), open_clip (`hf-hub:` names) and transformers share.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

REVISION = "0123456789abcdef0123456789abcdef01234567"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def put(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Store `files` as the hub would: blobs named by their sha256, linked from the snapshot."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    return snap


def timm_model(cache: Path, work: Path, arch: str = "test_vit") -> Any:
    """One of timm's test models (`test_vit`: 6 blocks, width 64) where timm keeps its r160_in1k weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(arch).eval()
    path = work / f"timm_{arch}.safetensors"
    save_file(model.state_dict(), str(path))
    put(cache, f"timm/{arch}.r160_in1k", {"model.safetensors": path})
    return model


def hf_dinov2(cache: Path, work: Path, registers: int = 0) -> tuple[Any, str, Path]:
    """A 2-layer DINOv2 (with register tokens if asked) written by save_pretrained, with its image processor."""
    import torch
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    torch.manual_seed(0)
    kw: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
    }
    if registers:
        model: Any = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kw, num_register_tokens=registers))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    out = work / f"dinov2-{registers}"
    model.save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    ).save_pretrained(out)
    repo = f"tiny/dinov2-reg{registers}" if registers else "tiny/dinov2"
    put(cache, repo, {p.name: p for p in out.iterdir()})
    return model.eval(), repo, out


def open_clip_tiny(cache: Path, work: Path) -> Any:
    """A CLIP with a 2-block ViT image tower (32 px, width 32, embedding 16) as an `hf-hub:` repository."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg).eval()
    weights = work / "open_clip_model.safetensors"
    save_file(model.state_dict(), str(weights))
    config = work / "open_clip_config.json"
    preprocess = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    config.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    put(cache, "tiny/clip", {"open_clip_model.safetensors": weights, "open_clip_config.json": config})
    return model


CUSTOM_MODULE = """
import torch
from torch import nn

PREPROCESSING = {"crop_size": 32, "resize_size": 36, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def make():
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 12, 3, stride=2), nn.ReLU()),
    )
    return net, PREPROCESSING
"""


def all_hubs(cache: Path, work: Path) -> dict[str, Any]:
    dino, repo, folder = hf_dinov2(cache, work)
    reg, reg_repo, _ = hf_dinov2(cache, work, registers=4)
    return {
        "timm": timm_model(cache, work),
        "timm_convnext": timm_model(cache, work, "test_convnext"),
        "dinov2": dino,
        "dinov2_repo": repo,
        "dinov2_folder": folder,
        "dinov2_reg": reg,
        "dinov2_reg_repo": reg_repo,
        "clip": open_clip_tiny(cache, work),
    }
