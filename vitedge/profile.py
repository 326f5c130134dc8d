"""Stage 8, profile: latency percentiles and throughput of an artifact on a backend.

Backends here: ``ort`` (the exported graph, ONNX Runtime CPU), ``torch`` (the reference
model, eager PyTorch with SDPA attention) and ``trt`` (``model.plan`` from ``vitedge build``,
TensorRT, timing GPU compute apart from end-to-end latency with its copies). Thread count is
pinned and recorded. With a latency budget (``--latency-budget-ms`` or the ``--device``
profile's) the result passes or fails; a miss raises BudgetMissed (exit 4) after the report,
the histogram PNG and the JSON are written.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from .artifact import Artifact, write_bytes_atomic
from .errors import BudgetMissed, VitedgeError
from .runtime import graph_batch, ort_session

BACKENDS = ("ort", "torch", "trt")
BUDGET_STATS = ("p50", "p90", "p99", "mean")


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


def ort_runner(model_path, batch: int, threads: int, size: int | None = None):
    """``size`` fills symbolic image axes (a dynamic-resolution graph is timed at one size)."""
    session = ort_session(model_path, threads)
    fixed = graph_batch(session)
    if fixed is not None and fixed != batch:
        raise VitedgeError(
            f"the graph was exported for batch {fixed}; profile with --batch {fixed} or re-export with --dynamic-batch"
        )
    shape = [batch, *(d if isinstance(d, int) else size for d in session.get_inputs()[0].shape[1:])]
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
            device: str | None = None, latency_budget_ms: float | None = None, budget_stat: str = "p99",
            devices_dir=None, histogram: bool = True, precision: str = "fp32", graph: str = "auto") -> dict:
    """Time the artifact on ``backend``; writes report.json["profile"][backend] and profile_<backend>.png.

    ``precision`` fp16/int8 times a quantized ONNX model (section ``<backend>-<precision>``).
    With a budget (``latency_budget_ms``, else the device profile's), the ``budget_stat``
    percentile of end-to-end latency is compared with it; a miss raises BudgetMissed after
    everything is written. ``graph`` (ort, fp32): model.ort.onnx where 'vitedge optimize' wrote it
    ("auto"), or "portable" (model.onnx) / "optimized"; the report says which one ran.
    """
    if graph == "optimized" and (precision != "fp32" or backend != "ort"):
        raise VitedgeError("--graph optimized is the FP32 graph for ONNX Runtime: use --backend ort without --precision")
    if precision != "fp32" and backend != "ort":
        raise VitedgeError(f"--precision {precision} times a quantized ONNX model: use --backend ort")
    if backend not in BACKENDS:
        raise VitedgeError(f"unknown backend '{backend}'; available here: {', '.join(BACKENDS)}")
    if iterations < 1 or warmup < 0:
        raise VitedgeError("iterations must be >= 1 and warmup >= 0")
    if threads < 1:
        raise VitedgeError(f"threads must be >= 1, got {threads}")
    if budget_stat not in BUDGET_STATS:
        raise VitedgeError(f"budget statistic must be one of {', '.join(BUDGET_STATS)}, got '{budget_stat}'")
    if latency_budget_ms is not None and not latency_budget_ms > 0:
        raise VitedgeError(f"the latency budget must be > 0 ms, got {latency_budget_ms}")
    artifact = Artifact(outdir)
    meta = artifact.metadata
    profile_device = None
    if device is not None:
        from .devices import get_device

        profile_device = get_device(device, devices_dir)
        if backend not in profile_device.backends:
            raise VitedgeError(f"device '{device}' runs {', '.join(profile_device.backends)}, not {backend}: "
                               f"use --backend {profile_device.backends[0]} or another --device")
        if latency_budget_ms is None:
            latency_budget_ms = profile_device.latency_budget_ms
    if batch is None:  # 0 is an error below, not "the graph's batch"
        batch = meta["input"]["batch"] if isinstance(meta["input"]["batch"], int) else 1
    if batch < 1:
        raise VitedgeError(f"batch must be >= 1, got {batch}")
    if backend == "trt":
        return _finish(artifact, backend, batch, threads, _profile_trt(artifact, batch, iterations, warmup, profile_device, log),
                       profile_device, latency_budget_ms, budget_stat, histogram, log)
    graph_used = None
    if backend == "ort":
        model_path, graph_used = artifact.ort_model(graph) if precision == "fp32" else (artifact.model_for(precision), "portable")
        if log and precision == "fp32":
            log(f"timing {model_path.name} ({graph_used} graph{'; --graph portable times model.onnx' if graph_used == 'optimized' else ''})")
        run = ort_runner(model_path, batch, threads, meta["input"]["shape"][2])
    else:
        from .load import reference_from_metadata

        model = reference_from_metadata(meta).model
        run = torch_runner(model, [batch, *meta["input"]["shape"][1:]], threads)
    if log:
        log(f"profiling {backend} batch {batch}: {warmup} warm-up + {iterations} timed runs on {threads} threads")
    samples = time_callable(run, iterations, warmup)
    return _finish(artifact, backend, batch, threads, {"end_to_end": samples}, profile_device, latency_budget_ms,
                   budget_stat, histogram, log, precision, graph_used)


def _profile_trt(artifact: Artifact, batch: int, iterations: int, warmup: int, device, log) -> dict:
    """Samples (ms) per stage of ``model.plan``: h2d, gpu_compute, d2h (CUDA events), end_to_end (host clock)."""
    from .build import PLAN
    from .trt_runtime import EngineRunner, gpu_info, import_tensorrt

    plan = artifact.root / PLAN
    if not plan.is_file():
        raise VitedgeError(f"{plan} is missing; run 'vitedge build {artifact.root}' first")
    if "engine" not in artifact.metadata:  # a re-export replaced vitedge.json: the plan is from an older graph
        raise VitedgeError(f"{plan} was not built from this export (vitedge.json has no engine section); "
                           f"run 'vitedge build {artifact.root}' again")
    import_tensorrt()
    gpu = gpu_info()
    if device is not None and device.compute_capability and gpu["compute_capability"] != device.compute_capability:
        raise VitedgeError(f"this GPU ({gpu['name']}, compute capability {gpu['compute_capability']}) is not a "
                           f"{device.name} ({device.compute_capability}); profile on the device itself")
    engine = artifact.metadata.get("engine", {})
    runner = EngineRunner(plan, batch, bool(engine.get("version_compatible")), artifact.metadata["input"]["shape"][2],
                          engine.get("dla_core"))
    try:
        if log:
            log(f"profiling trt batch {batch} on {gpu['name']}: {warmup} warm-up + {iterations} timed runs")
        for _ in range(warmup):
            runner.run()
        stages: dict[str, list[float]] = {"h2d": [], "gpu_compute": [], "d2h": [], "end_to_end": []}
        for _ in range(iterations):
            for key, value in runner.run().items():
                stages[key].append(value)
    finally:
        runner.close()
    stages["gpu"] = gpu
    stages["precision"] = engine.get("precision")
    return stages


def check_budget(stats: dict, budget_ms: float | None, stat: str = "p99") -> dict | None:
    """Pass/fail of one latency statistic against a budget (None without a budget)."""
    if budget_ms is None:
        return None
    measured = stats[f"{stat}_ms"]
    return {"budget_ms": float(budget_ms), "statistic": stat, "measured_ms": measured,
            "margin_ms": float(budget_ms) - measured, "passed": bool(measured <= budget_ms)}


def histogram_png(samples: dict[str, list[float]], title: str, budget_ms: float | None) -> bytes:
    """A latency histogram (end-to-end, and GPU compute where there is one) as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    axes = figure.add_subplot()
    for key, label in (("end_to_end", "end to end"), ("gpu_compute", "GPU compute")):
        if samples.get(key):
            axes.hist(samples[key], bins=min(40, max(5, len(samples[key]) // 3)), alpha=0.6, label=label)
    for value, style, label in ((np.percentile(samples["end_to_end"], 50), "-", "p50"),
                                (np.percentile(samples["end_to_end"], 99), "--", "p99")):
        axes.axvline(value, color="black", linestyle=style, linewidth=1, label=f"{label} {value:.2f} ms")
    if budget_ms is not None:
        axes.axvline(budget_ms, color="red", linewidth=1.5, label=f"budget {budget_ms:g} ms")
    axes.set_xlabel("latency per batch (ms)")
    axes.set_ylabel("runs")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _finish(artifact: Artifact, backend: str, batch: int, threads: int, samples: dict, device, budget_ms, budget_stat,
            histogram: bool, log, precision: str = "fp32", graph: str | None = None) -> dict:
    """Statistics, budget verdict, histogram and report for one profiled backend."""
    stats = latency_stats(samples["end_to_end"], batch)
    result = {
        "backend": backend,
        "batch": batch,
        "threads": threads,
        "processor": platform.processor() or platform.machine(),
        **stats,
    }
    if backend == "trt":
        result["gpu"] = samples["gpu"]
        result["precision"] = samples["precision"]
        result["gpu_compute_ms"] = latency_stats(samples["gpu_compute"], batch)
        result["h2d_ms"] = latency_stats(samples["h2d"], batch)
        result["d2h_ms"] = latency_stats(samples["d2h"], batch)
        result["latency_includes"] = "H2D copy + GPU compute + D2H copy + synchronisation (host clock)"
    if device is not None:
        result["device"] = device.name
    if graph is not None:
        result["graph"] = graph
    budget = check_budget(stats, budget_ms, budget_stat)
    if budget is not None:
        result["budget"] = budget
    section = backend if precision == "fp32" else f"{backend}-{precision}"
    if histogram:
        name = f"profile_{section}.png"
        title = f"{artifact.metadata.get('family')} on {backend}" + (f" ({device.name})" if device else "") + f", batch {batch}"
        write_bytes_atomic(artifact.root / name, histogram_png(samples, title, budget_ms))
        result["histogram"] = name
    sections = artifact.report().get("profile", {})
    if precision != "fp32":
        result["precision"] = precision
    sections[section] = result
    artifact.update_report("profile", sections)
    if budget is not None and not budget["passed"]:
        raise BudgetMissed(f"{backend} {budget_stat} latency {budget['measured_ms']:.2f} ms is over the "
                           f"{budget['budget_ms']:g} ms budget" + (f" of {device.name}" if device else "")
                           + f" (report: {artifact.root / 'report.md'})")
    return result
