"""The export pipeline and the small stages around it, as plain functions (the CLI wraps these)."""

from __future__ import annotations

import collections
import datetime
import sys
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .artifact import METADATA, MODEL, SCHEMA_VERSION, Artifact, staged_outdir, write_bytes_atomic, write_json_atomic
from .artifact import refuse_if_busy
from .backbone import dense_flops
from .check import check_model
from .data import check_source
from .errors import ValidationFailed, VitedgeError
from .export import DEFAULT_OPSET, INPUT_NAME, export_onnx, output_names
from .families import get_family
from .load import LoadedModel, load_model
from .recipe import load_recipe, merge
from .reading import read_npy
from .resources import forward_bytes, require_memory
from .rewrite import to_static
from .runtime import ort_session, run_batched
from .validate import Thresholds, validate


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tool_versions() -> dict:
    import onnxruntime
    import torch

    return {"vitedge": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build_metadata(loaded: LoadedModel, opset: int, batch: int | str, thresholds: dict) -> dict:
    cfg = loaded.cfg
    dense = dense_flops(cfg)
    static = loaded.plan.flops(cfg)
    return {
        "schema_version": SCHEMA_VERSION,
        "family": loaded.family.name,
        "family_summary": loaded.family.summary,
        "arch": cfg.to_dict(),
        "settings": loaded.settings,
        "input": {
            "name": INPUT_NAME,
            "shape": [batch, cfg.in_chans, cfg.img_size, cfg.img_size],
            "batch": batch,
            "layout": "NCHW",
            "dtype": "float32",
            "mean": list(loaded.mean),
            "std": list(loaded.std),
            "scale": "pixels / 255, then (x - mean) / std",
        },
        "outputs": output_names(loaded.plan),
        "token_budgets": loaded.plan.to_dict(),
        "flops": {"dense": dense, "static": static, "ratio": static / dense},
        "opset": opset,
        "precision": "fp32",
        "model": MODEL,
        "checkpoint": {
            "path": str(loaded.checkpoint.path.resolve()),
            "sha256": loaded.checkpoint.sha256,
            "dropped_keys": loaded.dropped_keys,
        },
        "validation": thresholds,
        "tools": tool_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def resolution_range(value, family, cfg) -> tuple[int, int] | None:
    """``"MIN:MAX"`` (or a pair) → sizes for a dynamic-resolution graph, checked against the model."""
    if value is None:
        return None
    try:
        low, high = (int(part) for part in (value.split(":") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise VitedgeError(f"dynamic resolution must be MIN:MAX in pixels, e.g. 224:1024, got {value!r}") from None
    if not family.resolution_agnostic:
        raise VitedgeError(f"family '{family.name}' fixes token counts in the graph (TopK K, budgets), so one graph "
                           "cannot serve several resolutions; export one artifact per --img-size instead")
    patch = cfg.patch_size
    if low % patch or high % patch or not 0 < low <= cfg.img_size <= high:
        raise VitedgeError(f"dynamic resolution {low}:{high} must be multiples of the patch size {patch} around the "
                           f"export size {cfg.img_size} (MIN <= {cfg.img_size} <= MAX; set --img-size for another optimum)")
    return low, high


def profile_sizes(metadata: dict) -> list[int]:
    """The input sizes a graph is built and checked for: min, opt, max of a dynamic resolution, else one."""
    resolution = metadata["input"].get("resolution")
    if not resolution:
        return [metadata["arch"]["img_size"]]
    return sorted({resolution["min"], resolution["opt"], resolution["max"]})


def check_sizes(proto, metadata: dict) -> dict:
    """``check_model`` at every size of the artifact's resolution profile, merged into one section."""
    dynamic = bool(metadata["input"].get("resolution"))
    sizes = profile_sizes(metadata)
    merged = None
    for size in sizes:
        tokens = quadratic_tokens(metadata["family"], {**metadata["arch"], "img_size": size})
        section = _check_section(check_model(proto, quadratic_tokens=tokens, input_size=size if dynamic else None), tokens)
        if merged is None:
            merged = section
            continue
        prefix = f"at {size} px: "
        merged["errors"] += [prefix + e for e in section["errors"]]
        merged["warnings"] += [prefix + w for w in section["warnings"] if w not in merged["warnings"]]
        merged["passed"] = merged["passed"] and section["passed"]
    if dynamic:
        merged["sizes"] = sizes
    return merged


def quadratic_tokens(family_name: str, arch: dict) -> int | None:
    """The token count N whose N x N tensors the lint forbids, for linear-only families.

    A family declares itself linear-only with ``linear_attention = True`` (castling); for the
    others there is no such rule (None).
    """
    if not get_family(family_name).linear_attention:
        return None
    return (arch["img_size"] // arch["patch_size"]) ** 2 + 1


def _check_section(result, tokens: int | None) -> dict:
    section = result.to_dict()
    if tokens is not None:
        section["quadratic_tokens"] = tokens
    return section


def reference_from_metadata(metadata: dict, checkpoint=None, img_size: int | None = None) -> LoadedModel:
    """Rebuild the reference model an artifact was exported from (checks the checkpoint's hash).

    ``img_size`` builds it for another input size of a dynamic-resolution artifact.
    """
    source = metadata["checkpoint"]
    path = Path(checkpoint or source["path"])
    loaded = load_model(
        path,
        family=metadata["family"],
        settings=metadata["settings"],
        img_size=img_size or metadata["arch"]["img_size"],
        num_heads=metadata["arch"]["num_heads"],
    )
    if loaded.checkpoint.sha256 != source["sha256"]:
        raise VitedgeError(f"{path} is not the checkpoint this artifact was exported from (sha256 differs); re-export")
    return loaded


def export(
    checkpoint,
    outdir,
    family: str | None = None,
    arch: str | None = None,
    keep_rate=None,
    img_size: int | None = None,
    recipe=None,
    opset: int | None = None,
    batch_size: int | None = None,
    dynamic_batch: bool | None = None,
    num_heads: int | None = None,
    settings: dict | None = None,
    dynamic_resolution=None,
    validate_data: str | None = "fashion-mnist",
    validate_limit: int | None = 256,
    log=_stderr,
    budgets=None,
    quantile: float | None = None,
) -> dict:
    """checkpoint → OUTDIR/{model.onnx, vitedge.json, report.json, report.md}: load, rewrite, export, check, validate.

    ``dynamic_resolution="MIN:MAX"`` (resolution-agnostic families: deit, castling) makes the
    input size symbolic in that range, optimum at the export size; the graph is checked at
    min/opt/max and validated at each. Set ``validate_data=None`` to skip the quick
    validation. A-ViT: ``budgets`` (a file from ``vitedge calibrate``) or ``quantile``
    (calibrated here, on Fashion-MNIST train images) turns the masked graph into a
    fixed-budget one. Returns the report. Raises
    VitedgeError on bad input (OUTDIR untouched) and ValidationFailed when the exported
    graph disagrees with the reference (OUTDIR untouched too; the attempt, with a report
    saying why, is in OUTDIR.failed/).
    """
    options = merge(load_recipe(recipe), {
        "family": family, "arch": arch, "keep_rate": keep_rate, "img_size": img_size, "opset": opset,
        "batch_size": batch_size, "dynamic_batch": dynamic_batch, "num_heads": num_heads, "settings": settings,
        "dynamic_resolution": dynamic_resolution,
    })
    validation = options.get("validation") or {}
    if not isinstance(validation, dict):
        raise VitedgeError("recipe 'validation' must be a mapping, e.g. {thresholds: {min_top1_agreement: 0.999}}")
    thresholds = Thresholds.from_dict(validation.get("thresholds"))
    opset = int(options["opset"]) if options.get("opset") is not None else DEFAULT_OPSET
    batch = int(options["batch_size"]) if options.get("batch_size") is not None else 1  # 0 is an error, not "default"
    dynamic = bool(options.get("dynamic_batch", False))

    if validate_data:
        check_source(validate_data, validate_limit)
    refuse_if_busy(Path(outdir))
    log(f"[1/4] loading {checkpoint}")
    loaded = load_model(
        checkpoint, family=options.get("family"), arch=options.get("arch"), settings=options["settings"],
        img_size=options.get("img_size"), num_heads=options.get("num_heads"),
    )
    cfg = loaded.cfg
    require_memory(forward_bytes(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
                                 max(batch, 2) if dynamic else batch, cfg.in_chans),
                   f"exporting a batch of {batch} at {cfg.img_size} px", "pick a smaller --batch-size or --img-size")
    if budgets is not None or quantile is not None:
        loaded = _budgeted(loaded, budgets, quantile, log)
    thresholds = Thresholds.from_dict({**loaded.family.default_thresholds(loaded.settings), **(validation.get("thresholds") or {})})
    log(f"      {loaded.family.name}: {loaded.cfg.embed_dim}-dim, {loaded.cfg.depth} blocks, "
        f"{loaded.cfg.img_size} px, settings {loaded.settings}")
    resolution = resolution_range(options.get("dynamic_resolution"), loaded.family, loaded.cfg)
    static = to_static(loaded.model, loaded.plan)
    static.resample_positions = resolution is not None
    with staged_outdir(Path(outdir)) as stage:
        sizes = f", {resolution[0]}-{resolution[1]} px" if resolution else ""
        log(f"[2/4] exporting static ONNX (opset {opset}, batch {'dynamic' if dynamic else batch}{sizes})")
        proto = export_onnx(static, loaded.cfg, loaded.plan, stage / MODEL, opset, batch, dynamic, resolution)
        metadata = build_metadata(loaded, opset, "dynamic" if dynamic else batch, vars(thresholds))
        if resolution:
            metadata["input"]["resolution"] = {"min": resolution[0], "opt": loaded.cfg.img_size, "max": resolution[1]}
        write_json_atomic(stage / METADATA, metadata)
        log("[3/4] checking static shapes and TensorRT compatibility")
        section = check_sizes(proto, metadata)
        if not section["passed"]:
            raise VitedgeError(f"exported graph fails the static/TensorRT check: {section['errors'][0]}")
        artifact = Artifact(stage)
        artifact.update_report("check", section)
        failure = None
        if validate_data:
            log(f"[4/4] validating on {validate_data}" + (f" ({validate_limit} images)" if validate_limit else ""))
            for size in profile_sizes(metadata):
                try:
                    validate(stage, validate_data, validate_limit, thresholds, img_size=size if resolution else None,
                             log=log)
                except ValidationFailed as exc:
                    failure = failure or exc
            if failure is not None:
                raise failure  # inside the stage: OUTDIR keeps its previous artifact, the attempt goes to OUTDIR.failed
        else:
            log("[4/4] validation skipped")
    report = Artifact(outdir).report()
    log(f"wrote {Path(outdir) / MODEL} ({(Path(outdir) / MODEL).stat().st_size / 1e6:.1f} MB), FLOPs ratio "
        f"{metadata['flops']['ratio']:.3f} vs dense")
    return report


def _budgeted(loaded: LoadedModel, budgets, quantile, log) -> LoadedModel:
    """``loaded`` with the token budgets of a calibration file, or calibrated now at ``quantile``."""
    from .calibrate import choose_budgets, measure_live_patches, read_budgets, with_budgets

    if budgets is not None and quantile is not None:
        raise VitedgeError("give --budgets FILE or --quantile q, not both")
    if loaded.family.name != "avit":
        raise VitedgeError(f"--budgets/--quantile set token budgets of halting models (family 'avit'), not '{loaded.family.name}'")
    if budgets is not None:
        chosen = read_budgets(budgets, loaded)
        quantile = None
    else:
        from .families.avit import check_quantile

        check_quantile(quantile)
        log(f"      calibrating budgets at quantile {quantile:g} on fashion-mnist train images")
        chosen, _ = choose_budgets(loaded, measure_live_patches(loaded)[0], quantile)
    log(f"      token budgets per block: {chosen}")
    return with_budgets(loaded, chosen, quantile)


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

    images = read_npy(input_path, "input file")
    logits = predict(outdir, images)
    buffer = io.BytesIO()
    np.save(buffer, logits)
    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        raise VitedgeError(f"output folder {output_path.parent} does not exist")
    write_bytes_atomic(output_path, buffer.getvalue())
    return logits


__all__ = ["export", "check", "inspect", "predict", "predict_file", "reference_from_metadata", "tool_versions"]
