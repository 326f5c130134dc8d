"""ONNX Runtime sessions configured the way every stage times and runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import VitedgeError

FLUSH_DENORMALS = "session.set_denormal_as_zero"  # ONNX Runtime's flush-to-zero / denormals-are-zero switch


def ort_session(path: str | Path, threads: int = 2, profile_prefix: str | None = None,
                flush_denormals: bool = True) -> ort.InferenceSession:
    """A CPU session with pinned thread count and spin-waiting off (fair interleaved timing on few cores).

    Denormals are flushed to zero: masked attention keys (A-ViT's -1000 bias on halted tokens)
    send MLAS's exp through float32's denormal range, where each multiply takes a
    microcode assist (a Softmax with a quarter of its keys masked ran 4-8 x slower); their weights
    are below 1.2e-38 either way. ONNX Runtime applies the flag to each session's pool threads, but
    to the calling thread only from the first session a process creates (its documented rule), so
    every session here sets it (``flush_denormals=False`` only for benchmarks that measure it).

    ``profile_prefix`` turns on ONNX Runtime's per-node profiler, writing JSON under that prefix.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry(FLUSH_DENORMALS, "1" if flush_denormals else "0")
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable / invalid models
        raise VitedgeError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:200]}") from None


def graph_batch(session: ort.InferenceSession) -> int | None:
    """The graph's fixed batch size, or None when the batch dimension is symbolic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def run_batched(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """Run ``images`` through ``session`` in chunks the graph accepts; returns every output, concatenated."""
    fixed = graph_batch(session)
    step = fixed or batch_size
    name = session.get_inputs()[0].name
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        count = len(chunk)
        if fixed and count < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - count, axis=0)])
        chunks.append([out[:count] for out in session.run(None, {name: chunk})])
    return [np.concatenate(parts) for parts in zip(*chunks)]
