"""Calibration sets: a YAML per data source, turned into normalised batches for a model.

A set declares where its images come from (``fashion-mnist``, an ``image-folder``, or the
``skimage`` sample images) and the geometric preprocessing that makes them fit a model
(``preprocess: {size, channels}``). Normalisation (mean/std) is the model's own, from
``vitedge.json``. A set whose preprocessing does not produce the model's input shape is
refused, so a calibration never silently runs on images of the wrong geometry.

The set used is recorded by hashes (YAML text and the exact float32 batches) in
``vitedge.json``, so a quantized model names the data its scales came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import InputSpec, load_image_dir, preprocess
from .data.fashion_mnist import load_fashion_mnist
from .errors import VitedgeError
from .reading import parse_yaml, read_text, read_yaml
from .schema import CALIBRATION_SET, check

SOURCES = ("fashion-mnist", "image-folder", "skimage")
DEFAULT_SET = "fmnist-train-512"
SET_DIR = Path(__file__).resolve().parents[1] / "calibration"
_KEYS = {"name", "description", "source", "split", "count", "seed", "path", "images", "crops_per_image", "preprocess"}


@dataclass
class CalibrationSet:
    """A parsed calibration-set YAML."""

    name: str
    source: str
    size: int
    channels: int
    count: int | None = None
    seed: int = 0
    split: str = "train"
    path: Path | None = None
    images: list[str] = field(default_factory=list)
    crops_per_image: int = 1
    yaml_path: Path | None = None
    yaml_sha256: str = ""

    def record(self) -> dict:
        return {"name": self.name, "source": self.source, "yaml": str(self.yaml_path), "yaml_sha256": self.yaml_sha256,
                "preprocess": {"size": self.size, "channels": self.channels}}


def available_sets(folder: Path = SET_DIR) -> list[str]:
    """The calibration sets committed in ``calibration/`` (a YAML with a ``source`` key each)."""
    names = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = read_yaml(path, "calibration set")
        except VitedgeError:
            continue
        if isinstance(data, dict) and "source" in data:
            names.append(path.stem)
    return names


def resolve_set_path(name_or_path: str | Path) -> Path:
    """A YAML path as given, or ``calibration/<name>.yaml`` (the working folder's, then the repository's)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise VitedgeError(f"calibration set file {candidate} not found")
        return candidate
    for folder in (Path("calibration"), SET_DIR):
        path = folder / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    known = ", ".join(available_sets()) or "none"
    raise VitedgeError(f"unknown calibration set '{name_or_path}'; give a YAML file or one of: {known}")


def _positive_int(data: dict, key: str, where: Path, default=None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise VitedgeError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def load_calibration_set(name_or_path: str | Path = DEFAULT_SET) -> CalibrationSet:
    """Parse and check a calibration-set YAML (``yaml.safe_load``); one-line errors on anything wrong."""
    path = resolve_set_path(name_or_path)
    text = read_text(path, "calibration set")
    data = parse_yaml(text, path, "calibration set")
    if not isinstance(data, dict):
        raise VitedgeError(f"{path} must be a mapping with at least 'source' and 'preprocess'")
    unknown = set(data) - _KEYS
    if unknown:
        raise VitedgeError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_KEYS))}")
    check(data, CALIBRATION_SET, path, "calibration set")
    source = data.get("source")
    if source not in SOURCES:
        raise VitedgeError(f"{path}: source must be one of {', '.join(SOURCES)}, got {source!r}")
    prep = data.get("preprocess")
    if not isinstance(prep, dict) or set(prep) - {"size", "channels"} or "size" not in prep or "channels" not in prep:
        raise VitedgeError(f"{path}: 'preprocess' must declare the model input it produces, e.g. {{size: 28, channels: 1}}")
    size = _positive_int(prep, "size", path)
    channels = prep["channels"]
    if channels not in (1, 3):
        raise VitedgeError(f"{path}: preprocess.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    cset = CalibrationSet(
        name=str(data.get("name") or path.stem), source=source, size=size, channels=channels,
        count=_positive_int(data, "count", path), seed=int(data.get("seed", 0)), split=str(data.get("split", "train")),
        crops_per_image=_positive_int(data, "crops_per_image", path, 1), yaml_path=path.resolve(),
        yaml_sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
    if source == "image-folder":
        if not data.get("path"):
            raise VitedgeError(f"{path}: an image-folder set needs 'path' (relative to the YAML file)")
        cset.path = (path.parent / str(data["path"])).resolve()
    if source == "skimage":
        images = data.get("images")
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise VitedgeError(f"{path}: a skimage set needs 'images', a list of skimage.data names (e.g. [camera, coffee])")
        cset.images = images
    return cset


def _random_crops(image: np.ndarray, crops: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``crops`` square crops of random side (half the short side to all of it) and position."""
    height, width = image.shape[:2]
    short = min(height, width)
    out = []
    for _ in range(crops):
        side = int(rng.integers(short // 2, short + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        out.append(image[top : top + side, left : left + side])
    return out


def _skimage_images(cset: CalibrationSet) -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        raise VitedgeError(f"calibration set '{cset.name}' needs scikit-image: pip install scikit-image") from None
    rng = np.random.default_rng(cset.seed)
    images = []
    for name in cset.images:
        loader = getattr(skimage.data, name, None)
        if loader is None or not callable(loader):
            raise VitedgeError(f"{cset.yaml_path}: skimage.data has no image '{name}'")
        try:
            image = np.asarray(loader())
        except Exception as exc:  # some samples are downloaded on demand; no network here is a user-facing failure
            raise VitedgeError(f"skimage sample '{name}' is not available offline ({type(exc).__name__}); drop it from {cset.yaml_path}") from None
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        images.extend(_random_crops(image.astype(np.uint8), cset.crops_per_image, rng))
    return images


def raw_images(cset: CalibrationSet) -> list[np.ndarray] | np.ndarray:
    """The set's uint8 images (HW or HWC), before resizing and normalisation."""
    if cset.source == "fashion-mnist":
        images, labels = load_fashion_mnist(cset.split)
        if cset.count is not None and cset.count < len(images):
            rng = np.random.default_rng(cset.seed)
            # Class-balanced draw: the same number of images from every class (the remainder from the first ones).
            classes = np.unique(labels)
            per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
            take = [cset.count // len(classes) + (i < cset.count % len(classes)) for i in range(len(classes))]
            order = np.sort(np.concatenate([idx[:n] for idx, n in zip(per_class, take)]))
            images = images[order]
        return images
    if cset.source == "image-folder":
        if not cset.path.is_dir():
            raise VitedgeError(f"calibration image folder {cset.path} (from {cset.yaml_path}) does not exist")
        images = load_image_dir(cset.path).images
        return images[: cset.count] if cset.count else images
    images = _skimage_images(cset)
    if cset.count:
        images = images[: cset.count]
    return images


def calibration_array(cset: CalibrationSet, spec: InputSpec) -> np.ndarray:
    """All calibration images as normalised float32 NCHW for a model with input ``spec``.

    Raises when the set's declared preprocessing does not yield the model's input shape.
    """
    if (cset.size, cset.channels) != (spec.img_size, spec.in_chans):
        raise VitedgeError(
            f"calibration set '{cset.name}' yields {cset.channels}x{cset.size}x{cset.size} images "
            f"(preprocess in {cset.yaml_path}); this model takes {spec.in_chans}x{spec.img_size}x{spec.img_size}: "
            "use a set whose preprocess matches the model input"
        )
    images = raw_images(cset)
    if len(images) == 0:
        raise VitedgeError(f"calibration set '{cset.name}' holds no images")
    target = InputSpec(cset.size, cset.channels, spec.mean, spec.std)
    if isinstance(images, np.ndarray):
        return preprocess(images, target)
    # Differently sized images (crops): preprocess one by one, then stack.
    return np.concatenate([preprocess(image[None], target) for image in images])


def array_sha256(array: np.ndarray) -> str:
    """sha256 of the exact calibration tensor (shape and dtype included)."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
