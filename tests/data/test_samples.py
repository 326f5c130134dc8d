"""vitedge.data.samples: the bundled photographs behind ``--data samples``."""

from __future__ import annotations

import numpy as np

from vitedge.data import domain_note, load_dataset, make_transform
from vitedge.data.samples import PHOTOS, SAMPLES_DIR, photos, views


def test_bundled_photos_are_listed_with_their_licence():
    readme = (SAMPLES_DIR / "README.md").read_text()
    for name in PHOTOS:
        assert (SAMPLES_DIR / f"{name}.jpg").is_file() and f"| {name}.jpg |" in readme
    assert sum((SAMPLES_DIR / f"{name}.jpg").stat().st_size for name in PHOTOS) < 600_000


def test_samples_are_twelve_views_per_photo_through_the_models_transform():
    dataset = load_dataset("samples")
    assert len(dataset) == 12 * len(PHOTOS) and dataset.labels is None and dataset.domain == "samples"
    rgb = make_transform(64, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    grey = make_transform(28, 1, (0.2860,), (0.3530,))
    batch, labels = next(dataset.batches(rgb, 24))
    assert batch.shape == (24, 3, 64, 64) and labels is None and np.isfinite(batch).all()
    assert next(dataset.batches(grey, 5))[0].shape == (5, 1, 28, 28)
    first = photos()[0]
    crops = views(first)
    assert crops[0].shape == first.shape and np.array_equal(crops[6], first[:, ::-1])
    # the views differ from one another (a model sees 12 different inputs per photo)
    assert len({rgb.array(v).tobytes() for v in crops}) == 12


def test_reports_flag_data_outside_the_models_domain():
    samples, fmnist = load_dataset("samples"), load_dataset("fashion-mnist", limit=4)
    assert "not this model's domain (imagenet)" in domain_note(samples, 3, 1000)
    assert "not this model's domain" in domain_note(fmnist, 3, 1000)
    assert domain_note(fmnist, 1, 10) is None  # the Fashion-MNIST models on Fashion-MNIST
