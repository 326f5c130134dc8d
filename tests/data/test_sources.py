"""vitedge.data.sources: image folders read lazily (layouts, labels, sampling, progress) and the bad inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from vitedge.data import FolderDataset, imagenet_synsets, load_dataset, load_image_folder, make_transform
from vitedge.errors import VitedgeError

SMALL = make_transform(16, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), {"crop_pct": 1.0})


def save(path, seed=0, size=(24, 20), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


def test_synset_folders_use_the_standard_imagenet_order(tmp_path):
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets == sorted(synsets) and synsets[0] == "n01440764"
    for cls in (999, 0, 285):
        for i in range(2):
            save(tmp_path / synsets[cls] / f"{i}.JPEG", seed=cls + i, fmt="JPEG")
    dataset = load_image_folder(tmp_path)
    assert len(dataset) == 6 and dataset.class_names == tuple(sorted(synsets[c] for c in (0, 285, 999)))
    assert dataset.labels_for(1000).tolist() == [0, 0, 285, 285, 999, 999]
    with pytest.raises(VitedgeError, match="has 3 class folders .* but this model has 10 classes"):
        dataset.labels_for(10)


def test_class_folders_by_index_by_count_and_mismatch(tmp_path):
    for name in ("7", "3"):
        save(tmp_path / "index" / name / "a.png")
    assert load_image_folder(tmp_path / "index").labels_for(10).tolist() == [3, 7]
    with pytest.raises(VitedgeError, match="class folder '7' .* not one of this model's 5 class indices"):
        load_image_folder(tmp_path / "index").labels_for(5)
    for name in ("dog", "cat"):
        save(tmp_path / "named" / name / "a.png")
    assert load_image_folder(tmp_path / "named").labels_for(2).tolist() == [0, 1]  # sorted: cat, dog
    with pytest.raises(VitedgeError, match="has 2 class folders"):
        load_image_folder(tmp_path / "named").labels_for(1000)


def test_flat_folder_and_labels_file(tmp_path):
    for i in range(3):
        save(tmp_path / "flat" / f"{i}.png", seed=i)
    flat = load_image_folder(tmp_path / "flat")
    assert flat.labels is None and flat.labels_for(10) is None
    (tmp_path / "flat" / "labels.txt").write_text("# file class\n0.png 4\n1.png, 2\n2.png 9\n")
    assert load_image_folder(tmp_path / "flat").labels_for(10).tolist() == [4, 2, 9]
    with pytest.raises(VitedgeError, match="class index 9 is outside this model's 5 classes"):
        load_image_folder(tmp_path / "flat").labels_for(5)


@pytest.mark.parametrize("text, message", [
    ("0.png 4\n1.png 2\n", "has no label for 1 of 3 images .*2.png"),
    ("0.png 4\n1.png 2\n2.png 9\n3.png 1\n", "names 1 image.* not in .*3.png"),
    ("0.png four\n", "line 1: expected '<image file> <class index>'"),
])
def test_labels_file_that_does_not_match(tmp_path, text, message):
    for i in range(3):
        save(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "labels.txt").write_text(text)
    with pytest.raises(VitedgeError, match=message):
        load_image_folder(tmp_path)


def test_imagenet_val_names_are_labelled_from_the_package(tmp_path):
    save(tmp_path / "ILSVRC2012_val_00000001.JPEG", fmt="JPEG")
    assert load_image_folder(tmp_path).labels_for(1000).tolist() == [65]


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(VitedgeError, match="no images .* found under"):
        load_dataset(str(tmp_path / "empty"))
    save(tmp_path / "mixed" / "top.png")
    save(tmp_path / "mixed" / "cls" / "a.png")
    with pytest.raises(VitedgeError, match="mixes images at the top level"):
        load_dataset(str(tmp_path / "mixed"))


def test_reading_is_lazy_and_bad_images_fail_or_are_skipped(tmp_path):
    for i in range(6):
        save(tmp_path / f"{i}.png", seed=i)
    good = tmp_path / "0.png"
    (tmp_path / "7.png").write_bytes(b"not an image at all")  # corrupt, in the second batch of 4
    jpeg = save(tmp_path / "tmp.jpg", fmt="JPEG", size=(64, 64))
    (tmp_path / "8.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])  # truncated
    jpeg.unlink()
    batches = load_dataset(str(tmp_path)).batches(SMALL, 4)
    first, _ = next(batches)  # the first batch is decoded before the bad file is reached
    assert first.shape == (4, 3, 16, 16)
    with pytest.raises(VitedgeError, match=r"cannot read image .*7\.png.*--skip-bad-images"):
        next(batches)
    dataset = load_dataset(str(tmp_path), skip_bad=True)
    images = np.concatenate([x for x, _ in dataset.batches(SMALL, 4)])
    assert len(images) == 6 and sorted(p.rsplit("/", 1)[-1] for p in dataset.skipped) == ["7.png", "8.jpg"]
    with Image.open(good) as image:
        np.testing.assert_allclose(images[0], SMALL(image), atol=1e-6)


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    save(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this many pixels
    with pytest.raises(VitedgeError, match="decompression bomb.*decompression-bomb guard"):
        list(load_dataset(str(tmp_path)).batches(SMALL, 4))


def test_odd_modes_in_a_folder(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray((rng.integers(0, 65536, (20, 20))).astype(np.uint16)).save(tmp_path / "sixteen.png")
    save(tmp_path / "cmyk.jpg", mode="CMYK", fmt="JPEG")
    save(tmp_path / "palette.png", mode="P")
    save(tmp_path / "alpha.png", mode="RGBA")
    save(tmp_path / "grey_alpha.png", mode="LA")
    images = np.concatenate([x for x, _ in load_dataset(str(tmp_path)).batches(SMALL, 8)])
    assert images.shape == (5, 3, 16, 16) and np.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_limit_and_shuffle_seed_sample_across_classes(tmp_path):
    for cls in ("a", "b", "c"):
        for i in range(5):
            save(tmp_path / cls / f"{i}.png", seed=i)
    dataset = load_image_folder(tmp_path)
    first = dataset.sample(6)
    assert np.bincount(first.labels).tolist() == [5, 1]  # the first 6 in order: mostly class a
    drawn = dataset.sample(6, seed=3)
    assert np.bincount(drawn.labels).tolist() == [2, 2, 2]
    assert [f.name for f in drawn.files] == [f.name for f in dataset.sample(6, seed=3).files]  # deterministic
    assert any(dataset.sample(6, seed=s).files != drawn.files for s in range(4, 8))
    assert len(load_dataset(str(tmp_path), limit=4, shuffle_seed=0)) == 4


def test_progress_bar_shows_rate_and_eta(tmp_path, capsys):
    for i in range(5):
        save(tmp_path / f"{i}.png", seed=i)
    dataset = load_dataset(str(tmp_path))
    assert isinstance(dataset, FolderDataset)
    list(dataset.batches(SMALL, 2, progress=True))
    err = capsys.readouterr().err
    assert "img/s" in err and "<" in err and "5/5" in err  # rate, ETA, count


def test_cli_bad_image_folders_are_one_line_and_skips_are_counted(evit_artifact, tmp_path):
    from support import assert_clean_failure, copy_artifact, read_json, run_cli

    art = copy_artifact(evit_artifact, tmp_path / "art")
    (tmp_path / "empty").mkdir()
    for i in range(3):
        save(tmp_path / "bad" / f"{i}.png", seed=i, size=(28, 28))
        save(tmp_path / "classes" / ("shoe" if i else "bag") / f"{i}.png", seed=i, size=(28, 28))
    (tmp_path / "bad" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for folder, message in [("empty", "no images"), ("bad", "cannot read image .*3.png.*--skip-bad-images"),
                            ("classes", "has 2 class folders .* but this model has 10 classes")]:
        line = assert_clean_failure(run_cli("validate", art, "--data", tmp_path / folder))
        assert re.search(message, line), line
    result = run_cli("validate", art, "--data", tmp_path / "bad", "--skip-bad-images")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["skipped_images"] == 1 and "skipped 1 unreadable image(s)" in result.stderr
    assert read_json(art / "report.json")["validate"]["images"] == 3
