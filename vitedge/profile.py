"""Stage 8, profile: latency percentiles and throughput of an artifact on a backend.

Backends here: ``ort`` (the exported graph, ONNX Runtime CPU) and ``torch`` (the reference
model, eager PyTorch with SDPA attention). Thread count is pinned and recorded.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from .artifact import Artifact
from .errors import VitedgeError
from .runtime import graph_batch, ort_session

BACKENDS = ("ort", "torch")


def latency_stats(samples_ms: list[float], batch: int) -> dict:
    values = np.asarray(samples_ms)
    p50 = float(np.percentile(values, 50))
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "cv": float(values.std() / values.mean()) if values.mean() else 0.0,
        "throughput_img_s": batch * 1000.0 / p50,
        "iterations": int(len(values)),
    }


def time_callable(run, iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def ort_runner(model_path, batch: int, threads: int):
    session = ort_session(model_path, threads)
    fixed = graph_batch(session)
    if fixed is not None and fixed != batch:
        raise VitedgeError(
            f"the graph was exported for batch {fixed}; profile with --batch {fixed} or re-export with --dynamic-batch"
        )
    shape = [batch, *session.get_inputs()[0].shape[1:]]
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    return lambda: session.run(None, feed)


def torch_runner(model, shape, threads: int):
    torch.set_num_threads(threads)
    images = torch.randn(*shape)

    def run():
        with torch.inference_mode():
            model(images)

    return run


def profile(outdir, backend: str = "ort", batch: int | None = None, iterations: int = 50, warmup: int = 10, threads: int = 2, log=None,
            precision: str = "fp32") -> dict:
    """Time the artifact on ``backend``; writes report.json["profile"][backend] (["<backend>-<precision>"] for fp16/int8)."""
    if precision != "fp32" and backend != "ort":
        raise VitedgeError(f"--precision {precision} times a quantized ONNX model: use --backend ort")
    if backend not in BACKENDS:
        raise VitedgeError(f"unknown backend '{backend}'; available here: {', '.join(BACKENDS)}")
    if iterations < 1 or warmup < 0:
        raise VitedgeError("iterations must be >= 1 and warmup >= 0")
    if threads < 1:
        raise VitedgeError(f"threads must be >= 1, got {threads}")
    artifact = Artifact(outdir)
    meta = artifact.metadata
    if batch is None:  # 0 is an error below, not "the graph's batch"
        batch = meta["input"]["batch"] if isinstance(meta["input"]["batch"], int) else 1
    if batch < 1:
        raise VitedgeError(f"batch must be >= 1, got {batch}")
    if backend == "ort":
        run = ort_runner(artifact.model_for(precision), batch, threads)
    else:
        from .pipeline import reference_from_metadata

        model = reference_from_metadata(meta).model
        run = torch_runner(model, [batch, *meta["input"]["shape"][1:]], threads)
    if log:
        log(f"profiling {backend} batch {batch}: {warmup} warm-up + {iterations} timed runs on {threads} threads")
    stats = latency_stats(time_callable(run, iterations, warmup), batch)
    result = {
        "backend": backend,
        "batch": batch,
        "threads": threads,
        "processor": platform.processor() or platform.machine(),
        **stats,
    }
    sections = artifact.report().get("profile", {})
    if precision != "fp32":
        result["precision"] = precision
    sections[backend if precision == "fp32" else f"{backend}-{precision}"] = result
    artifact.update_report("profile", sections)
    return result
