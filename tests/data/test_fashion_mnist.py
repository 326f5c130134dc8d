"""vitedge.data: the Debian Fashion-MNIST files, preprocessing of arrays, the --data sources."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from vitedge.data import InputSpec, load_dataset, preprocess
from vitedge.data.fashion_mnist import CLASSES, load_fashion_mnist
from vitedge.errors import VitedgeError

GREY = InputSpec(28, 1, (0.2860,), (0.3530,))


def test_test_split_is_the_real_dataset():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert len(CLASSES) == 10 and CLASSES[9] == "Ankle boot"
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published first test labels
    # Real pictures, not noise: dark background, some bright pixels, statistics near the published mean.
    assert images[:, 0, 0].mean() < 5 and images.max() == 255
    assert images.mean() / 255 == pytest.approx(0.2860, abs=0.01)


def test_unknown_split():
    with pytest.raises(VitedgeError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val")


def test_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("VITEDGE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(VitedgeError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_wrong_idx_type_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("VITEDGE_FASHION_MNIST", str(tmp_path))
    float_idx = (0x0D03).to_bytes(4, "big") + (1).to_bytes(4, "big") * 3 + b"\0" * 4
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as handle:
            handle.write(float_idx)
    with pytest.raises(VitedgeError, match="not an unsigned-byte IDX file"):
        load_fashion_mnist("test")


def test_preprocess_normalises_to_nchw_float32():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = preprocess(images, InputSpec(2, 1, (0.5,), (0.25,)))
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (np.array([[0, 255], [51, 102]]) / 255 - 0.5) / 0.25, atol=1e-6)


def test_preprocess_resizes_and_converts_channels():
    images, _ = load_fashion_mnist("test")
    rgb = preprocess(images[:2], InputSpec(56, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert rgb.shape == (2, 3, 56, 56)
    # Grey repeated to RGB: the channels differ only by their normalisation.
    np.testing.assert_allclose(rgb[:, 0] * 0.229 + 0.485, rgb[:, 1] * 0.224 + 0.456, atol=1e-5)
    colour = np.stack([images[:2]] * 3, axis=-1)
    np.testing.assert_allclose(preprocess(colour, GREY), preprocess(images[:2], GREY), atol=1e-6)


def test_load_dataset_and_batches():
    dataset = load_dataset("fashion-mnist", limit=70)
    assert len(dataset) == 70 and dataset.name == "fashion-mnist"
    batches = list(dataset.batches(GREY, 32))
    assert [len(b) for b, _ in batches] == [32, 32, 6]
    assert np.concatenate([lbl for _, lbl in batches]).tolist() == dataset.labels.tolist()
    assert load_dataset("fmnist", limit=3).images.shape == (3, 28, 28)


@pytest.mark.parametrize("source, limit, message", [
    ("fashion-mnist", 0, "image limit must be positive"),
    ("fashion-mnist", -5, "image limit must be positive"),
    ("/no/such/folder", None, "neither 'fashion-mnist' nor an image folder"),
])
def test_load_dataset_errors(source, limit, message):
    with pytest.raises(VitedgeError, match=message):
        load_dataset(source, limit)


def test_image_folder(tmp_path):
    images, labels = load_fashion_mnist("test")
    for i in range(6):
        folder = tmp_path / CLASSES[labels[i]].replace("/", "-")
        folder.mkdir(exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    dataset = load_dataset(str(tmp_path))
    assert len(dataset) == 6 and dataset.domain == "images"
    assert dataset.class_names == tuple(sorted({CLASSES[lbl].replace("/", "-") for lbl in labels[:6]}))
    (x, _), = list(dataset.batches(GREY, 8))
    assert x.shape == (6, 1, 28, 28)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VitedgeError, match="no images"):
        load_dataset(str(empty))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(VitedgeError, match="cannot read image"):  # decoded lazily: when its batch is read
        list(load_dataset(str(tmp_path)).batches(GREY, 8))
