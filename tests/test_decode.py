"""The default decode (JPEG drafts of large photos) gives torchvision's features on real photos at every
size from 1x to 16x the resize; and files of an earlier draft rule are never reused as this one's."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tlfeat import backbones, images
from tlfeat.preprocess import Normalizer, Preprocessing

# scikit-image's sample photographs (real photos, not drawings).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# Short sides as multiples of the resize (256): below, at and just above every point where the draft
# scale changes (8x: 1/2, 16x: 1/4), and exactly twice, where the old rule lost the antialiasing.
MULTIPLES = (1, 1.5, 511 / 256, 2, 513 / 256, 3, 4, 6, 7.99, 8, 8.01, 12, 15.99, 16)


def _mirror_tiled(photo: Image.Image, short: int) -> Image.Image:
    """The photo at its own resolution, mirrored and repeated to the size: real detail at every size
    (an upscaled photo only has detail at the scale it was taken at, which hides aliasing)."""
    w, h = photo.size
    width, height = int(round(w * short / min(w, h))), int(round(h * short / min(w, h)))
    a = np.asarray(photo)
    row = np.concatenate([a, a[:, ::-1]], 1)
    block = np.concatenate([row, row[::-1]], 0)
    reps = (height // block.shape[0] + 1, width // block.shape[1] + 1, 1)
    return Image.fromarray(np.tile(block, reps)[:height, :width])


def _jpegs() -> list[tuple[str, bytes]]:
    import skimage.data

    out = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = photo.size
        for m in MULTIPLES:
            short = int(round(m * 256))
            scaled = photo.resize((int(round(w * short / min(w, h))), int(round(h * short / min(w, h)))), Image.LANCZOS)
            for how, img in (("resized", scaled), ("tiled", _mirror_tiled(photo, short))):
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                out.append((f"{name} {how} {img.size[0]}x{img.size[1]}", buf.getvalue()))
    return out


@pytest.mark.slow
def test_default_decode_gives_torchvisions_features_on_real_photos_at_1x_to_16x() -> None:
    import torch
    from torchvision.models import MobileNet_V2_Weights

    from tlfeat.weights import build_with_weights, resolve

    net = build_with_weights("mobilenet_v2", resolve("mobilenet_v2")).eval()
    net.classifier = torch.nn.Identity()
    reference = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()  # torchvision's own, on torchvision's decode
    prep = backbones.preprocessing("mobilenet_v2", None, None, fast_decode=True)
    assert prep.fast_decode and prep.resize_size == 256  # the default the test is about
    normalize = Normalizer(prep)
    worst: dict[str, float] = {}
    drafted = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread keeps this test's time predictable
    try:
        for name, data in _jpegs():
            ours = torch.from_numpy(normalize(prep.crop_of(data, name)[None]).copy())
            theirs = reference(Image.open(io.BytesIO(data)).convert("RGB"))[None]
            with torch.inference_mode():
                a, b = net(torch.cat([theirs, ours])).numpy()
            worst[name] = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            drafted += images.draft_scale(Image.open(io.BytesIO(data)).size, 256) > 1
    finally:
        torch.set_num_threads(threads)  # other tests' bits must not depend on this one
    assert drafted >= 8 * len(PHOTOS), "the large photos must be decoded at reduced scale (or this tests nothing)"
    bad = {k: round(v, 5) for k, v in worst.items() if v < 0.999}
    assert not bad, f"features below cosine 0.999 to torchvision's: {bad}"


def test_draft_scale_leaves_the_last_four_fold_step_to_the_antialiased_resize() -> None:
    assert images.draft_scale((512, 512), 256) == 1  # 2x: the old rule drafted here, without antialiasing
    assert images.draft_scale((4000, 3000), 256) == 2
    assert [images.draft_scale((s, s), 256) for s in (2047, 2048, 4095, 4096, 8192)] == [1, 2, 2, 4, 8]
    assert images.draft_scale((4000, 3000), None) == 1


def test_a_drafted_decode_keeps_the_full_images_geometry() -> None:
    """The box maps the full image into the reduced one: resize and crop land where a full decode's do."""
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut()).resize((2301, 2049))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=95)
    img, box = images.decode_draft(buf.getvalue(), "x", 256)
    assert img.size == (1151, 1025) and box == (0, 0, 2301 / 2, 2049 / 2)
    prep = backbones.preprocessing("mobilenet_v2", None, None, fast_decode=True)
    full = prep.resize_crop(images.decode(buf.getvalue(), "x")).astype(float)
    reduced = prep.resize_crop(img, box).astype(float)
    # Shifted by a pixel, the two crops of this detailed photo differ by far more than this.
    assert np.abs(full - reduced).mean() < 1.5
    assert np.abs(full[:, :, 1:] - reduced[:, :, :-1]).mean() > 3


def _old_rule_key(prep: Preprocessing) -> dict[str, Any]:
    """The preprocessing key fast-decoded files had before the draft rule changed (decode rule 1)."""
    key = prep.key()
    del key["decode_rule"]
    return key


def test_files_of_the_earlier_draft_rule_are_not_reused(tmp_path: Path) -> None:
    from tlfeat import cache
    from tlfeat.config import ExtractConfig
    from tlfeat.extraction import extract, plan

    root = tmp_path / "photos"
    for split in ("train", "val"):
        for i, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((300, 400, 3), 60 * i + 40, np.uint8)).save(root / split / cls / "x.jpg")
    cfg = ExtractConfig(
        model="mobilenet_v2", data=str(root), splits=("train",), untrained=True, image_size=32, cache_dir=tmp_path / "c"
    )
    (target, *_) = plan(cfg)
    prep = Preprocessing.from_key(target.key_fields["preprocessing"])
    assert target.key_fields["preprocessing"]["decode_rule"] == images.DECODE_RULE
    old_fields = {**target.key_fields, "preprocessing": _old_rule_key(prep)}
    assert cache.cache_key(old_fields) != target.key
    # A file made under the old rule (its key and stored fields): the new extraction does not take it.
    first = extract(cfg)
    made = first[0].path
    assert made is not None and made == target.path
    old_path = made.with_name(made.name.replace(target.key, cache.cache_key(old_fields)))
    made.rename(old_path)
    import h5py

    with h5py.File(old_path, "r+") as h5:
        h5.attrs["key"] = cache.cache_key(old_fields)
        h5.attrs["key_fields"] = json.dumps(old_fields, sort_keys=True, default=str)
    again = extract(cfg)
    assert not again[0].reused and again[0].path == target.path
    # Named datasets hold pixels, which no decode rule touches: their keys stay those of earlier versions.
    (digits, *_) = plan(ExtractConfig(model="mobilenet_v2", data="digits", splits=("train",), cache_dir=tmp_path / "c"))
    assert digits.key_fields["preprocessing"]["fast_decode"] is True
    assert "decode_rule" not in digits.key_fields["preprocessing"]
