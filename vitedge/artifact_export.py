"""Export an artifact: load → rewrite → export → check → validate into a staged folder.

The stage that ``vitedge export``, ``vitedge tune`` and ``vitedge export-bundle`` share; it sits
after check/validate in the one-way order, so no lower stage reaches back into it.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import onnx

from .artifact import METADATA, MODEL, SCHEMA_VERSION, Artifact, refuse_if_busy, staged_outdir, write_json_atomic
from .backbone import dense_flops
from .calibrate import load_calibrated
from .check import check_sizes, profile_sizes
from .data import DEFAULT_DATA, Transform, check_source, default_source, make_transform, parse_transform_option
from .errors import ValidationFailed, VitedgeError
from .export import DEFAULT_OPSET, INPUT_NAME, export_onnx, output_names
from .load import LoadedModel
from .recipe import load_recipe, merge
from .resources import forward_bytes, require_memory
from .rewrite import to_static
from .validate import Thresholds, validate
from .version import __version__


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tool_versions() -> dict:
    import onnxruntime
    import torch

    return {"vitedge": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build_metadata(loaded: LoadedModel, opset: int, batch: int | str, thresholds: dict,
                   transform: Transform | None = None) -> dict:
    cfg = loaded.cfg
    transform = transform or make_transform(cfg.img_size, cfg.in_chans, loaded.mean, loaded.std)
    dense = dense_flops(cfg)
    static = loaded.plan.flops(cfg)
    return {
        "schema_version": SCHEMA_VERSION,
        "family": loaded.family.name,
        "family_summary": loaded.family.summary,
        "arch": cfg.to_dict(),
        "settings": loaded.settings,
        "input": {
            **loaded.family.describe_input(cfg, loaded.settings),
            "name": INPUT_NAME,
            "shape": [batch, cfg.in_chans, cfg.img_size, cfg.img_size],
            "batch": batch,
            "layout": "NCHW",
            "dtype": "float32",
            "mean": list(transform.mean),
            "std": list(transform.std),
            "scale": "pixels / 255, then (x - mean) / std",
            "transform": transform.to_dict(),
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
                           "cannot serve several input sizes; export one artifact per --img-size instead")
    patch = cfg.patch_size
    if low % patch or high % patch or not 0 < low <= cfg.img_size <= high:
        raise VitedgeError(f"dynamic resolution {low}:{high} must be multiples of the patch size {patch} around the "
                           f"export size {cfg.img_size} (MIN <= {cfg.img_size} <= MAX; set --img-size for another optimum)")
    return low, high


def export(
    checkpoint,
    outdir,
    family: str | None = None,
    arch: str | None = None,
    img_size: int | None = None,
    recipe=None,
    opset: int | None = None,
    batch_size: int | None = None,
    dynamic_batch: bool | None = None,
    num_heads: int | None = None,
    settings: dict | None = None,
    dynamic_resolution=None,
    validate_data: str | None = DEFAULT_DATA,
    validate_limit: int | None = 256,
    log=_stderr,
    calibration=None,
    calib=None,
    transform=None,
    validate_seed: int | None = None,
    skip_bad_images: bool = False,
    **named_settings,
) -> dict:
    """checkpoint → OUTDIR/{model.onnx, vitedge.json, report.json, report.md}: load, rewrite, export, check, validate.

    Family settings come from ``settings``, keyword arguments (``NAME=value``) and the recipe;
    ``vitedge families`` lists them. ``dynamic_resolution="MIN:MAX"`` (resolution-agnostic
    families) makes the input size symbolic in that range, optimum at the export size; the graph
    is checked at min/opt/max and validated at each. Set ``validate_data=None`` to skip the quick
    validation (default: Fashion-MNIST for grey models, the bundled samples for RGB ones).
    Data-dependent settings (``Family.calibrated_settings``) are read from ``calibration`` (a
    ``vitedge calibrate`` file) or calibrated here on the calibration set ``calib`` (default:
    the model's default set). ``transform`` (a preset name, ``key=value`` text or a mapping; also
    the recipe's ``transform``) overrides the evaluation transform recorded in vitedge.json.
    Returns the report. Raises
    VitedgeError on bad input (OUTDIR untouched) and ValidationFailed when the exported
    graph disagrees with the reference (OUTDIR untouched too; the attempt, with a report
    saying why, is in OUTDIR.failed/).
    """
    options = merge(load_recipe(recipe), {
        "family": family, "arch": arch, "img_size": img_size, "opset": opset, "batch_size": batch_size,
        "dynamic_batch": dynamic_batch, "num_heads": num_heads, "settings": {**(settings or {}), **named_settings},
        "dynamic_resolution": dynamic_resolution,
    })
    transform_overrides = {**_transform_values(options.get("transform")), **_transform_values(transform)}
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
    loaded = load_calibrated(
        checkpoint, family=options.get("family"), arch=options.get("arch"), settings=options["settings"],
        img_size=options.get("img_size"), num_heads=options.get("num_heads"), calibration=calibration, calib=calib,
        log=log,
    )
    cfg = loaded.cfg
    require_memory(forward_bytes(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
                                 max(batch, 2) if dynamic else batch, cfg.in_chans),
                   f"exporting a batch of {batch} at {cfg.img_size} px", "pick a smaller --batch-size or --img-size")
    if validate_data == DEFAULT_DATA:
        validate_data = default_source(loaded.cfg.in_chans)
    model_transform = make_transform(loaded.cfg.img_size, loaded.cfg.in_chans, loaded.mean, loaded.std,
                                     transform_overrides)
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
        metadata = build_metadata(loaded, opset, "dynamic" if dynamic else batch, vars(thresholds), model_transform)
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
                    validate(stage, validate_data, validate_limit, thresholds,
                             img_size=size if resolution else None, log=log, shuffle_seed=validate_seed,
                             skip_bad_images=skip_bad_images)
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


def _transform_values(value) -> dict:
    """A transform override as given (``"lvvit"``, ``"crop_pct=1.0,..."`` or a mapping) → a dict of values."""
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_transform_option(value)
    if isinstance(value, dict):
        return dict(value)
    raise VitedgeError(f"transform must be a preset name, 'key=value,...' text or a mapping, got {value!r}")
