"""FP32 vs FP16 vs INT8 for every bundled Fashion-MNIST model: accuracy, agreement, size, ORT CPU latency.

Per ``models/fmnist-*.safetensors`` (every family that has a bundled model; new families are
picked up by file name): export (dynamic batch, as the pipeline does), then ``vitedge.quantize``
into these variants, each checked by the static/TensorRT lint inside ``quantize``:

- ``fp16``: LayerNorm / Softmax / LogSoftmax and the selection path in FP32;
- ``int8``: static QDQ, minmax calibration on ``calibration/fmnist-train-512.yaml``, selection
  path in FP32 (the default);
- ``int8+sel``: the same with the selection path quantized too (``include_selection``);
- ``int8-percentile``, ``int8-entropy``: the other calibrators, default exclusions.

Each variant is compared with the FP32 graph on all 10,000 Fashion-MNIST test images
(``validate_quantized``: accuracy, top-1 agreement, kept-token agreement per selection, first
disagreement). Latency: ONNX Runtime CPU, ``--threads`` threads, batch 1 and 64, after a
warm-up ``--rounds`` rounds that time every model of a family once in turn; medians, ratios to
FP32 from the same rounds.

Writes benchmarks/results/quantization.json and the results section of docs/quantization.md.
Usage: python benchmarks/bench_quantization.py [--limit N] [--variants fp16 int8 ...] [--rounds N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vitedge  # noqa: E402
from bench_token_pruning import write_doc_section  # noqa: E402
from vitedge.errors import ValidationFailed  # noqa: E402
from vitedge.pipeline import tool_versions  # noqa: E402
from vitedge.quantize import quantize, validate_quantized  # noqa: E402
from vitedge.runtime import ort_session  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quantization.json"
DOC = ROOT / "docs" / "quantization.md"
BEGIN, END = "<!-- quantization-results:begin -->", "<!-- quantization-results:end -->"
VARIANTS = {
    "fp16": {"precision": "fp16"},
    "int8": {"precision": "int8", "method": "minmax"},
    "int8+sel": {"precision": "int8", "method": "minmax", "include_selection": True},
    "int8-percentile": {"precision": "int8", "method": "percentile"},
    "int8-entropy": {"precision": "int8", "method": "entropy"},
}


def quiet(_message):
    pass


def time_models(paths: dict[str, Path], batch: int, rounds: int, warmup: int, threads: int) -> dict:
    """Median latency (ms) per model, timed in turn within each round."""
    sessions = {name: ort_session(path, threads) for name, path in paths.items()}
    feed = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
    runs = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for name, s in sessions.items()}
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples = {name: [] for name in runs}
    repeat = max(1, 64 // batch)  # several calls per sample at batch 1: the models take about a millisecond
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeat):
                run()
            samples[name].append((time.perf_counter() - start) * 1000.0 / repeat)
    return {name: float(np.median(values)) for name, values in samples.items()}


def bench_family(checkpoint: Path, work: Path, args) -> dict:
    family = checkpoint.stem.removeprefix("fmnist-")
    base = work / family
    t0 = time.perf_counter()
    vitedge.export(checkpoint, base, dynamic_batch=True, validate_data=None, log=quiet)
    print(f"{family}: exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    paths = {"fp32": base / "model.onnx"}
    rows = {}
    for name in args.variants:
        options = dict(VARIANTS[name])
        folder = work / f"{family}-{name}"
        shutil.copytree(base, folder)
        t0 = time.perf_counter()
        entry = quantize(folder, validate_data=None, log=quiet, **options)
        seconds = time.perf_counter() - t0
        try:
            metrics = validate_quantized(folder, options["precision"], "fashion-mnist", args.limit, thresholds={}, batch_size=256)
        except ValidationFailed:
            metrics = vitedge.Artifact(folder).report()["quantized"][options["precision"]]["validate"]
        path = folder / entry["quantize"]["model"]
        paths[name] = path
        rows[name] = {
            "quantize_seconds": seconds,
            "check_passed": entry["check"]["passed"],
            "size_bytes": path.stat().st_size,
            "excluded_nodes": len(vitedge.Artifact(folder).metadata["quantized"][options["precision"]]["excluded_nodes"]),
            **{k: metrics[k] for k in ("images", "fp32_accuracy", "accuracy", "accuracy_drop", "top1_agreement",
                                       "kept_agreement", "first_disagreement", "first_disagreement_top1_flips",
                                       "max_abs_logit_diff", "passed", "failures")},
        }
        print(f"{family} {name}: acc {100 * metrics['accuracy']:.2f} (fp32 {100 * metrics['fp32_accuracy']:.2f}), "
              f"agreement {100 * metrics['top1_agreement']:.2f}, {seconds:.0f} s", file=sys.stderr, flush=True)
    latency = {f"batch{b}": time_models(paths, b, args.rounds, args.warmup, args.threads) for b in (1, 64)}
    return {
        "family": family,
        "checkpoint": str(checkpoint.relative_to(ROOT)),
        "fp32_size_bytes": paths["fp32"].stat().st_size,
        "variants": rows,
        "latency_ms": latency,
    }


def _pct(value) -> str:
    return f"{100 * value:.2f}"


def render(payload: dict) -> str:
    env = payload["environment"]
    lines = [BEGIN, "", f"Measured {env['date']} on {env['processor']} ({env['cpus']} CPUs, load average "
             f"{env['load_average']}), ONNX Runtime {env['tools']['onnxruntime']}, {env['threads']} threads, "
             f"{payload['images']} Fashion-MNIST test images. Produced by `python benchmarks/bench_quantization.py`.", "",
             "### Accuracy and agreement with the FP32 graph", "",
             "| family | variant | accuracy % (FP32 → variant) | change (points) | top-1 agreement % | kept-token agreement % per selection | first selection disagreement (images) | check |",
             "|---|---|---|---|---|---|---|---|"]
    for fam in payload["families"]:
        for name, row in fam["variants"].items():
            kept = ", ".join(f"{k.removeprefix('kept_tokens_')}: {_pct(v)}" for k, v in row["kept_agreement"].items()) or "—"
            first = ", ".join(f"{k.removeprefix('kept_tokens_')}: {v}" for k, v in sorted(row["first_disagreement"].items())
                              if k != "none") or "—"
            lines.append(f"| {fam['family']} | {name} | {_pct(row['fp32_accuracy'])} → {_pct(row['accuracy'])} | "
                         f"{-100 * row['accuracy_drop']:+.2f} | {_pct(row['top1_agreement'])} | {kept} | {first} | "
                         f"{'passes' if row['check_passed'] else 'FAILS'} |")
    lines += ["", "Kept-token agreement: share of images whose kept set at that block (patch indices) is identical "
              "to the FP32 graph's. First disagreement: per block, the number of images whose selections first "
              "differ there.", "", "### Size on disk and ONNX Runtime CPU latency (ratios to FP32, same run)", "",
              "| family | variant | size MB | size / FP32 | batch 1 ms | batch 1 / FP32 | batch 64 ms | batch 64 / FP32 |",
              "|---|---|---|---|---|---|---|---|"]
    for fam in payload["families"]:
        sizes = {"fp32": fam["fp32_size_bytes"], **{k: v["size_bytes"] for k, v in fam["variants"].items()}}
        lat1, lat64 = fam["latency_ms"]["batch1"], fam["latency_ms"]["batch64"]
        for name, size in sizes.items():
            lines.append(f"| {fam['family']} | {name} | {size / 1e6:.2f} | {size / sizes['fp32']:.2f} | "
                         f"{lat1[name]:.3f} | {lat1[name] / lat1['fp32']:.2f} | {lat64[name]:.2f} | {lat64[name] / lat64['fp32']:.2f} |")
    lines += ["", END]
    return "\n".join(lines)


def write_doc(payload: dict) -> None:
    write_doc_section(DOC, BEGIN, END, render(payload) + "\n", "# Quantization\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--families", nargs="*", help="only these families (default: every models/fmnist-*.safetensors)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true", help=f"re-write the docs section from {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.render_only:
        write_doc(json.loads(RESULTS.read_text()))
        return
    torch.set_num_threads(1)
    checkpoints = sorted((ROOT / "models").glob("fmnist-*.safetensors"))
    if args.families:
        checkpoints = [c for c in checkpoints if c.stem.removeprefix("fmnist-") in args.families]
    with tempfile.TemporaryDirectory(prefix="vitedge-bench-quant-") as work:
        families = [bench_family(c, Path(work), args) for c in checkpoints]
    rerun = {f["family"] for f in families}
    previous = json.loads(RESULTS.read_text())["families"] if args.families and RESULTS.is_file() else []
    measured = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "load_average": [round(x, 2) for x in os.getloadavg()]}
    for fam in families:
        fam["measured"] = measured
    payload = {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "threads": args.threads, "tools": tool_versions(),
        },
        "images": args.limit or 10000,
        "calibration": "calibration/fmnist-train-512.yaml",
        # --families re-runs some families and keeps the others' recorded rows
        "families": [f for f in previous if f["family"] not in rerun] + families,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    write_doc(payload)
    print(render(payload))


if __name__ == "__main__":
    main()
