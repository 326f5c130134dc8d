"""Write vitedge/data/samples/*.jpg from scikit-image's sample images (run once; the files are committed)."""

from __future__ import annotations

import numpy as np
import skimage.data
from PIL import Image

from vitedge.data.samples import PHOTOS, SAMPLES_DIR

for name in PHOTOS:
    image = Image.fromarray(np.asarray(getattr(skimage.data, name)()))
    image.thumbnail((448, 448), Image.Resampling.LANCZOS)
    image.save(SAMPLES_DIR / f"{name}.jpg", quality=88, optimize=True)
    print(f"{name}.jpg {image.size[0]}x{image.size[1]} {image.mode}")
