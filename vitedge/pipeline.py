"""Orchestration: the Python API the CLI wraps, over the stages (nothing below imports this module).

``export`` is the artifact export (``artifact_export``); ``check``, ``inspect``, ``predict`` are
the small commands around an artifact.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx

from .artifact import Artifact, write_bytes_atomic
from .artifact_export import export, tool_versions
from .check import check_sizes
from .errors import VitedgeError
from .load import reference_from_metadata
from .runtime import ort_session, run_batched


def check(outdir, precision: str | None = None) -> dict:
    """Re-run the static/TensorRT lint on an artifact; writes report.json["check"].

    ``precision`` None checks every model file (quantized ones under result["quantized"]);
    fp32, fp16 or int8 checks that one model.
    """
    from .quantize import check_quantized

    artifact = Artifact(outdir)
    if precision not in (None, "fp32"):
        return check_quantized(outdir, precision)
    try:
        proto = onnx.load(str(artifact.model_path))
    except Exception as exc:  # onnx raises DecodeError and friends on damaged files
        raise VitedgeError(f"cannot read {artifact.model_path}: {exc}") from None
    result = check_sizes(proto, artifact.metadata)
    artifact.update_report("check", result)
    if precision is None and artifact.metadata.get("quantized"):
        result["quantized"] = {name: check_quantized(outdir, name) for name in artifact.metadata["quantized"]}
    return result


def inspect(outdir) -> dict:
    """Budgets per block, FLOPs dense vs static, and the graph's op histogram."""
    artifact = Artifact(outdir)
    proto = onnx.load(str(artifact.model_path), load_external_data=False)
    meta = artifact.metadata
    validation = artifact.report().get("validate", {})
    return {
        **{k: validation[k] for k in ("halting", "budget_exceeded") if k in validation},
        "family": meta["family"],
        "settings": meta["settings"],
        "input": meta["input"],
        "outputs": meta["outputs"],
        "token_budgets": meta["token_budgets"],
        "flops": meta["flops"],
        "ops": dict(collections.Counter(n.op_type for n in proto.graph.node).most_common()),
        "checkpoint": meta["checkpoint"],
        "report": {k: v.get("passed") for k, v in artifact.report().items() if isinstance(v, dict) and "passed" in v},
    }


def predict(outdir, images: np.ndarray, threads: int = 2) -> np.ndarray:
    """Logits for ``images`` (NCHW float32, already normalised as vitedge.json says) via ONNX Runtime."""
    artifact = Artifact(outdir)
    expected = artifact.metadata["input"]["shape"][1:]
    images = np.asarray(images)
    if images.ndim != 4 or list(images.shape[1:]) != list(expected):
        raise VitedgeError(f"input has shape {list(images.shape)}; this model takes [N, {', '.join(map(str, expected))}] (NCHW)")
    if images.dtype != np.float32:
        raise VitedgeError(f"input dtype is {images.dtype}; this model takes float32 (normalised as in vitedge.json)")
    if len(images) == 0:
        raise VitedgeError("input holds no images (shape [0, ...])")
    session = ort_session(artifact.model_path, threads)
    return run_batched(session, images)[0]


def predict_file(outdir, input_path, output_path) -> np.ndarray:
    """``predict`` from one .npy file to another (written atomically)."""
    import io

    input_path = Path(input_path)
    if not input_path.is_file():
        raise VitedgeError(f"input file not found: {input_path}")
    try:
        images = np.load(input_path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise VitedgeError(f"{input_path} is not a .npy array: {exc}") from None
    logits = predict(outdir, images)
    buffer = io.BytesIO()
    np.save(buffer, logits)
    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        raise VitedgeError(f"output folder {output_path.parent} does not exist")
    write_bytes_atomic(output_path, buffer.getvalue())
    return logits


__all__ = ["export", "check", "inspect", "predict", "predict_file", "reference_from_metadata", "tool_versions"]
