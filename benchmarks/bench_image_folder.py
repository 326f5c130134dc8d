"""Streaming validation on a large image folder: peak memory and images/s.

Generates ``--count`` photo-like images (smooth colour fields, shapes and grain; sizes from
320 to 640 px; half PNG, half JPEG; ImageNet synset folders) once, exports a 224-px RGB DeiT
in the official key layout (random weights, ``--embed-dim`` wide) and runs
``vitedge validate ART --data FOLDER`` in a child process, which reads the folder in batches
through the model's evaluation transform. Records the child's peak RSS (VmHWM) and its images/s
(wall time of the child, its ~10 s start-up included), and fails when the peak is over
``--max-rss-mb`` (1,500 MB; a folder read whole would need ~10 GB for ImageNet's 50,000
validation images).

Writes benchmarks/results/image_folder.json (``--output``) and the measured section of
docs/data.md (between the image-folder-bench markers; not with ``--output`` elsewhere).

Usage: python benchmarks/bench_image_folder.py [--count 5000] [--folder /tmp/vitedge-bench-images] [--embed-dim 192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "image_folder.json"
DOC = ROOT / "docs" / "data.md"
BEGIN, END = "<!-- image-folder-bench:begin -->", "<!-- image-folder-bench:end -->"
CLASSES = 10


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 RGB image with the statistics that matter for decoding and resizing: smooth
    gradients, a few hard-edged shapes, fine grain (so PNG and JPEG do not compress to nothing)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    phase = rng.uniform(0, 6.3, 3)
    freq = rng.uniform(2, 8, 3)
    image = np.stack([np.sin(freq[c] * (x * np.cos(phase[c]) + y * np.sin(phase[c])) + phase[c]) for c in range(3)], -1)
    image = image * 70 + rng.uniform(90, 160, 3)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` images in CLASSES synset folders (the first ImageNet synsets), alternately PNG and JPEG;
    existing files are kept, so a second run reuses the folder."""
    from vitedge.data import imagenet_synsets

    synsets = imagenet_synsets()[:CLASSES]
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        height, width = (int(v) for v in rng.integers(320, 641, 2))
        suffix = ".png" if index % 2 == 0 else ".JPEG"
        path = folder / synsets[index % CLASSES] / f"img_{index:06d}{suffix}"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(photo_like(rng, height, width))
        image.save(path, **({"format": "JPEG", "quality": 90} if suffix == ".JPEG" else {"format": "PNG"}))
    return paths


def make_artifact(outdir: Path, embed_dim: int) -> Path:
    """A 224-px, 1000-class RGB DeiT (the reference module's timm key layout, its random init), exported
    without validation."""
    import torch

    import vitedge
    from vitedge.backbone import ViTConfig

    cfg = ViTConfig(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=embed_dim, depth=12,
                    num_heads=max(1, embed_dim // 64))
    family = vitedge.get_family("deit")
    torch.manual_seed(0)
    model = family.reference(cfg, family.resolve_settings(cfg, {}))
    checkpoint = outdir / "deit.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    vitedge.export(checkpoint, outdir / "art", family="deit", num_heads=cfg.num_heads, validate_data=None,
                   log=lambda message: None)
    return outdir / "art"


PEAK_MARK = "bench_image_folder peak_rss_kb="
# Runs a module as __main__ and prints its own peak RSS on the way out: VmHWM of its address space
# (getrusage's ru_maxrss would also count the parent's pages in a forked child before it execs).
_WRAPPER = (
    "import re, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    status = open('/proc/self/status').read()\n"
    f"    print('{PEAK_MARK}' + re.search(r'VmHWM:\\s*(\\d+)', status).group(1), file=sys.stderr)\n"
)


def run_child(module: str, args: list[str]) -> dict:
    """``python -m module args``: its wall time, output and own peak RSS (MB)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, module, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"python -m {module} failed ({result.returncode}): {result.stderr.strip().splitlines()[-2:]}")
    peak_kb = int(result.stderr.rsplit(PEAK_MARK, 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "stdout": result.stdout, "stderr": result.stderr}


def doc_section(record: dict) -> str:
    """The measured part of docs/data.md."""
    env = record["environment"]
    return (f"{BEGIN}\n"
            f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), load average "
            f"{env['load_average_at_start'][0]} at the start; {env['vitedge']} / torch {env['torch']} / onnxruntime "
            f"{env['onnxruntime']}. `vitedge validate` of a {record['images']}-image folder (generated photo-like PNG and "
            f"JPEG, 320-640 px, 10 synset folders) with a {env['embed_dim']}-wide, 12-block 224-px DeiT, batch "
            f"{env['batch_size']}:\n\n"
            "| images | wall time (s) | images/s | peak RSS (MB) | limit (MB) |\n|---|---|---|---|---|\n"
            f"| {record['images']} | {record['seconds']:.1f} | {record['images_per_s']:.1f} | {record['peak_rss_mb']:.0f} | "
            f"{record['max_rss_mb']:.0f} |\n\n"
            f"Reproduce: `{env['command']}`.\n{END}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "vitedge-bench-images")
    parser.add_argument("--embed-dim", type=int, default=192, help="192: DeiT-Tiny width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-rss-mb", type=float, default=1500.0)
    parser.add_argument("--output", type=Path, default=RESULT, help="where the JSON record goes")
    args = parser.parse_args(argv)

    from bench_token_pruning import run_environment

    start = time.perf_counter()
    generate_images(args.folder, args.count)
    generated = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="vitedge-bench-") as scratch:
        art = make_artifact(Path(scratch), args.embed_dim)
        child = run_child("vitedge.cli", ["validate", str(art), "--data", str(args.folder), "--limit", str(args.count),
                                          "--batch-size", str(args.batch_size)])
    summary = json.loads(child["stdout"])
    record = {
        "environment": run_environment(args.threads, 1, 0, "python benchmarks/bench_image_folder.py "
                                       + " ".join(argv if argv is not None else sys.argv[1:]),
                                       images=args.count, embed_dim=args.embed_dim, batch_size=args.batch_size),
        "images": summary["images"],
        "seconds": round(child["seconds"], 2),
        "images_per_s": round(summary["images"] / child["seconds"], 1),
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
        "max_rss_mb": args.max_rss_mb,
        "generate_seconds": round(generated, 1),
        "passed": child["peak_rss_mb"] <= args.max_rss_mb,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    if args.output == RESULT:
        from bench_token_pruning import write_doc_section

        write_doc_section(DOC, BEGIN, END, doc_section(record), "")
    print(json.dumps({k: record[k] for k in ("images", "images_per_s", "peak_rss_mb", "passed")}))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
