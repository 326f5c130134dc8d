"""benchmarks/bench_image_folder.py: its parts on a few images (the 5,000-image run is the benchmark itself)."""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image
from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_image_folder as bench  # noqa: E402

from vitedge.data import imagenet_synsets, load_image_folder, make_transform  # noqa: E402


def test_generated_images_are_photo_like_png_and_jpeg_in_synset_folders(tmp_path):
    paths = bench.generate_images(tmp_path, 12, seed=1)
    assert len(paths) == 12 and {p.suffix for p in paths} == {".png", ".JPEG"}
    with Image.open(paths[0]) as image:
        pixels = np.asarray(image)
    assert 320 <= min(pixels.shape[:2]) and max(pixels.shape[:2]) <= 640
    assert pixels.std() > 20 and len(np.unique(pixels)) > 200  # not flat, not a few colours
    dataset = load_image_folder(tmp_path)
    assert dataset.labels_for(1000).tolist() == sorted(i % bench.CLASSES for i in range(12))
    assert set(dataset.class_names) == set(imagenet_synsets()[: bench.CLASSES])
    stamp = paths[0].stat().st_mtime_ns
    bench.generate_images(tmp_path, 12, seed=1)  # a second run keeps the files
    assert paths[0].stat().st_mtime_ns == stamp
    batch, _ = next(dataset.batches(make_transform(32, 3, (0.5,) * 3, (0.5,) * 3), 12))
    assert batch.shape == (12, 3, 32, 32)


def test_run_child_reports_the_childs_own_peak_memory(tmp_path, monkeypatch):
    (tmp_path / "small_job.py").write_text("print(1)\n")
    (tmp_path / "big_job.py").write_text("b = bytearray(300 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\nprint(2)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    small = bench.run_child("small_job", [])
    big = bench.run_child("big_job", [])
    assert small["stdout"].strip() == "1" and big["stdout"].strip() == "2"
    assert big["peak_rss_mb"] > 300 > small["peak_rss_mb"]


def test_doc_section_states_the_numbers():
    record = {"environment": {"date": "2026-12-01", "cpu": "cpu", "cores": 2, "load_average_at_start": [1.0],
                              "vitedge": "0.1.0", "torch": "2.13", "onnxruntime": "1.32", "embed_dim": 192,
                              "batch_size": 64, "command": "python benchmarks/bench_image_folder.py"},
              "images": 5000, "seconds": 100.0, "images_per_s": 50.0, "peak_rss_mb": 812.4, "max_rss_mb": 1500.0}
    section = bench.doc_section(record)
    assert section.startswith(bench.BEGIN) and section.rstrip().endswith(bench.END)
    assert "| 5000 | 100.0 | 50.0 | 812 | 1500 |" in section
    assert bench.BEGIN in bench.DOC.read_text() and bench.END in bench.DOC.read_text()
