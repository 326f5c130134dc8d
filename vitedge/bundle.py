"""Variant bundles: one static graph per combination of a family's bundle settings, and a selector.

Some models are trained once for a grid of settings (SuperViT: input sizes x keep rates, its
``Family.bundle_axes``); each grid point exports to its own static graph (a constant-shape
graph cannot switch between them). A bundle is one folder holding every variant as a normal
artifact (named by the family's labels, e.g. ``28px-keep0.5/``, so check, validate, profile
and inspect work on it) and a ``vitedge.json`` with ``"kind": "bundle"`` listing each variant's
FLOPs, measured latency (per device label) and validation accuracy. ``select`` picks the most
accurate variant whose latency meets a budget.

Every variant takes the same input (the checkpoint's full size); what a variant does with it
is the family's (``Family.describe_input``, ``bundle_input_note``; its docs/<family>.md says why).
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .artifact import METADATA, SCHEMA_VERSION, Artifact, staged_outdir, write_json_atomic
from .backbone import dense_flops
from .data import check_source
from .errors import BudgetMissed, ValidationFailed, VitedgeError
from .families import available_families, candidate_grid, get_family
from .load import load_model, read_checkpoint
from .reading import read_json
from .schema import BUNDLE, check, check_version
from .profile import ort_runner
from .validate import Thresholds, validate

BUNDLE_KIND = "bundle"
# The contract of a variant: it equals the reference at its setting, every logit within 1e-4.
# Top-1 can then differ only where the reference's two best logits are within 2e-4 of each other
# (a tie float rounding decides: 1 image in 10,000 of the Fashion-MNIST model, margin 2e-6), so
# top-1 agreement is held to the project's 0.999, not 1.
BUNDLE_THRESHOLDS = Thresholds(min_top1_agreement=0.999, min_kept_agreement=0.999, max_abs_logit_diff=1e-4)
LATENCY_STAT = "p50_ms"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def local_device() -> str:
    """The label for latencies measured here with ONNX Runtime on the CPU, e.g. ``x86-cpu-ort``."""
    machine = platform.machine().lower()
    arch = {"x86_64": "x86", "amd64": "x86", "aarch64": "arm64"}.get(machine, machine or "unknown")
    return f"{arch}-cpu-ort"


def bundle_families() -> list[str]:
    """The families whose models a bundle spans (they declare ``bundle_axes``)."""
    return [name for name in available_families() if get_family(name).bundle_axes]


def variant_name(family, settings: dict) -> str:
    """A variant's folder name from its bundle settings, by the family's labels: ``28px-keep0.5``."""
    return family.label({axis: settings[axis] for axis in family.bundle_axes}, compact=True)


def _check_device(device: str | None) -> str:
    if device is None:
        return local_device()
    if not isinstance(device, str) or not device.strip() or any(c in device for c in "/\\\n"):
        raise VitedgeError(f"device name must be a non-empty label without slashes, got {device!r}")
    return device.strip()


def _grid(loaded, values: dict | None) -> list[dict]:
    """Every combination of the requested values of the bundle settings, each checked against the model.

    A bundle setting without values spans the ones the model lists (its ``choices_from`` setting)."""
    fam, trained = loaded.family, loaded.settings
    values = dict(values or {})
    extra = sorted(set(values) - set(fam.bundle_axes))
    if extra:
        raise VitedgeError(f"a {fam.name} bundle spans {', '.join(fam.bundle_axes)}, not {', '.join(extra)}")
    schema = {s.name: s for s in fam.settings}
    spans = {}
    for axis in fam.bundle_axes:
        listed = values.get(axis)
        spans[axis] = list(trained[schema[axis].choices_from] if listed is None else listed)
        if not spans[axis]:
            raise VitedgeError(f"a bundle needs at least one value of {axis} ({', '.join(fam.bundle_axes)})")
    variants, names = [], set()
    for combination in candidate_grid(spans):
        settings = fam.resolve_settings(loaded.cfg, {**trained, **combination})
        name = variant_name(fam, settings)
        if name in names:
            raise VitedgeError(f"variant {name} is listed twice")
        names.add(name)
        variants.append(settings)
    return variants


def _ort_graphs(root: Path, variants: list[dict], graph: str) -> dict[str, tuple[Path, str]]:
    """Each variant's ONNX Runtime graph (``Artifact.ort_model``: model.ort.onnx where 'vitedge optimize'
    wrote and proved it, with ``auto``) and which one it is."""
    return {v["name"]: Artifact(root / v["path"]).ort_model(graph) for v in variants}


def _time_interleaved(models: dict[str, tuple[Path, str]], batch: int, threads: int, iterations: int,
                      warmup: int) -> dict[str, dict]:
    """p50/p90 latency of every graph, timed in rounds (one run each, order rotating) so all see the same load."""
    runners = {name: ort_runner(path, batch, threads) for name, (path, _) in models.items()}
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(iterations):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return {
        name: {"p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90)), "batch": batch,
               "threads": threads, "iterations": iterations, "backend": "onnxruntime-cpu", "graph": models[name][1]}
        for name, v in samples.items()
    }


def export_bundle(
    checkpoint,
    outdir,
    values: dict[str, list] | None = None,
    family: str | None = None,
    settings: dict | None = None,
    arch: str | None = None,
    num_heads: int | None = None,
    opset: int | None = None,
    batch_size: int = 1,
    validate_data: str = "default",
    validate_limit: int | None = 1000,
    device: str | None = None,
    threads: int = 2,
    iterations: int = 30,
    warmup: int = 5,
    thresholds: Thresholds | dict | None = None,
    log=_stderr,
    validate_seed: int | None = None,
    skip_bad_images: bool = False,
    optimize: bool = False,
) -> dict:
    """checkpoint → OUTDIR/{vitedge.json, <variant>/…}: export, check, validate and time every variant.

    ``values`` lists the values each bundle setting spans (``{"name": [v1, v2]}``; one not listed
    spans all the model was trained for); ``settings`` hold for every variant; ``family``
    defaults to the checkpoint's, or the only family with bundles. Each variant must
    equal the reference (top-1 agreement 1, max |logit diff| ≤ 1e-4) on ``validate_data``,
    whose labelled accuracy is recorded for the selector; latencies are recorded under
    ``device`` (default: this machine, e.g. ``x86-cpu-ort``). Nothing is written unless every
    variant passes. ``thresholds`` tightens or loosens the equality contract (names as in
    ``Thresholds``; unnamed ones keep the bundle's defaults). ``optimize`` runs 'vitedge optimize' on
    every variant, so each is timed (and later selected) on model.ort.onnx where that is proven and faster.
    """
    from .artifact_export import export, tool_versions
    from .optimize import optimize as optimize_for_ort

    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.from_dict({**vars(BUNDLE_THRESHOLDS), **(thresholds or {})})
    device = _check_device(device)
    if threads < 1 or iterations < 1 or warmup < 0 or batch_size < 1:
        raise VitedgeError("threads, iterations and batch size must be >= 1 and warm-up >= 0")
    if not validate_data:
        raise VitedgeError("a bundle records each variant's validation accuracy; give validation data (e.g. fashion-mnist)")
    check_source(validate_data, validate_limit)
    ckpt = read_checkpoint(checkpoint)
    having = bundle_families()
    stated = family or ckpt.metadata.get("family")
    if stated and stated not in having:
        raise VitedgeError(
            f"{ckpt.path} is a '{stated}' checkpoint; variant bundles are for {', '.join(having)} "
            "checkpoints; use 'vitedge export' for it"
        )
    if not stated and len(having) != 1:
        raise VitedgeError(f"{ckpt.path} does not say its family; pass --family (one of {', '.join(having)})")
    name = stated or having[0]
    loaded = load_model(ckpt, family=name, arch=arch, num_heads=num_heads, settings=settings)
    grid = _grid(loaded, values)
    names = [variant_name(loaded.family, s) for s in grid]
    taken = [n for n in names if (Path(outdir) / n).exists()]
    if taken:
        raise VitedgeError(f"{outdir} already holds {', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}; "
                           "remove them or write the bundle to another folder")
    log(f"bundle of {len(grid)} variants: {', '.join(names)}")
    variants = []
    with staged_outdir(Path(outdir)) as stage:
        for index, (variant_folder, variant) in enumerate(zip(names, grid)):
            log(f"== variant {index + 1}/{len(grid)}: {variant_folder}")
            folder = stage / variant_folder
            export(checkpoint, folder, family=name, arch=arch, num_heads=num_heads, settings=variant,
                   opset=opset, batch_size=batch_size, validate_data=None, log=lambda m: log("   " + m))
            metadata = Artifact(folder).metadata
            metadata["validation"] = vars(thresholds)
            write_json_atomic(folder / METADATA, metadata)
            try:
                result = validate(folder, validate_data, validate_limit, thresholds, threads=threads,
                                  shuffle_seed=validate_seed, skip_bad_images=skip_bad_images)
            except ValidationFailed as exc:
                raise ValidationFailed(f"variant {variant_folder}: {exc}; bundle not written") from None
            log(f"   validated on {result['images']} images: top-1 agreement {result['top1_agreement']:.4f}"
                + (f", max |logit diff| {result['max_abs_logit_diff']:.1e}" if result["max_abs_logit_diff"] is not None else "")
                + (f", accuracy {result['exported_accuracy']:.4f}" if "exported_accuracy" in result else ""))
            if optimize:
                try:
                    entry = optimize_for_ort(folder, validate_data, validate_limit, threads=threads, shuffle_seed=validate_seed,
                                             skip_bad_images=skip_bad_images, log=lambda m: log("   " + m))
                except ValidationFailed as exc:
                    raise ValidationFailed(f"variant {variant_folder}: the optimised graph: {exc}; bundle not written") from None
                log(f"   {entry['model']}: {'written' if entry['written'] else 'not written'} ({entry['reason']})")
            variants.append(_variant_entry(loaded.family, variant_folder, variant, metadata, result))
        log(f"timing {len(grid)} variants on {device} (ONNX Runtime CPU, batch {batch_size}, {threads} threads, "
            f"{iterations} interleaved rounds)")
        latencies = _time_interleaved(_ort_graphs(stage, variants, "auto"), batch_size, threads, iterations, warmup)
        for variant in variants:
            variant["latency_ms"] = {device: latencies[variant["name"]]}
        first = Artifact(stage / names[0]).metadata
        schema = {s.name: s for s in loaded.family.settings}
        note = loaded.family.bundle_input_note
        bundle = {
            "schema_version": SCHEMA_VERSION,
            "kind": BUNDLE_KIND,
            "family": loaded.family.name,
            "arch": loaded.cfg.to_dict(),
            "input": _common_input(first["input"], [Artifact(stage / n).metadata["input"] for n in names]),
            "preprocessing": (
                f"feed every variant the same tensor: NCHW float32 {first['input']['shape']}, pixels / 255 then "
                "(x - mean) / std" + (f"; {note}" if note else "")
            ),
            "trained": {schema[axis].choices_from: loaded.settings[schema[axis].choices_from]
                        for axis in loaded.family.bundle_axes if schema[axis].choices_from},
            "flops_dense": dense_flops(loaded.cfg),
            "selection": {"rank": "accuracy (FLOPs where no accuracy was measured)", "latency": LATENCY_STAT},
            "devices": [device],
            "variants": variants,
            "checkpoint": first["checkpoint"],
            "validation": {"data": validate_data, "limit": validate_limit, "thresholds": vars(thresholds)},
            "tools": tool_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(stage / METADATA, bundle)
    log(f"wrote bundle {outdir} ({len(variants)} variants)")
    return bundle


def _common_input(first: dict, inputs: list[dict]) -> dict:
    """The "input" fields every variant shares; in nested fields, the entries they share (a resize's mode, not its size)."""
    common = {}
    for key, value in first.items():
        if isinstance(value, dict):
            shared = {k: v for k, v in value.items() if all(i.get(key, {}).get(k) == v for i in inputs)}
            if shared:
                common[key] = shared
        elif all(i.get(key) == value for i in inputs):
            common[key] = value
    return common


def _variant_entry(family, name: str, settings: dict, metadata: dict, result: dict) -> dict:
    return {
        "name": name,
        "path": name,
        **{axis: settings[axis] for axis in family.bundle_axes},
        "tokens_after_selections": [s["tokens_after"] for s in metadata["token_budgets"]["selections"]],
        "flops": {"static": metadata["flops"]["static"], "ratio": metadata["flops"]["ratio"]},
        "accuracy": result.get("exported_accuracy"),
        "validation": {
            "data": result["data"],
            "images": result["images"],
            "top1_agreement": result["top1_agreement"],
            "max_abs_logit_diff": result["max_abs_logit_diff"],
            "kept_agreement": result["kept_agreement"],
            "reference_accuracy": result.get("reference_accuracy"),
            "passed": result["passed"],
        },
    }


def load_bundle(path) -> dict:
    """A bundle's vitedge.json; one clear line when ``path`` is not a bundle."""
    meta_path = Path(path) / METADATA
    if not meta_path.is_file():
        raise VitedgeError(f"{path} is not a vitedge bundle (no {METADATA}); run 'vitedge export-bundle' first")
    bundle = read_json(meta_path, "bundle metadata")
    check_version(bundle, meta_path, "bundle metadata")
    if bundle.get("kind") != BUNDLE_KIND:
        raise VitedgeError(f"{path} is a single artifact, not a variant bundle; run 'vitedge export-bundle' to make one")
    check(bundle, BUNDLE, meta_path, "bundle metadata")
    return bundle


def _device_for(bundle: dict, device: str | None) -> str:
    measured = [d for d in bundle.get("devices", []) if any(d in v.get("latency_ms", {}) for v in bundle["variants"])]
    if device is None:
        if len(measured) == 1:
            return measured[0]
        if not measured:
            raise VitedgeError("the bundle holds no latency measurements; run 'vitedge profile-bundle' on it")
        raise VitedgeError(f"the bundle has latencies for several devices ({', '.join(measured)}); pick one with --device")
    if device not in measured:
        raise VitedgeError(
            f"the bundle has no latencies for device '{device}' (measured: {', '.join(measured) or 'none'}); "
            f"run 'vitedge profile-bundle BUNDLE --device {device}' on that device"
        )
    return device


def select(bundle, latency_ms: float, device: str | None = None) -> dict:
    """The most accurate variant whose p50 latency on ``device`` is within ``latency_ms``.

    Ties in accuracy go to the faster variant. Variants without a measured accuracy are ranked
    by FLOPs (more computation, more accurate, as in the SuperViT grid). Raises BudgetMissed
    (naming the fastest variant and its latency) when no variant meets the budget.
    """
    try:
        budget = float(latency_ms)
    except (TypeError, ValueError):
        raise VitedgeError(f"latency budget must be a number of milliseconds, got {latency_ms!r}") from None
    if not budget > 0:
        raise VitedgeError(f"latency budget must be > 0 ms, got {budget:g}")
    root = Path(bundle)
    meta = load_bundle(root)
    device = _device_for(meta, device)
    timed = [v for v in meta["variants"] if device in v.get("latency_ms", {})]
    fits = [v for v in timed if v["latency_ms"][device][LATENCY_STAT] <= budget]
    if not fits:
        fastest = min(timed, key=lambda v: v["latency_ms"][device][LATENCY_STAT])
        raise BudgetMissed(
            f"no variant meets {budget:g} ms on {device}; the fastest, {fastest['name']}, takes "
            f"{fastest['latency_ms'][device][LATENCY_STAT]:.3f} ms (p50)"
        )
    by_accuracy = all(v.get("accuracy") is not None for v in fits)

    def rank(v):
        quality = v["accuracy"] if by_accuracy else v["flops"]["static"]
        return (quality, -v["latency_ms"][device][LATENCY_STAT])

    chosen = max(fits, key=rank)
    return {
        **chosen,
        "path": str(root / chosen["path"]),
        "device": device,
        "budget_ms": budget,
        "latency_p50_ms": chosen["latency_ms"][device][LATENCY_STAT],
        "ranked_by": "accuracy" if by_accuracy else "flops",
        "candidates": len(fits),
    }


def profile_bundle(bundle, device: str | None = None, batch: int | None = None, threads: int = 2,
                   iterations: int = 30, warmup: int = 5, log=None, graph: str = "auto") -> dict:
    """Time every variant here (interleaved) and store the latencies under ``device`` in the bundle's vitedge.json.

    Run it on each target (with its device name) to make ``select --device NAME`` possible there.
    ``graph``: as in ``Artifact.ort_model`` (``auto``: each variant's model.ort.onnx where proven).
    """
    device = _check_device(device)
    if threads < 1 or iterations < 1 or warmup < 0:
        raise VitedgeError("threads and iterations must be >= 1 and warm-up >= 0")
    root = Path(bundle)
    meta = load_bundle(root)
    if batch is None:
        batch = meta["input"]["batch"] if isinstance(meta["input"]["batch"], int) else 1
    if batch < 1:
        raise VitedgeError(f"batch must be >= 1, got {batch}")
    models = _ort_graphs(root, meta["variants"], graph)
    if log:
        log(f"timing {len(models)} variants on {device}: batch {batch}, {threads} threads, {iterations} interleaved rounds")
    latencies = _time_interleaved(models, batch, threads, iterations, warmup)
    for variant in meta["variants"]:
        variant.setdefault("latency_ms", {})[device] = latencies[variant["name"]]
    if device not in meta.setdefault("devices", []):
        meta["devices"].append(device)
    write_json_atomic(root / METADATA, meta)
    return {name: latencies[name] for name in models}


__all__ = ["export_bundle", "select", "profile_bundle", "load_bundle", "local_device", "variant_name", "BUNDLE_KIND"]
