"""Real images for validation, calibration and training, shaped for a given model input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import VitedgeError
from .fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .fashion_mnist import fashion_mnist_files, load_fashion_mnist

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: NCHW float32, this size and channel count, normalised so."""

    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def preprocess(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 images [N, H, W] or [N, H, W, C] → normalised float32 NCHW at ``spec``'s size.

    Grey images are repeated to three channels for RGB models and RGB images averaged for
    grey models; resizing is bilinear with antialiasing, as PIL-style preprocessing does.
    """
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != spec.in_chans:
        x = x.mean(dim=1, keepdim=True) if spec.in_chans == 1 else x.mean(1, keepdim=True).expand(-1, spec.in_chans, -1, -1)
    if x.shape[-1] != spec.img_size or x.shape[-2] != spec.img_size:
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous().numpy()


@dataclass
class Dataset:
    """Raw uint8 images with optional labels; batches are preprocessed on demand."""

    name: str
    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, spec: InputSpec, batch_size: int):
        for start in range(0, len(self.images), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield preprocess(self.images[start:stop], spec), labels


def load_image_dir(path: Path) -> Dataset:
    """A folder of images; with one sub-folder per class, the sub-folder names are labels."""
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VitedgeError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    classes = sorted({p.parent.name for p in files if p.parent != path})
    labelled = all(p.parent != path for p in files)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB").resize((256, 256), Image.BILINEAR)))
        except OSError as exc:
            raise VitedgeError(f"cannot read image {file}: {exc}") from None
    labels = np.array([classes.index(p.parent.name) for p in files]) if labelled else None
    return Dataset(path.name, np.stack(images), labels, tuple(classes) if labelled else ())


FASHION_MNIST_NAMES = ("fashion-mnist", "fmnist")


def check_source(source: str, limit: int | None = None) -> None:
    """Fail early, in one line, on a data source or limit that cannot work."""
    if limit is not None and limit <= 0:
        raise VitedgeError(f"image limit must be positive, got {limit} (--limit, --validate-limit)")
    if source in FASHION_MNIST_NAMES:
        fashion_mnist_files("test")
    elif not Path(source).is_dir():
        raise VitedgeError(f"data source '{source}' is neither 'fashion-mnist' nor an image folder")


def load_dataset(source: str, limit: int | None = None, split: str = "test") -> Dataset:
    """``fashion-mnist`` (Debian package) or a folder of images."""
    check_source(source, limit)
    if source in FASHION_MNIST_NAMES:
        images, labels = load_fashion_mnist(split)
        dataset = Dataset("fashion-mnist", images, labels, FASHION_MNIST_CLASSES)
    else:
        dataset = load_image_dir(Path(source))
    if limit is not None:
        dataset = Dataset(dataset.name, dataset.images[:limit],
                          None if dataset.labels is None else dataset.labels[:limit], dataset.class_names)
    return dataset
