"""Calibration sets: the committed YAMLs, the three sources, and the one-line errors on bad sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from support import make_state_dict, read_json, run_cli

from vitedge.backbone import ViTConfig
from vitedge.data.calibration_sets import (
    DEFAULT_SET, SET_DIR, array_sha256, available_sets, calibration_array, load_calibration_set, raw_images,
)
from vitedge.data import InputSpec, load_dataset
from vitedge.data.fashion_mnist import load_fashion_mnist
from vitedge.errors import VitedgeError

FMNIST = InputSpec(28, 1, (0.2860,), (0.3530,))


def write_yaml(folder, name, text):
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_committed_sets_are_listed_and_parse():
    names = available_sets()
    assert {"fmnist-train-512", "skimage-samples-28-gray", "imagenet-val-folder-224-rgb"} <= set(names)
    for name in names:
        cset = load_calibration_set(name)
        assert cset.yaml_path == (SET_DIR / f"{name}.yaml").resolve()
        assert len(cset.yaml_sha256) == 64


def test_default_set_is_512_class_balanced_training_images():
    cset = load_calibration_set(DEFAULT_SET)
    images = raw_images(cset)
    train_images, train_labels = load_fashion_mnist("train")
    assert images.shape == (512, 28, 28) and images.dtype == np.uint8
    # Every image is a training image; the draw takes 51 or 52 of each class.
    index = {train_images[i].tobytes(): i for i in range(len(train_images))}
    labels = train_labels[[index[image.tobytes()] for image in images]]
    assert set(np.bincount(labels, minlength=10).tolist()) <= {51, 52}
    test_images, _ = load_fashion_mnist("test")
    assert not {image.tobytes() for image in images} & {image.tobytes() for image in test_images[:2000]}


def test_batches_are_the_models_normalisation_and_hash_is_stable():
    cset = load_calibration_set(DEFAULT_SET)
    array = calibration_array(cset, FMNIST)
    assert array.shape == (512, 1, 28, 28) and array.dtype == np.float32
    expected = (raw_images(cset).astype(np.float32) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(array[:, 0], expected, atol=1e-5)
    assert array_sha256(array) == array_sha256(calibration_array(load_calibration_set(DEFAULT_SET), FMNIST))
    other = InputSpec(28, 1, (0.5,), (0.5,))
    assert array_sha256(calibration_array(cset, other)) != array_sha256(array)


def test_seed_changes_the_draw(tmp_path):
    a = write_yaml(tmp_path, "a", "source: fashion-mnist\ncount: 40\nseed: 1\npreprocess: {size: 28, channels: 1}\n")
    b = write_yaml(tmp_path, "b", "source: fashion-mnist\ncount: 40\nseed: 2\npreprocess: {size: 28, channels: 1}\n")
    arrays = [calibration_array(load_calibration_set(p), FMNIST) for p in (a, b)]
    assert arrays[0].shape == arrays[1].shape == (40, 1, 28, 28)
    assert array_sha256(arrays[0]) != array_sha256(arrays[1])


def test_image_folder_set_resizes_and_greys_as_declared(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 40, 40, 3), dtype=np.uint8)
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(folder / f"{i}.png")
    path = write_yaml(tmp_path, "folder", "source: image-folder\npath: images\npreprocess: {size: 28, channels: 1}\n")
    array = calibration_array(load_calibration_set(path), FMNIST)
    assert array.shape == (5, 1, 28, 28)
    # Grey is PIL's luma (ITU-R 601-2 weights); a 40 px noise image averages to about mid-grey.
    assert abs(float(array.mean()) * 0.3530 + 0.2860 - rgb.mean() / 255.0) < 0.02


def test_skimage_set_crops_and_fits_28px_grey(tmp_path):
    pytest.importorskip("skimage")
    path = write_yaml(tmp_path, "sk", "source: skimage\nimages: [camera, coffee]\ncrops_per_image: 3\n"
                      "preprocess: {size: 28, channels: 1}\n")
    array = calibration_array(load_calibration_set(path), FMNIST)
    assert array.shape == (6, 1, 28, 28)
    assert np.isfinite(array).all() and array.std() > 0.1


def test_committed_skimage_set_fits_the_fmnist_models():
    pytest.importorskip("skimage")
    array = calibration_array(load_calibration_set("skimage-samples-28-gray"), FMNIST)
    assert array.shape == (512, 1, 28, 28)


@pytest.mark.parametrize("preprocess, message", [
    ("{size: 32, channels: 1}", "yields 1x32x32 images"),
    ("{size: 28, channels: 3}", "yields 3x28x28 images"),
])
def test_mismatched_preprocessing_is_refused(tmp_path, preprocess, message):
    path = write_yaml(tmp_path, "bad", f"source: fashion-mnist\ncount: 8\npreprocess: {preprocess}\n")
    with pytest.raises(VitedgeError, match=message) as info:
        calibration_array(load_calibration_set(path), FMNIST)
    assert "this model takes 1x28x28" in str(info.value)


def test_committed_224_rgb_set_is_refused_for_a_28px_model():
    with pytest.raises(VitedgeError, match="yields 3x224x224"):
        calibration_array(load_calibration_set("imagenet-val-folder-224-rgb"), FMNIST)


@pytest.mark.parametrize("text, message", [
    ("source: fashion-mnist\ncount: 0\npreprocess: {size: 28, channels: 1}\n", "'count' must be a positive integer"),
    ("source: webcam\npreprocess: {size: 28, channels: 1}\n", "source must be one of"),
    ("source: fashion-mnist\npreprocess: {size: 28}\n", "'preprocess' declares the model input"),
    ("source: fashion-mnist\npreprocess: {size: 28, channels: 2}\n", "channels must be 1"),
    ("source: fashion-mnist\ncolour: red\npreprocess: {size: 28, channels: 1}\n", "unknown key"),
    ("- just\n- a list\n", "must be a mapping"),
    ("source: [unclosed\n", "not valid YAML"),
    ("source: skimage\npreprocess: {size: 28, channels: 1}\n", "needs 'images'"),
    ("source: image-folder\npreprocess: {size: 28, channels: 1}\n", "needs 'path'"),
])
def test_bad_set_definitions(tmp_path, text, message):
    path = write_yaml(tmp_path, "bad", text)
    with pytest.raises(VitedgeError, match=message):
        load_calibration_set(path)


def test_empty_or_missing_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    empty = write_yaml(tmp_path, "empty", "source: image-folder\npath: empty\npreprocess: {size: 28, channels: 1}\n")
    with pytest.raises(VitedgeError, match="no images"):
        calibration_array(load_calibration_set(empty), FMNIST)
    missing = write_yaml(tmp_path, "missing", "source: image-folder\npath: nowhere\npreprocess: {size: 28, channels: 1}\n")
    with pytest.raises(VitedgeError, match="does not exist"):
        calibration_array(load_calibration_set(missing), FMNIST)


def test_unknown_set_name_lists_the_known_ones():
    with pytest.raises(VitedgeError, match="fmnist-train-512"):
        load_calibration_set("no-such-set")
    with pytest.raises(VitedgeError, match="not found"):
        load_calibration_set("no/such/file.yaml")


def test_the_validation_images_are_not_the_calibration_images():
    """Accuracy is measured on the test split; the default set draws from the train split."""
    test = load_dataset("fashion-mnist", limit=100).images
    calib = raw_images(load_calibration_set(DEFAULT_SET))
    assert not {i.tobytes() for i in test} & {i.tobytes() for i in calib}


# A 224-px RGB ImageNet-shaped checkpoint (official timm/DeiT keys, random weights, narrow so that it exports in seconds).
RGB224 = ViTConfig(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=64, depth=4, num_heads=1)


@pytest.fixture(scope="module")
def rgb224_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("rgb224") / "deit_rgb224.pth"
    torch.save({"model": make_state_dict("deit", RGB224, seed=3)}, path)
    return path


def test_int8_runs_out_of_the_box_on_a_224px_rgb_model_and_says_the_data_is_not_in_domain(rgb224_checkpoint, tmp_path):
    out = tmp_path / "art"
    result = run_cli("export", rgb224_checkpoint, "-o", out, "--family", "deit", "--limit", "24")
    assert result.exit_code == 0, result.stderr
    assert "validating on samples" in result.stderr and "not this model's domain (imagenet)" in result.stderr
    meta = read_json(out / "vitedge.json")
    transform = meta["input"]["transform"]
    assert (transform["preset"], transform["resize"], transform["interpolation"], transform["size"]) == ("deit", 256, "bicubic", 224)
    section = read_json(out / "report.json")["validate"]
    assert section["in_domain"] is False and "not accuracy" in section["domain_note"] and section["images"] == 24
    # random 1000-class weights have near-tied logits that INT8 flips: the comparison with FP32 is not the point here
    result = run_cli("quantize", out, "--precision", "int8", "--no-validate")
    assert result.exit_code == 0, result.stderr
    assert "in-domain calibration images" in result.stderr and "calibrating on 120 images of 'samples'" in result.stderr
    calibration = read_json(out / "vitedge.json")["quantized"]["int8"]["calibration"]
    assert (calibration["name"], calibration["images"], calibration["in_domain"]) == ("samples", 120, False)


def test_avit_quantile_export_runs_out_of_the_box_on_a_224px_rgb_model(rgb224_checkpoint, tmp_path):
    out = tmp_path / "avit"
    result = run_cli("export", rgb224_checkpoint, "-o", out, "--family", "avit", "--quantile", "0.99", "--limit", "24")
    assert result.exit_code == 0, result.stderr
    assert "calibrated on the bundled sample photographs" in result.stderr
    assert "in-domain images are needed" in result.stderr
    settings = read_json(out / "vitedge.json")["settings"]
    assert settings["budget_quantile"] == 0.99 and len(settings["token_budgets"]) == RGB224.depth
