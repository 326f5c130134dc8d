"""``samples``: the scikit-image sample photographs, bundled, as a natural-image set that needs no download.

Ten photographs (public domain or CC0, see ``samples/README.md``), each seen in twelve views:
the whole photo, its four corners and its centre (three quarters and half of each side), and
their mirror images; every view then goes through the model's own transform. They are not any
model's training domain: validation on them measures agreement with the reference, never accuracy,
and calibration on them gets scales that work, not the best ones for your data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .sources import ArrayDataset

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "camera", "coins", "brick", "gravel")


def photos() -> list[np.ndarray]:
    """The bundled photographs as uint8 arrays (HW grey or HWC RGB)."""
    out = []
    for name in PHOTOS:
        with Image.open(SAMPLES_DIR / f"{name}.jpg") as image:
            out.append(np.asarray(image.convert("L" if image.mode == "L" else "RGB")))
    return out


def views(photo: np.ndarray) -> list[np.ndarray]:
    """Twelve deterministic views of one photo (array views, no copies)."""
    height, width = photo.shape[:2]
    h3, w3 = 3 * height // 4, 3 * width // 4
    crops = [photo, photo[:h3, :w3], photo[:h3, -w3:], photo[-h3:, :w3], photo[-h3:, -w3:],
             photo[height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2]]
    return crops + [crop[:, ::-1] for crop in crops]


def load_samples() -> ArrayDataset:
    images = [view for photo in photos() for view in views(photo)]
    return ArrayDataset("samples", images, None, (), domain="samples")
