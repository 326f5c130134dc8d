"""Stage 5, validate: the exported graph (ORT) against the reference PyTorch model on real images.

Token selection can flip under tiny numeric changes, so agreement is measured on what
matters: top-1 class, the set of kept tokens at every selection, and the logit error. A
kept-set difference where the reference's own decision margin was within float rounding of
zero is a near-tie, counted apart and not a failure (docs/fidelity.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .artifact import Artifact
from .data import Transform, domain_note, load_dataset, transform_from_metadata
from .errors import ValidationFailed, VitedgeError
from .resources import forward_bytes, require_memory
from .runtime import ort_session, run_batched
from .tokens import Margin, recording_margins

# A decision margin of at most this many float eps of the scores' largest magnitude is a
# near-tie: the static graph computes those scores in another rounding order (fused kernels,
# split matmuls, other reduction orders), which moved them by at most 3 eps x max|score| in
# the measurements of docs/fidelity.md, and every flip seen there had a margin <= 2 eps x
# max|score|. Much more would excuse real defects on untrained models, whose scores are
# nearly all alike (a shuffled ToMe gather hides behind 64).
NEAR_TIE_ULPS = 8


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


def input_spec(metadata: dict, img_size: int | None = None) -> Transform:
    """The artifact's evaluation transform (``input.transform``; older artifacts: the default from their input)."""
    return transform_from_metadata(metadata, img_size)


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


def _pad_to(kept: np.ndarray, width: int) -> np.ndarray:
    if kept.shape[1] >= width:
        return kept
    return np.concatenate([kept, np.full((len(kept), width - kept.shape[1]), -1, kept.dtype)], axis=1)


def kept_agreement(reference: np.ndarray, exported: np.ndarray, ordered: bool = False) -> np.ndarray:
    """Per image: is the set of kept token indices identical? (``ordered``: the whole row, element-wise)

    When one output is narrower than the other (a token budget over a masked reference, as
    A-ViT's fixed-budget form; or a wrong K), -1 marks a slot without a live token on both
    sides: the narrower one is padded with -1 and the live sets are compared.
    """
    width = max(reference.shape[1], exported.shape[1])
    reference, exported = _pad_to(reference, width), _pad_to(exported, width)
    if ordered:
        return (reference == exported).all(axis=1)
    return (np.sort(reference, axis=1) == np.sort(exported, axis=1)).all(axis=1)


def budget_exceeded(reference: np.ndarray, exported: np.ndarray) -> float:
    """Share of images whose live tokens (>= 0) in the reference do not fit the exported width."""
    return float(((reference >= 0).sum(axis=1) > exported.shape[1]).mean())


@dataclass
class SelectionMargins:
    """The reference's decision margin at one selection, per image, and the near-tie tolerance.

    ``swaps_only``: a near-tie there exchanges kept tokens but never changes how many are live
    (top-k, ToMe); a halting threshold or a sampling draw can change the count.
    """

    gap: np.ndarray
    tolerance: np.ndarray
    swaps_only: bool = True

    @classmethod
    def from_margins(cls, margins: list[Margin], ulps: float = NEAR_TIE_ULPS) -> SelectionMargins:
        """One selection's margins over batches: tolerance = ulps x eps(dtype) x max|score| per image."""
        gap = np.concatenate([m.gap.double().numpy() for m in margins])
        scale = np.concatenate([m.scale.double().numpy() for m in margins])
        eps = float(torch.finfo(margins[0].dtype).eps)
        return cls(gap, ulps * eps * scale, all(m.swaps_only for m in margins))


def near_ties(reference_kept, exported_kept, agreements, margins: list[SelectionMargins]) -> list[np.ndarray]:
    """Per selection, the images whose kept set differs because of a near-tie.

    An image's first differing selection decides: a near-tie where the reference's margin
    there is within its tolerance (and, for ``swaps_only`` selections, both sides keep as many
    live tokens). From then on the two models carry different tokens, so that image's later
    differences follow from the same tie; a first difference above the tolerance makes that
    one and every later one real disagreements.
    """
    images = len(agreements[0]) if agreements else 0
    decided, tied, out = np.zeros(images, bool), np.zeros(images, bool), []
    for ref, exp, agree, margin in zip(reference_kept, exported_kept, agreements, margins):
        first = ~agree & ~decided
        within = margin.gap <= margin.tolerance
        if margin.swaps_only:
            within &= (ref >= 0).sum(axis=1) == (exp >= 0).sum(axis=1)
        tied |= first & within
        decided |= first
        out.append(~agree & tied)
    return out


@dataclass(frozen=True)
class LogitStats:
    """What the metrics need of two models' logits, per image: a validation over 50,000 ImageNet
    images keeps these few numbers per image instead of two 50,000 x 1,000 logit arrays."""

    reference_top1: np.ndarray
    exported_top1: np.ndarray
    max_abs_diff: np.ndarray  # NaN where either side is NaN, as a max over the logits would be
    sum_abs_diff: np.ndarray  # float64, for the mean over every logit
    finite: np.ndarray
    classes: int

    @classmethod
    def of(cls, reference_logits: np.ndarray, exported_logits: np.ndarray) -> LogitStats:
        diff = np.abs(reference_logits - exported_logits)
        return cls(reference_logits.argmax(1), exported_logits.argmax(1), diff.max(1, initial=0.0),
                   diff.sum(1, dtype=np.float64),
                   np.isfinite(reference_logits).all(1) & np.isfinite(exported_logits).all(1), reference_logits.shape[1])

    @classmethod
    def concatenate(cls, parts: list[LogitStats]) -> LogitStats:
        fields = ("reference_top1", "exported_top1", "max_abs_diff", "sum_abs_diff", "finite")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields), parts[0].classes)


def compare(reference_logits, exported_logits, reference_kept, exported_kept, labels, names, ordered=False,
            margins: list[SelectionMargins] | None = None):
    """Agreement metrics; ``margins`` (the reference's, one per selection) turn near-tie
    differences into ``near_ties`` instead of disagreements (``kept_agreement``)."""
    return compare_stats(LogitStats.of(reference_logits, exported_logits), reference_kept, exported_kept, labels, names,
                         ordered, margins)


def compare_stats(logits: LogitStats, reference_kept, exported_kept, labels, names, ordered=False,
                  margins: list[SelectionMargins] | None = None):
    """``compare`` on per-image logit statistics (what ``validate`` accumulates batch by batch)."""
    ref_top1, exp_top1, diff = logits.reference_top1, logits.exported_top1, logits.max_abs_diff
    # The logit bound is checked where every selection agrees: where a near-tie (a score gap
    # below float rounding) picked another token, the logits legitimately differ, and how
    # often a difference is not a near-tie is what the kept-token threshold bounds.
    agreements = [kept_agreement(r, e, ordered) for r, e in zip(reference_kept, exported_kept)]
    same = np.logical_and.reduce(agreements) if agreements else np.ones(len(ref_top1), bool)
    tied = near_ties(reference_kept, exported_kept, agreements, margins) if margins else [np.zeros_like(a) for a in agreements]
    metrics = {
        "images": int(len(ref_top1)),
        "top1_agreement": float((ref_top1 == exp_top1).mean()),
        # None when no image kept the same tokens everywhere (every one diverged at a near-tie)
        "max_abs_logit_diff": float(diff[same].max()) if same.any() else None,
        "max_abs_logit_diff_all": float(diff.max()),
        "mean_abs_logit_diff": float(logits.sum_abs_diff.sum() / (len(diff) * logits.classes)),
        "selections_identical": float(same.mean()),
        # identical sets, or a difference that follows from a near-tie: the thresholded share
        "kept_agreement": {name: float((agree | tie).mean()) for name, agree, tie in zip(names, agreements, tied)},
        "kept_identical": {name: float(agree.mean()) for name, agree in zip(names, agreements)},
        "non_finite_logits": int((~logits.finite).sum()),
    }
    if margins:
        metrics["near_ties"] = {name: _near_tie_summary(tie, agree, margin, tied[:i])
                                for i, (name, agree, tie, margin) in enumerate(zip(names, agreements, tied, margins))}
        metrics["near_tie_tolerance"] = {
            "rule": f"margin <= {NEAR_TIE_ULPS:g} x eps(dtype) x max|score| of that image's selection",
            "ulps": NEAR_TIE_ULPS,
            "largest": max((float(m.tolerance.max()) for m in margins if len(m.tolerance)), default=0.0),
        }
    narrower = [(name, r, e) for name, r, e in zip(names, reference_kept, exported_kept) if e.shape[1] < r.shape[1]]
    if narrower:  # a budgeted graph: how often the reference's live tokens did not fit the budget
        metrics["budget_exceeded"] = {name: budget_exceeded(r, e) for name, r, e in narrower}
    if labels is not None:
        metrics["reference_accuracy"] = float((ref_top1 == labels).mean())
        metrics["exported_accuracy"] = float((exp_top1 == labels).mean())
    return metrics


def _near_tie_summary(tie: np.ndarray, agree: np.ndarray, margin: SelectionMargins, earlier: list[np.ndarray]) -> dict:
    """Near-tie differences at one selection: how many, how many follow from an earlier one,
    the largest margin among those decided here, and the largest tolerance applied here."""
    inherited = tie & np.logical_or.reduce(earlier) if earlier else np.zeros_like(tie)
    here = tie & ~inherited
    return {
        "count": int(tie.sum()),
        "from_earlier": int(inherited.sum()),
        "largest_margin": float(margin.gap[here].max()) if here.any() else None,
        "tolerance": float(margin.tolerance.max()) if len(margin.tolerance) else 0.0,
        "disagreements": int((~agree & ~tie).sum()),
    }


def verdict(metrics: dict, thresholds: Thresholds) -> list[str]:
    failures = []
    if metrics.get("non_finite_logits"):
        failures.append(f"{metrics['non_finite_logits']} image(s) give NaN or Inf logits")
    if metrics["top1_agreement"] < thresholds.min_top1_agreement:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {thresholds.min_top1_agreement}")
    ties = metrics.get("near_ties", {})
    for name, value in metrics["kept_agreement"].items():
        if value < thresholds.min_kept_agreement:
            excluded = f" ({ties[name]['count']} near-ties not counted)" if ties.get(name, {}).get("count") else ""
            failures.append(f"{name} agreement {value:.4f} < {thresholds.min_kept_agreement}{excluded}")
    limit = thresholds.max_abs_logit_diff
    if limit is not None and metrics["max_abs_logit_diff"] is not None and not metrics["max_abs_logit_diff"] <= limit:  # NaN fails too
        failures.append(f"max |logit diff| {metrics['max_abs_logit_diff']:.2e} > {limit:g}")
    return failures


def data_record(dataset, transform, note: str | None) -> dict:
    """What a report says about its images: source, domain, transform, skipped files."""
    record = {"data_domain": dataset.domain, "in_domain": note is None, "transform": transform.to_dict()}
    if note:
        record["domain_note"] = note
    if dataset.skipped:
        record["skipped_images"] = len(dataset.skipped)
        record["skipped_examples"] = dataset.skipped[:5]
    return record


def validate(
    outdir,
    data: str | None = None,
    limit: int | None = None,
    thresholds: Thresholds | dict | None = None,
    batch_size: int = 64,
    checkpoint=None,
    threads: int = 2,
    log=None,
    img_size: int | None = None,
    shuffle_seed: int | None = None,
    skip_bad_images: bool = False,
    graph: str = "portable",
) -> dict:
    """Compare the artifact's model.onnx with its reference model; writes report.json["validate"].

    ``graph`` "optimized" checks model.ort.onnx ('vitedge optimize') instead, with the same
    thresholds (report section ``validate_ort``); "auto" takes it where it was written.

    ``data`` is any ``--data`` source (None: Fashion-MNIST for grey models, the bundled samples
    for RGB ones); the report says when it is not the model's domain.

    ``img_size`` validates a dynamic-resolution graph at another size of its range, against
    the reference built for that size (report section ``validate_<size>px``). Raises
    ValidationFailed (after writing the report) when a threshold is missed.
    """
    from .load import reference_from_metadata

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
    model_path, graph_used = artifact.ort_model(graph)
    if graph_used == "optimized":
        section_name = section_name.replace("validate", "validate_ort", 1)
    loaded = reference_from_metadata(artifact.metadata, checkpoint, img_size)
    spec = input_spec(artifact.metadata, img_size)
    dataset = load_dataset(data, limit, shuffle_seed=shuffle_seed, skip_bad=skip_bad_images, in_chans=spec.in_chans)
    num_classes = loaded.cfg.num_classes
    dataset = dataset.for_model(num_classes)  # labels in the model's classes; refuses class folders that are not
    note = domain_note(dataset, spec.in_chans, num_classes)
    session = ort_session(model_path, threads)
    names = artifact.metadata["outputs"][1:]
    if log:
        at = "" if img_size in (None, artifact.metadata["input"]["shape"][2]) else f" at {spec.img_size} px"
        what = "" if graph_used == "portable" else f"{model_path.name} on "
        log(f"validating {what}{len(dataset)} {dataset.name} images{at} against the reference model ({spec.describe()})")
        if note:
            log(f"note: {note}")
    logit_stats, ref_kept, exp_kept, ref_margins, labels = [], [], [], [], []
    with torch.inference_mode():
        for images, batch_labels in dataset.batches(spec, batch_size, progress=log is not None):
            with recording_margins() as margins:
                logits, kept = loaded.model.forward_tokens(torch.from_numpy(images))
            if len(margins) != len(kept):
                raise VitedgeError(f"the {loaded.family.name} reference reported {len(margins)} decision margins "
                                   f"for {len(kept)} selections (a bug in vitedge; please report it)")
            outputs = run_batched(session, images, batch_size)
            logit_stats.append(LogitStats.of(logits.numpy(), outputs[0]))
            ref_kept.append([k.numpy() for k in kept])
            ref_margins.append(margins)
            exp_kept.append(outputs[1:])
            if batch_labels is not None:
                labels.append(batch_labels)
    if not logit_stats:
        raise VitedgeError(f"none of the {len(dataset)} images of {dataset.name} could be read "
                           f"(skipped {len(dataset.skipped)}, e.g. {dataset.skipped[0]})")
    reference_kept = [np.concatenate(parts) for parts in zip(*ref_kept)] if names else []
    exported_kept = [np.concatenate(parts) for parts in zip(*exp_kept)] if names else []
    usable_labels = np.concatenate(labels) if labels else None
    margins = [SelectionMargins.from_margins(list(parts)) for parts in zip(*ref_margins)] if names else []
    metrics = compare_stats(LogitStats.concatenate(logit_stats), reference_kept, exported_kept, usable_labels, names,
                            ordered=loaded.family.kept_order_matters, margins=margins)
    metrics.update(loaded.family.kept_summary(reference_kept))
    failures = verdict(metrics, thresholds)
    section = {"data": dataset.name, "img_size": spec.img_size, "model": model_path.name,
               **data_record(dataset, spec, note), **metrics,
               "thresholds": asdict(thresholds), "passed": not failures, "failures": failures}
    if dataset.skipped and log:
        log(f"skipped {len(dataset.skipped)} unreadable image(s), e.g. {dataset.skipped[0]}")
    artifact.update_report(section_name, section)
    if failures:
        at = "" if img_size in (None, artifact.metadata["input"]["shape"][2]) else f" at {spec.img_size} px"
        what = "validation" if graph_used == "portable" else f"validation of {model_path.name}"
        raise ValidationFailed(f"{what} failed on {dataset.name}{at}: {'; '.join(failures)}")
    return section
