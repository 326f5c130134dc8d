"""``vitedge predict`` on image files: the artifact's recorded transform, top-5 with class names, --save-input."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from PIL import Image
from support import assert_clean_failure, make_state_dict, quiet, run_cli

import vitedge
from vitedge.backbone import ViTConfig
from vitedge.data import load_dataset
from vitedge.data.fashion_mnist import CLASSES


def test_predict_image_files_prints_top5_with_names(evit_artifact, tmp_path):
    dataset = load_dataset("fashion-mnist", limit=3)
    paths = []
    for i, image in enumerate(dataset.images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    result = run_cli("predict", evit_artifact, *paths, "--save-input", tmp_path / "input.npy")
    assert result.exit_code == 0, result.stderr
    tensor = np.load(tmp_path / "input.npy")
    # 28 px grey PNGs through the fashion-mnist transform are the IDX images, normalised as vitedge.json says
    np.testing.assert_allclose(tensor[:, 0], (dataset.images / 255.0 - 0.2860) / 0.3530, atol=1e-5)
    logits = vitedge.predict(evit_artifact, tensor)
    lines = result.stdout.splitlines()
    assert lines[0] == str(paths[0]) and len(lines) == 3 * 6
    best = int(np.argmax(logits[0]))
    assert lines[1].startswith(f"  1. class {best:4d}  {CLASSES[best]}  p=")
    entries = json.loads(run_cli("predict", evit_artifact, *paths, "--json").stdout)
    assert [e["class"] for e in entries[2]["top"]] == np.argsort(-logits[2], kind="stable")[:5].tolist()
    assert abs(sum(e["probability"] for e in entries[2]["top"]) - np.sort(
        np.exp(logits[2]) / np.exp(logits[2]).sum())[-5:].sum()) < 1e-5


def test_predict_rgb_jpeg_uses_imagenet_names_and_the_deit_crop(tmp_path):
    cfg = ViTConfig(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=32, depth=2, num_heads=1)
    checkpoint = tmp_path / "deit.pth"
    torch.save({"model": make_state_dict("deit", cfg, seed=5)}, checkpoint)
    art = tmp_path / "art"
    vitedge.export(checkpoint, art, family="deit", validate_data=None, log=quiet)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo, quality=90)
    result = vitedge.predict_images(art, [photo], save_input=tmp_path / "x.npy")
    assert np.load(tmp_path / "x.npy").shape == (1, 3, 224, 224)
    top = result[0]["top"]
    assert len(top) == 5 and all(isinstance(e["label"], str) and e["label"] for e in top)
    from vitedge.data import imagenet_class_name

    assert top[0]["label"] == imagenet_class_name(top[0]["class"])


def test_predict_bad_image_inputs(evit_artifact, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "ok.png")
    for args, message in [
        ((tmp_path / "missing.jpg",), "image file not found"),
        ((tmp_path / "broken.png",), "cannot read image"),
        ((tmp_path / "ok.png", "-o", tmp_path / "o.npy"), "-o writes logits of a .npy input"),
        ((tmp_path / "ok.png", "--save-input", tmp_path / "nodir" / "x.npy"), "output folder .* does not exist"),
    ]:
        line = assert_clean_failure(run_cli("predict", evit_artifact, *args))
        assert re.search(message, line), line
