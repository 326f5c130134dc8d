"""Real images for validation, calibration and training, through the model's own evaluation transform.

One ``--data`` value names a source everywhere: ``fashion-mnist``, ``samples`` (the bundled
photographs), an image folder, or a calibration-set YAML (``calibration/*.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import VitedgeError
from .fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .fashion_mnist import fashion_mnist_files, load_fashion_mnist
from .sources import (
    IMAGE_SUFFIXES, ArrayDataset, Dataset, FolderDataset, imagenet_class_name, imagenet_synsets, load_image_folder,
)
from .transform import PRESETS, Transform, make_transform, parse_transform_option, transform_from_metadata

FASHION_MNIST_NAMES = ("fashion-mnist", "fmnist")
SAMPLES = "samples"
DEFAULT_DATA = "default"  # the model's default source: default_source(in_chans)
SOURCES_HELP = "fashion-mnist, samples (bundled photos), an image folder, or a calibration-set YAML"


def default_source(in_chans: int) -> str:
    """Out of the box: Fashion-MNIST for grey models, the bundled photographs for RGB ones."""
    return FASHION_MNIST_NAMES[0] if in_chans == 1 else SAMPLES


def _is_set(source: str) -> bool:
    from .calibration_sets import available_sets

    return Path(source).suffix in (".yaml", ".yml") or source in available_sets()


def check_source(source: str | None, limit: int | None = None) -> None:
    """Fail early, in one line, on a data source or limit that cannot work (None: the model's default)."""
    if limit is not None and limit <= 0:
        raise VitedgeError(f"image limit must be positive, got {limit} (--limit, --validate-limit)")
    if source in (None, DEFAULT_DATA, SAMPLES):
        return
    if source in FASHION_MNIST_NAMES:
        fashion_mnist_files("test")
    elif _is_set(source):
        from .calibration_sets import load_calibration_set

        load_calibration_set(source)
    elif not Path(source).is_dir():
        raise VitedgeError(f"data source '{source}' is neither 'fashion-mnist' nor an image folder "
                           "(nor 'samples' or a calibration-set YAML)")


def load_dataset(source: str | None, limit: int | None = None, split: str = "test", shuffle_seed: int | None = None,
                 skip_bad: bool = False, in_chans: int = 3) -> Dataset:
    """The images of ``source`` (None or "default": ``default_source(in_chans)``), ``limit`` of them (a class-balanced random
    draw with ``shuffle_seed``); ``skip_bad`` drops unreadable files of a folder instead of failing."""
    source = default_source(in_chans) if source in (None, DEFAULT_DATA) else source
    check_source(source, limit)
    if source in FASHION_MNIST_NAMES:
        images, labels = load_fashion_mnist(split)
        dataset: Dataset = ArrayDataset("fashion-mnist", images, labels, FASHION_MNIST_CLASSES, domain="fashion-mnist")
    elif source == SAMPLES:
        from .samples import load_samples

        dataset = load_samples()
    elif Path(source).is_dir():
        dataset = load_image_folder(Path(source), skip_bad=skip_bad)
    else:
        from .calibration_sets import dataset_from_set, load_calibration_set

        dataset = dataset_from_set(load_calibration_set(source), skip_bad=skip_bad)
    return dataset.sample(limit, shuffle_seed)


def model_domain(in_chans: int, num_classes: int) -> str | None:
    """What a model was trained on, as far as its shape tells: vitedge's Fashion-MNIST models or ImageNet-1k."""
    if in_chans == 1 and num_classes == 10:
        return "fashion-mnist"
    if num_classes == 1000:
        return "imagenet"
    return None


def out_of_domain(dataset: Dataset, in_chans: int, num_classes: int) -> str | None:
    """"<what the images are>, not this model's domain (<domain>)" when they are not (None when they are, or are
    the user's own images)."""
    domain = model_domain(in_chans, num_classes)
    if dataset.domain == "samples":
        what = f"the bundled sample photographs ({len(dataset)} views)"
    elif dataset.domain == "fashion-mnist" and domain != "fashion-mnist":
        what = "Fashion-MNIST (28 px grey clothing)"
    else:
        return None
    return f"{what}, not this model's domain{f' ({domain})' if domain else ''}"


def domain_note(dataset: Dataset, in_chans: int, num_classes: int) -> str | None:
    """The line reports carry when validation ran on images outside the model's domain."""
    what = out_of_domain(dataset, in_chans, num_classes)
    if what is None:
        return None
    return (f"validated on {what}: this measures agreement with the reference, not accuracy; "
            "use in-domain images (--data FOLDER) for accuracy")


__all__ = [
    "DEFAULT_DATA", "FASHION_MNIST_CLASSES", "FASHION_MNIST_NAMES", "IMAGE_SUFFIXES", "PRESETS", "SAMPLES", "SOURCES_HELP",
    "ArrayDataset", "Dataset", "FolderDataset", "InputSpec", "Transform", "check_source", "default_source", "domain_note",
    "imagenet_class_name", "imagenet_synsets", "load_dataset", "load_image_folder", "make_transform", "model_domain", "out_of_domain",
    "parse_transform_option", "preprocess", "transform_from_metadata",
]


def InputSpec(img_size: int, in_chans: int, mean, std) -> Transform:  # noqa: N802 - the name callers know
    """A model input (size, channels, normalisation) with its default evaluation transform."""
    return make_transform(img_size, in_chans, mean, std)


def preprocess(images, transform: Transform):
    """uint8 images ([N, H, W], [N, H, W, C] or a list of HW/HWC arrays) → normalised float32 NCHW."""
    import numpy as np

    return np.stack([transform.array(image) for image in images])
