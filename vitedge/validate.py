"""Stage 5, validate: the exported graph (ORT) against the reference PyTorch model on real images.

Token selection can flip under tiny numeric changes, so agreement is measured on what
matters: top-1 class, the set of kept tokens at every selection, and the logit error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .artifact import Artifact
from .data import InputSpec, load_dataset
from .errors import ValidationFailed, VitedgeError
from .resources import forward_bytes, require_memory
from .runtime import ort_session, run_batched


@dataclass
class Thresholds:
    min_top1_agreement: float = 0.999
    min_kept_agreement: float = 0.999
    max_abs_logit_diff: float | None = 1e-3

    @classmethod
    def from_dict(cls, values: dict | None) -> Thresholds:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise VitedgeError(f"unknown validation threshold(s) {', '.join(sorted(unknown))}; known: {', '.join(cls.__dataclass_fields__)}")
        for name, value in values.items():  # NaN would switch a check off (every comparison with it is False)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise VitedgeError(f"validation threshold {name} must be a finite number, got {value!r}")
        return cls(**values)


def input_spec(metadata: dict, img_size: int | None = None) -> InputSpec:
    inp = metadata["input"]
    return InputSpec(img_size or inp["shape"][2], inp["shape"][1], tuple(inp["mean"]), tuple(inp["std"]))


def check_img_size(metadata: dict, img_size: int | None) -> str:
    """The report section for validating at ``img_size``: other sizes need a dynamic-resolution graph."""
    size = metadata["input"]["shape"][2]
    if img_size is None or img_size == size:
        return "validate"
    resolution = metadata["input"].get("resolution")
    patch = metadata["arch"]["patch_size"]
    if not resolution:
        raise VitedgeError(f"this graph takes {size} px inputs only; export with --dynamic-resolution to validate at {img_size}")
    if img_size % patch or not resolution["min"] <= img_size <= resolution["max"]:
        raise VitedgeError(f"size {img_size} is outside this graph's range {resolution['min']}-{resolution['max']} px "
                           f"or not a multiple of the patch size {patch}")
    return f"validate_{img_size}px"


def kept_agreement(reference: np.ndarray, exported: np.ndarray, ordered: bool = False) -> np.ndarray:
    """Per image: is the set of kept token indices identical? (``ordered``: the whole row, element-wise)

    When the exported output is narrower than the reference's (a token budget over a masked
    reference, as A-ViT's fixed-budget form), -1 marks a slot without a live token on both
    sides: the narrower one is padded with -1 and the live sets are compared.
    """
    if exported.shape[1] < reference.shape[1]:
        padding = np.full((len(exported), reference.shape[1] - exported.shape[1]), -1, exported.dtype)
        exported = np.concatenate([exported, padding], axis=1)
    if ordered:
        return (reference == exported).all(axis=1)
    return (np.sort(reference, axis=1) == np.sort(exported, axis=1)).all(axis=1)


def budget_exceeded(reference: np.ndarray, exported: np.ndarray) -> float:
    """Share of images whose live tokens (>= 0) in the reference do not fit the exported width."""
    return float(((reference >= 0).sum(axis=1) > exported.shape[1]).mean())


def compare(reference_logits, exported_logits, reference_kept, exported_kept, labels, names, ordered=False):
    ref_top1 = reference_logits.argmax(1)
    exp_top1 = exported_logits.argmax(1)
    diff = np.abs(reference_logits - exported_logits)
    # The logit bound is checked where every selection agrees: where a near-tie (a score gap
    # below float rounding) picked another token, the logits legitimately differ, and how
    # often that happens is what the kept-token threshold bounds.
    agreements = [kept_agreement(r, e, ordered) for r, e in zip(reference_kept, exported_kept)]
    same = np.logical_and.reduce(agreements) if agreements else np.ones(len(ref_top1), bool)
    metrics = {
        "images": int(len(ref_top1)),
        "top1_agreement": float((ref_top1 == exp_top1).mean()),
        "max_abs_logit_diff": float(diff[same].max()) if same.any() else float(diff.max()),
        "max_abs_logit_diff_all": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "selections_identical": float(same.mean()),
        "kept_agreement": {name: float(agree.mean()) for name, agree in zip(names, agreements)},
        "non_finite_logits": int((~np.isfinite(reference_logits).all(1) | ~np.isfinite(exported_logits).all(1)).sum()),
    }
    narrower = [(name, r, e) for name, r, e in zip(names, reference_kept, exported_kept) if e.shape[1] < r.shape[1]]
    if narrower:  # a budgeted graph: how often the reference's live tokens did not fit the budget
        metrics["budget_exceeded"] = {name: budget_exceeded(r, e) for name, r, e in narrower}
    if labels is not None:
        metrics["reference_accuracy"] = float((ref_top1 == labels).mean())
        metrics["exported_accuracy"] = float((exp_top1 == labels).mean())
    return metrics


def verdict(metrics: dict, thresholds: Thresholds) -> list[str]:
    failures = []
    if metrics.get("non_finite_logits"):
        failures.append(f"{metrics['non_finite_logits']} image(s) give NaN or Inf logits")
    if metrics["top1_agreement"] < thresholds.min_top1_agreement:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {thresholds.min_top1_agreement}")
    for name, value in metrics["kept_agreement"].items():
        if value < thresholds.min_kept_agreement:
            failures.append(f"{name} agreement {value:.4f} < {thresholds.min_kept_agreement}")
    limit = thresholds.max_abs_logit_diff
    if limit is not None and not metrics["max_abs_logit_diff"] <= limit:  # NaN fails too
        failures.append(f"max |logit diff| {metrics['max_abs_logit_diff']:.2e} > {limit:g}")
    return failures


def validate(
    outdir,
    data: str = "fashion-mnist",
    limit: int | None = None,
    thresholds: Thresholds | dict | None = None,
    batch_size: int = 64,
    checkpoint=None,
    threads: int = 2,
    log=None,
    img_size: int | None = None,
) -> dict:
    """Compare the artifact's model.onnx with its reference model; writes report.json["validate"].

    ``img_size`` validates a dynamic-resolution graph at another size of its range, against
    the reference built for that size (report section ``validate_<size>px``). Raises
    ValidationFailed (after writing the report) when a threshold is missed.
    """
    from .pipeline import reference_from_metadata

    if batch_size < 1 or threads < 1:
        raise VitedgeError(f"batch size and threads must be >= 1, got {batch_size} and {threads}")
    artifact = Artifact(outdir)
    arch = artifact.metadata["arch"]
    require_memory(forward_bytes(img_size or arch["img_size"], arch["patch_size"], arch["embed_dim"], arch["num_heads"],
                                 arch.get("mlp_ratio", 4.0), batch_size, arch["in_chans"]),
                   f"validating in batches of {batch_size}", "pass a smaller --batch-size")
    thresholds = thresholds if isinstance(thresholds, Thresholds) else Thresholds.from_dict(
        thresholds if thresholds is not None else artifact.metadata.get("validation", {})
    )
    section_name = check_img_size(artifact.metadata, img_size)
    loaded = reference_from_metadata(artifact.metadata, checkpoint, img_size)
    dataset = load_dataset(data, limit)
    spec = input_spec(artifact.metadata, img_size)
    session = ort_session(artifact.model_path, threads)
    names = artifact.metadata["outputs"][1:]
    if log:
        at = "" if section_name == "validate" else f" at {spec.img_size} px"
        log(f"validating {len(dataset)} {dataset.name} images{at} against the reference model")
    ref_logits, exp_logits, ref_kept, exp_kept, labels = [], [], [], [], []
    with torch.inference_mode():
        for images, batch_labels in dataset.batches(spec, batch_size):
            logits, kept = loaded.model.forward_tokens(torch.from_numpy(images))
            outputs = run_batched(session, images, batch_size)
            ref_logits.append(logits.numpy())
            exp_logits.append(outputs[0])
            ref_kept.append([k.numpy() for k in kept])
            exp_kept.append(outputs[1:])
            if batch_labels is not None:
                labels.append(batch_labels)
    reference_kept = [np.concatenate(parts) for parts in zip(*ref_kept)] if names else []
    exported_kept = [np.concatenate(parts) for parts in zip(*exp_kept)] if names else []
    usable_labels = (
        np.concatenate(labels) if labels and len(dataset.class_names) == loaded.cfg.num_classes else None
    )
    metrics = compare(np.concatenate(ref_logits), np.concatenate(exp_logits), reference_kept, exported_kept, usable_labels, names,
                      ordered=loaded.family.kept_order_matters)
    metrics.update(loaded.family.kept_summary(reference_kept))
    failures = verdict(metrics, thresholds)
    section = {"data": dataset.name, "img_size": spec.img_size, **metrics, "thresholds": asdict(thresholds),
               "passed": not failures, "failures": failures}
    artifact.update_report(section_name, section)
    if failures:
        at = "" if section_name == "validate" else f" at {spec.img_size} px"
        raise ValidationFailed(f"validation failed on {dataset.name}{at}: {'; '.join(failures)}")
    return section
