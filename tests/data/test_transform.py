"""vitedge.data.transform: the recorded evaluation transform against a reference written here with PIL.

The reference follows torchvision's documented eval pipeline (Resize(short side) → CenterCrop →
ToTensor → Normalize, as timm and DeiT build it) step by step; vitedge's output, taken back to
pixel space, must equal it to 1/255 for JPEG and PNG, grey and RGB, portrait and landscape.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from vitedge.data import PRESETS, Transform, make_transform, parse_transform_option, transform_from_metadata
from vitedge.errors import VitedgeError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, a bright disc and fine noise: edges and texture like a photo's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 90 + 128
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.04)[..., None] * 60
    return np.clip(base + disc + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def reference_pixels(path, size: int, crop_pct: float, interpolation: str, grey: bool) -> np.ndarray:
    """torchvision's eval transform written out with PIL: float pixels in [0, 1], HWC."""
    image = Image.open(path).convert("L" if grey else "RGB")
    width, height = image.size
    short = math.floor(size / crop_pct)
    if width <= height:
        target = (short, int(short * height / width))
    else:
        target = (int(short * width / height), short)
    if target != image.size:
        image = image.resize(target, FILTERS[interpolation])
    left = int(round((target[0] - size) / 2.0))
    top = int(round((target[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float64) / 255.0
    return array[..., None] if array.ndim == 2 else array


def to_pixels(tensor: np.ndarray, transform: Transform) -> np.ndarray:
    """vitedge's normalised CHW back to [0, 1] HWC."""
    chw = tensor * np.asarray(transform.std)[:, None, None] + np.asarray(transform.mean)[:, None, None]
    return np.moveaxis(chw, 0, -1)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
@pytest.mark.parametrize("shape", [(150, 100), (100, 150)], ids=["portrait", "landscape"])
@pytest.mark.parametrize("preset", ["deit", "deit-384", "lvvit", "swag", "fashion-mnist"])
def test_transform_equals_the_pil_reference(tmp_path, fmt, grey, shape, preset):
    pixels = photo_like(*shape, seed=shape[0] + grey)
    path = tmp_path / f"image.{fmt}"
    Image.fromarray(pixels[..., 0] if grey else pixels).save(path, **({"quality": 90} if fmt == "jpg" else {}))
    size = 28 if preset == "fashion-mnist" else 64
    in_chans = 1 if preset == "fashion-mnist" else 3
    mean, std = ((0.2860,), (0.3530,)) if in_chans == 1 else IMAGENET
    transform = make_transform(size, in_chans, mean, std, {"preset": preset})
    with Image.open(path) as image:
        out = transform(image)
    assert out.shape == (in_chans, size, size) and out.dtype == np.float32
    expected = reference_pixels(path, size, PRESETS[preset]["crop_pct"], PRESETS[preset]["interpolation"], in_chans == 1)
    assert np.abs(to_pixels(out, transform) - expected).max() <= 1 / 255


def test_geometry_is_timms(tmp_path):
    """DeiT at 224 px: short side to floor(224 / 0.875) = 256, centre crop; a 300x200 image becomes 384x256, crop at (80, 16)."""
    transform = make_transform(224, 3, *IMAGENET)
    assert (transform.preset, transform.crop_pct, transform.interpolation, transform.resize) == ("deit", 0.875, "bicubic", 256)
    marked = np.zeros((200, 300, 3), np.uint8)
    marked[:, 150:] = 255  # right half white: after the crop, columns 112 and up are white
    out = to_pixels(transform(Image.fromarray(marked)), transform)
    assert out[:, :100].max() < 0.02 and out[:, 125:].min() > 0.98
    assert make_transform(384, 3, *IMAGENET).resize == 384  # 384-px DeiT: crop_pct 1.0


def test_special_modes_convert_as_meant(tmp_path):
    transform = make_transform(32, 3, *IMAGENET, {"crop_pct": 1.0})
    grey_t = make_transform(32, 1, (0.5,), (0.5,))
    rgb = photo_like(32, 32, seed=3)
    plain = transform(Image.fromarray(rgb))
    # 16-bit grey: scaled to 8 bits (not clipped at 255)
    grey8 = rgb[..., 1]
    sixteen = Image.fromarray((grey8.astype(np.uint16) * 257))
    assert sixteen.mode.startswith("I")
    np.testing.assert_allclose(grey_t(sixteen), grey_t(Image.fromarray(grey8)), atol=1e-6)
    # palette and CMYK: what PIL's conversion to RGB makes of them
    palette = Image.fromarray(rgb).quantize(64)
    np.testing.assert_allclose(transform(palette), transform(palette.convert("RGB")), atol=1e-6)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    with Image.open(path) as image:
        assert image.mode == "CMYK"
        assert np.abs(to_pixels(transform(image), transform) - rgb / 255).max() < 0.1
    # alpha: transparent pixels are white (composited over white), opaque ones unchanged
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, :16] = 0
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    pixels = to_pixels(transform(rgba), transform)
    np.testing.assert_allclose(pixels[:, :16], 1.0, atol=1e-5)
    np.testing.assert_allclose(pixels[:, 16:], to_pixels(plain, transform)[:, 16:], atol=1e-5)
    assert np.abs(plain[:, :, :16] - transform(rgba)[:, :, :16]).max() > 0.5  # the check can fail
    # BGR models get the channels reversed
    bgr = make_transform(32, 3, IMAGENET[0][::-1], IMAGENET[1][::-1], {"crop_pct": 1.0, "channels": "BGR"})
    np.testing.assert_allclose(to_pixels(bgr(Image.fromarray(rgb)), bgr), rgb[..., ::-1] / 255, atol=1e-6)


def test_metadata_round_trip_and_old_artifacts():
    transform = make_transform(224, 3, *IMAGENET, parse_transform_option("lvvit,crop_pct=0.95"))
    assert (transform.preset, transform.crop_pct, transform.resize) == ("lvvit", 0.95, 235)
    record = transform.to_dict()
    assert Transform.from_dict(record) == transform
    meta = {"input": {"shape": [1, 3, 224, 224], "mean": list(IMAGENET[0]), "std": list(IMAGENET[1]), "transform": record}}
    assert transform_from_metadata(meta) == transform
    assert transform_from_metadata(meta, 160).size == 160
    old = {"input": {"shape": [1, 1, 28, 28], "mean": [0.286], "std": [0.353]}}  # written before input.transform
    legacy = transform_from_metadata(old)
    assert (legacy.preset, legacy.channels, legacy.size, legacy.mean) == ("fashion-mnist", "L", 28, (0.286,))
    vit = make_transform(224, 3, *IMAGENET, {"preset": "vit"})
    assert vit.mean == (0.5, 0.5, 0.5) and vit.crop_pct == 0.9


@pytest.mark.parametrize("overrides, message", [
    ({"crop_pct": 1.5}, "crop_pct must be in"),
    ({"crop_pct": 0}, "crop_pct must be in"),
    ({"interpolation": "cubic"}, "unknown interpolation 'cubic'"),
    ({"crop": "random"}, "unknown crop 'random'"),
    ({"preset": "resnet"}, "unknown transform preset 'resnet'"),
    ({"mean": (0.5,)}, "need 3 value"),
    ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
    ({"colour": "red"}, "unknown transform key"),
])
def test_bad_transforms_are_one_line(overrides, message):
    with pytest.raises(VitedgeError, match=message):
        make_transform(224, 3, *IMAGENET, overrides)


def test_bad_transform_option_text():
    with pytest.raises(VitedgeError, match="crop_pct must be a number"):
        parse_transform_option("crop_pct=wide")


def test_an_artifact_without_a_recorded_transform_still_validates(evit_artifact, tmp_path):
    """vitedge.json files from before input.transform: the default from their input shape and mean/std."""
    import json

    import vitedge
    from support import copy_artifact

    art = copy_artifact(evit_artifact, tmp_path / "old")
    meta = json.loads((art / "vitedge.json").read_text())
    recorded = meta["input"].pop("transform")
    (art / "vitedge.json").write_text(json.dumps(meta))
    section = vitedge.validate(art, "fashion-mnist", limit=16)
    assert section["passed"] and section["transform"] == recorded


def test_export_records_the_transform_flag_and_refuses_a_bad_one(tmp_path):
    import json

    from support import REPO, assert_clean_failure, run_cli

    model = REPO / "models" / "fmnist-evit.safetensors"
    result = run_cli("export", model, "-o", tmp_path / "art", "--transform", "crop_pct=0.9,interpolation=bicubic",
                     "--no-validate")
    assert result.exit_code == 0, result.stderr
    recorded = json.loads((tmp_path / "art" / "vitedge.json").read_text())["input"]["transform"]
    assert (recorded["preset"], recorded["crop_pct"], recorded["interpolation"], recorded["resize"]) == \
        ("fashion-mnist", 0.9, "bicubic", 31)
    for flag, message in [("resnet", "unknown transform preset 'resnet'"), ("crop_pct=2", "crop_pct must be in")]:
        line = assert_clean_failure(run_cli("export", model, "-o", tmp_path / "bad", "--transform", flag), tmp_path / "bad")
        assert message in line, line


def test_a_calibration_set_yaml_is_a_data_source():
    from vitedge.data.calibration_sets import SET_DIR
    from vitedge.data import load_dataset

    dataset = load_dataset("fmnist-train-512")
    assert len(dataset) == 512 and dataset.domain == "fashion-mnist" and dataset.labels_for(10) is not None
    assert len(load_dataset(str(SET_DIR / "fmnist-train-512.yaml"), limit=40)) == 40


def test_swag_preset_is_swags_eval_transform(tmp_path):
    """facebookresearch/SWAG imagenet_1k_eval.py: Resize(r, bicubic), CenterCrop(r), ImageNet mean/std, at r = 384."""
    path = tmp_path / "wide.png"
    Image.fromarray(photo_like(300, 500, seed=7)).save(path)
    transform = make_transform(384, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), {"preset": "swag"})
    assert (transform.resize, transform.interpolation, transform.mean, transform.std) == (384, "bicubic", *IMAGENET)
    with Image.open(path) as image:
        out = transform(image)
    assert out.shape == (3, 384, 384)
    assert np.abs(to_pixels(out, transform) - reference_pixels(path, 384, 1.0, "bicubic", False)).max() <= 1 / 255
    deit = make_transform(384, 3, *IMAGENET, {"preset": "deit"})  # a 0.875 crop margin: another picture
    with Image.open(path) as image:
        assert np.abs(deit(image) - out).max() > 0.5
