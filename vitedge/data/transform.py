"""The evaluation transform a checkpoint was trained with, as data: one description, one implementation.

timm's and the official repositories' evaluation pipeline: decode with PIL, convert to the
model's channels, resize the short side to ``floor(size / crop_pct)`` with the recorded
interpolation, centre-crop ``size`` x ``size``, scale to [0, 1], normalise with mean/std.
``vitedge.json`` records it under ``input.transform``; validation, calibration, ``predict``
on image files and the C++ sample all apply that record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from ..errors import VitedgeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROPS = ("center", "squash")
CHANNELS = {"RGB": 3, "BGR": 3, "L": 1}

# Evaluation transforms of the official repositories / timm's pretrained configs. ``size`` is the
# model's input size, filled in per model; mean/std default to the checkpoint's normalisation.
PRESETS: dict[str, dict] = {
    # DeiT (facebookresearch/deit datasets.py): Resize(int(size / 0.875), bicubic) + CenterCrop; ImageNet mean/std.
    "deit": {"crop_pct": 0.875, "interpolation": "bicubic", "crop": "center", "channels": "RGB"},
    # DeiT fine-tuned at 384 px (timm deit_*_patch16_384): no crop margin.
    "deit-384": {"crop_pct": 1.0, "interpolation": "bicubic", "crop": "center", "channels": "RGB"},
    # LV-ViT (zihangJiang/TokenLabeling, timm lvvit cfgs): crop_pct 0.9 at 224 px, 1.0 at 384/448 px.
    "lvvit": {"crop_pct": 0.9, "interpolation": "bicubic", "crop": "center", "channels": "RGB"},
    "lvvit-384": {"crop_pct": 1.0, "interpolation": "bicubic", "crop": "center", "channels": "RGB"},
    # LeViT (facebookresearch/LeViT, timm levit cfgs): crop_pct 0.9, bicubic.
    "levit": {"crop_pct": 0.9, "interpolation": "bicubic", "crop": "center", "channels": "RGB"},
    # MAE fine-tuned ViTs (facebookresearch/mae main_finetune.py): 224/256 at 224 px, bicubic.
    "mae": {"crop_pct": 0.875, "interpolation": "bicubic", "crop": "center", "channels": "RGB"},
    # The original ViT / AugReg weights (timm vit _cfg): crop_pct 0.9, bicubic, mean = std = 0.5.
    "vit": {"crop_pct": 0.9, "interpolation": "bicubic", "crop": "center", "channels": "RGB",
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    # SWAG (facebookresearch/SWAG imagenet_1k_eval.py): Resize(resolution, bicubic) + CenterCrop(resolution)
    # at the fine-tuned 384/512/518 px, ImageNet mean/std.
    "swag": {"crop_pct": 1.0, "interpolation": "bicubic", "crop": "center", "channels": "RGB",
             "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    # vitedge's Fashion-MNIST models: native 28 px grey, no crop margin (a 28 x 28 image passes unchanged).
    "fashion-mnist": {"crop_pct": 1.0, "interpolation": "bilinear", "crop": "center", "channels": "L"},
}


@dataclass(frozen=True)
class Transform:
    """Image → normalised float32 CHW: resize, centre crop, scale, normalise (``input.transform``)."""

    size: int
    crop_pct: float
    interpolation: str
    crop: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: str = "RGB"
    preset: str | None = None

    def __post_init__(self):
        check_transform(self)

    @property
    def in_chans(self) -> int:
        return CHANNELS[self.channels]

    @property
    def img_size(self) -> int:
        return self.size

    @property
    def resize(self) -> int:
        """The short side before cropping: ``floor(size / crop_pct)``, as timm computes it."""
        return math.floor(self.size / self.crop_pct)

    def with_size(self, size: int) -> Transform:
        """The same transform for another input size (dynamic-resolution graphs)."""
        return replace(self, size=size)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_dict(cls, values: dict, where: str = "input.transform") -> Transform:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in values.items() if k != "resize"}
        unknown = set(values) - known
        if unknown:
            raise VitedgeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        missing = {"size", "crop_pct", "interpolation", "crop", "mean", "std"} - set(values)
        if missing:
            raise VitedgeError(f"{where}: missing {', '.join(sorted(missing))}")
        try:
            return cls(**{**values, "mean": tuple(float(m) for m in values["mean"]),
                          "std": tuple(float(s) for s in values["std"])})
        except TypeError as exc:
            raise VitedgeError(f"{where}: {exc}") from None

    def describe(self) -> str:
        return (f"{self.channels} {self.size} px: short side to {self.resize} ({self.interpolation}), "
                f"{self.crop} crop {self.size}, crop_pct {self.crop_pct:g}")

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A decoded PIL image → float32 [C, size, size], normalised."""
        return self.normalise(self.pixels(image))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The resized, cropped image as uint8 [size, size, C] in the model's channel order (before scaling)."""
        image = to_mode(image, "L" if self.channels == "L" else "RGB")
        width, height = image.size
        scale = self.resize
        if self.crop == "squash":
            new_w = new_h = scale
        elif width <= height:
            new_w, new_h = scale, int(scale * height / width)
        else:
            new_w, new_h = int(scale * width / height), scale
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.uint8)
        array = array[..., None] if array.ndim == 2 else array
        return array[..., ::-1] if self.channels == "BGR" else array

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] (or [N, H, W, C]) → float32 CHW (NCHW), ``(pixels / 255 - mean) / std``."""
        x = pixels.astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def array(self, image: np.ndarray) -> np.ndarray:
        """``__call__`` for a uint8 array image, [H, W] grey or [H, W, 3|4] colour."""
        return self(image_from_array(image))


def check_transform(t: Transform) -> None:
    """One-line errors on a transform that cannot run."""
    if not isinstance(t.size, int) or isinstance(t.size, bool) or t.size < 1:
        raise VitedgeError(f"transform size must be a positive integer, got {t.size!r}")
    if not isinstance(t.crop_pct, (int, float)) or isinstance(t.crop_pct, bool) or not 0.0 < t.crop_pct <= 1.0:
        raise VitedgeError(f"transform crop_pct must be in (0, 1] (the crop's share of the resized short side), got {t.crop_pct!r}")
    if t.interpolation not in INTERPOLATIONS:
        raise VitedgeError(f"unknown interpolation '{t.interpolation}'; use one of {', '.join(INTERPOLATIONS)}")
    if t.crop not in CROPS:
        raise VitedgeError(f"unknown crop '{t.crop}'; use one of {', '.join(CROPS)}")
    if t.channels not in CHANNELS:
        raise VitedgeError(f"unknown channel order '{t.channels}'; use one of {', '.join(CHANNELS)}")
    if len(t.mean) != CHANNELS[t.channels] or len(t.std) != CHANNELS[t.channels]:
        raise VitedgeError(f"transform mean/std need {CHANNELS[t.channels]} value(s) for {t.channels}, "
                           f"got {len(t.mean)} and {len(t.std)}")
    if not all(s > 0 for s in t.std):
        raise VitedgeError(f"transform std must be positive, got {list(t.std)}")
    if t.preset is not None and t.preset not in PRESETS:
        raise VitedgeError(f"unknown transform preset '{t.preset}'; known: {', '.join(PRESETS)}")


def default_preset(img_size: int, in_chans: int) -> str:
    """The preset a model gets when nothing says otherwise: grey → Fashion-MNIST, RGB → DeiT (384+ px: no crop)."""
    if in_chans == 1:
        return "fashion-mnist"
    return "deit-384" if img_size >= 384 else "deit"


def make_transform(img_size: int, in_chans: int, mean, std, overrides: dict | None = None) -> Transform:
    """The model's transform: its preset (``overrides["preset"]`` or the default), then ``overrides`` on top.

    ``mean``/``std`` are the checkpoint's normalisation; a preset that names its own (ViT's 0.5)
    replaces them, an override replaces both.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - (set(Transform.__dataclass_fields__) - {"size"})
    if unknown:
        raise VitedgeError(f"unknown transform key(s) {', '.join(sorted(unknown))}; known: preset, crop_pct, "
                           "interpolation, crop, mean, std, channels")
    preset = overrides.get("preset") or default_preset(img_size, in_chans)
    if preset not in PRESETS:
        raise VitedgeError(f"unknown transform preset '{preset}'; known: {', '.join(PRESETS)}")
    values = {"mean": tuple(mean), "std": tuple(std), **PRESETS[preset], **overrides, "preset": preset}
    if CHANNELS.get(values["channels"]) != in_chans:
        values["channels"] = "L" if in_chans == 1 else "RGB"
    values["mean"], values["std"] = tuple(map(float, values["mean"])), tuple(map(float, values["std"]))
    return Transform(size=img_size, **values)


def parse_transform_option(text: str | None) -> dict:
    """``--transform`` text: a preset name and/or ``key=value`` pairs, comma-separated.

    E.g. ``lvvit``, ``crop_pct=1.0,interpolation=bilinear``, ``deit,crop_pct=0.9``,
    ``mean=0.5/0.5/0.5,std=0.5/0.5/0.5``.
    """
    if not text:
        return {}
    values: dict = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" not in part:
            values["preset"] = part
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            if key == "crop_pct":
                values[key] = float(value)
            elif key in ("mean", "std"):
                values[key] = tuple(float(v) for v in value.split("/"))
            else:
                values[key] = value
        except ValueError:
            raise VitedgeError(f"transform {key} must be a number (mean/std: numbers separated by '/'), got {value!r}") from None
    return values


def transform_from_metadata(metadata: dict, img_size: int | None = None) -> Transform:
    """The artifact's recorded transform; artifacts from before it was recorded get the default from their
    input shape and mean/std."""
    inp = metadata["input"]
    if "transform" in inp:
        transform = Transform.from_dict(inp["transform"])
    else:
        transform = make_transform(inp["shape"][2], inp["shape"][1], inp["mean"], inp["std"])
    return transform.with_size(img_size) if img_size else transform


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` as 8-bit ``mode`` ("RGB" or "L"): 16-bit scaled (not clipped) to 8 bits, alpha
    composited over white, palettes and CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        elif image.mode != "I" or values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range 0..65535 → 0..255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != mode:
        image = image.convert(mode)
    return image


def image_from_array(image: np.ndarray) -> Image.Image:
    """A uint8 (or bool) array, [H, W] or [H, W, 1|3|4], as a PIL image."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise VitedgeError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA from the shape
    raise VitedgeError(f"an image array must be [H, W] or [H, W, 3|4], got shape {list(array.shape)}")
