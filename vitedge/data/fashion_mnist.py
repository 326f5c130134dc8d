"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (gzipped IDX files)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import VitedgeError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def dataset_dir() -> Path:
    """``VITEDGE_FASHION_MNIST`` overrides the Debian location."""
    return Path(os.environ.get("VITEDGE_FASHION_MNIST", DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:
        raise VitedgeError(f"{path} is not an unsigned-byte IDX file")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_files(split: str) -> tuple[Path, Path]:
    """The images and labels files of ``split``; a one-line error when they are not installed."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise VitedgeError(f"unknown Fashion-MNIST split '{split}'; use train or test")
    root = dataset_dir()
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise VitedgeError(
            f"Fashion-MNIST not found in {root}; install it with "
            "'apt-get install dataset-fashion-mnist' or set VITEDGE_FASHION_MNIST"
        )
    return images_path, labels_path


def load_fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] uint8 and labels [N] for ``split`` in {train, test}."""
    images_path, labels_path = fashion_mnist_files(split)
    return _read_idx(images_path), _read_idx(labels_path).astype(np.int64)
