"""Calibration sets: a YAML per data source, turned into normalised batches for a model.

A set declares where its images come from (``fashion-mnist``, an ``image-folder``, the bundled
``samples`` photographs, or scikit-image's ``skimage`` sample images) and how many. The images
go through the model's own evaluation transform (``input.transform`` in ``vitedge.json``); a
set may also declare the model input it is meant for (``preprocess: {size, channels}``), and a
model with another input refuses it, so a calibration never silently runs on the wrong geometry.
Any other ``--data`` value (``fashion-mnist``, ``samples``, an image folder) is a set too.

The set used is recorded by hashes (YAML text and the exact float32 batches) in
``vitedge.json``, so a quantized model names the data its scales came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VitedgeError
from ..reading import parse_yaml, read_text, read_yaml
from ..schema import CALIBRATION_SET, check
from . import FASHION_MNIST_CLASSES, FASHION_MNIST_NAMES, SAMPLES, ArrayDataset, Dataset, Transform, load_image_folder
from .fashion_mnist import load_fashion_mnist

SOURCES = ("fashion-mnist", "image-folder", "samples", "skimage")
DEFAULT_SET = "fmnist-train-512"
SET_DIR = Path(__file__).resolve().parents[2] / "calibration"
_KEYS = {"name", "description", "source", "split", "count", "seed", "path", "labels", "images", "crops_per_image",
         "preprocess"}


@dataclass
class CalibrationSet:
    """A parsed calibration-set YAML."""

    name: str
    source: str
    size: int | None = None
    channels: int | None = None
    count: int | None = None
    seed: int = 0
    split: str = "train"
    path: Path | None = None
    labels: Path | None = None
    images: list[str] = field(default_factory=list)
    crops_per_image: int = 1
    yaml_path: Path | None = None
    yaml_sha256: str = ""

    def record(self) -> dict:
        record = {"name": self.name, "source": self.source, "yaml": str(self.yaml_path) if self.yaml_path else None,
                  "yaml_sha256": self.yaml_sha256}
        if self.path is not None:
            record["path"] = str(self.path)
        if self.size is not None:
            record["preprocess"] = {"size": self.size, "channels": self.channels}
        return record


def default_set(in_chans: int) -> str:
    """Out of the box: 512 Fashion-MNIST training images for grey models, the bundled photographs for RGB ones."""
    return DEFAULT_SET if in_chans == 1 else SAMPLES


def set_for_source(source: str) -> CalibrationSet | None:
    """A ``--data``/``--calib`` value that is not a YAML (fashion-mnist, samples, an image folder) as a set."""
    if source in FASHION_MNIST_NAMES:
        return CalibrationSet(name="fashion-mnist-train", source="fashion-mnist", split="train")
    if source == SAMPLES:
        return CalibrationSet(name=SAMPLES, source="samples")
    if Path(source).is_dir():
        return CalibrationSet(name=Path(source).resolve().name, source="image-folder", path=Path(source).resolve())
    return None


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
    """Parse and check a calibration-set YAML (``yaml.safe_load``), or take a plain data source as a set;
    one-line errors on anything wrong."""
    plain = set_for_source(str(name_or_path)) if Path(str(name_or_path)).suffix not in (".yaml", ".yml") else None
    if plain is not None:
        return plain
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
    size = channels = None
    if prep is not None:
        if not isinstance(prep, dict) or set(prep) - {"size", "channels"} or "size" not in prep or "channels" not in prep:
            raise VitedgeError(f"{path}: 'preprocess' declares the model input the set is for, e.g. {{size: 28, channels: 1}}")
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
        if data.get("labels"):
            cset.labels = (path.parent / str(data["labels"])).resolve()
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
    """The uint8 images (HW or HWC) of an in-memory set (fashion-mnist, samples, skimage), before the transform."""
    if cset.source == "image-folder":
        raise VitedgeError(f"calibration set '{cset.name}' is an image folder, read lazily: use dataset_from_set")
    return dataset_from_set(cset).images


def dataset_from_set(cset: CalibrationSet, skip_bad: bool = False) -> Dataset:
    """The set's images as a dataset (its ``count`` of them; the draw is seeded and class-balanced)."""
    if cset.source == "fashion-mnist":
        images, labels = load_fashion_mnist(cset.split)
        dataset: Dataset = ArrayDataset("fashion-mnist", images, labels, FASHION_MNIST_CLASSES, domain="fashion-mnist")
        return dataset.sample(cset.count, cset.seed if cset.count is not None and cset.count < len(images) else None)
    if cset.source == "image-folder":
        if not cset.path.is_dir():
            raise VitedgeError(f"calibration image folder {cset.path} (from {cset.yaml_path}) does not exist")
        dataset = load_image_folder(cset.path, cset.labels, skip_bad)
        dataset.name = cset.name
    elif cset.source == "samples":
        from .samples import load_samples

        dataset = load_samples()
    else:
        dataset = ArrayDataset(cset.name, _skimage_images(cset), domain="samples")
    return dataset.sample(cset.count)


def calibration_array(cset: CalibrationSet, transform: Transform) -> np.ndarray:
    """All calibration images as normalised float32 NCHW for a model with input ``transform``.

    Raises when the set declares another model input (``preprocess``) than the model's.
    """
    if cset.size is not None and (cset.size, cset.channels) != (transform.size, transform.in_chans):
        raise VitedgeError(
            f"calibration set '{cset.name}' yields {cset.channels}x{cset.size}x{cset.size} images "
            f"(preprocess in {cset.yaml_path}); this model takes {transform.in_chans}x{transform.size}x{transform.size}: "
            "use a set whose preprocess matches the model input"
        )
    dataset = dataset_from_set(cset)
    if len(dataset) == 0:
        raise VitedgeError(f"calibration set '{cset.name}' holds no images")
    return np.concatenate([images for images, _ in dataset.batches(transform, 64)])


def array_sha256(array: np.ndarray) -> str:
    """sha256 of the exact calibration tensor (shape and dtype included)."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def set_out_of_domain(source: str, in_chans: int, num_classes: int) -> str | None:
    """What a calibration set's images are when they are not the model's domain (None when they are, or are the user's)."""
    from . import model_domain

    domain = model_domain(in_chans, num_classes)
    if source in ("samples", "skimage"):
        what = "the bundled sample photographs"
    elif source == "fashion-mnist" and domain != "fashion-mnist":
        what = "Fashion-MNIST (28 px grey clothing)"
    else:
        return None
    return f"{what}, not this model's domain{f' ({domain})' if domain else ''}"
