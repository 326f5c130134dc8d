"""The ``vitedge`` command: a thin click shell over the Python API in ``vitedge``.

Every command prints progress to stderr and results to stdout. Whatever stops a command
becomes one ``vitedge: error: ...`` line on stderr and an exit code (docs/guarantees.md):
0 success, 2 bad input or environment (VitedgeError, a bad flag, an OS error), 3 validation
failed, 4 budget missed, 5 TensorRT build failed, 6 TensorRT not installed, 7 another vitedge
process is writing the same folder, 70 internal error (a bug: ``--debug`` or
``VITEDGE_DEBUG=1`` prints the traceback), 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import click

import vitedge
from vitedge.errors import VitedgeError
from vitedge.families import candidate_grid, get_family
from vitedge.reading import describe
from vitedge.setting_options import setting_options

INTERNAL_ERROR = 70  # sysexits.h EX_SOFTWARE
_debug = {"on": False}


def debugging() -> bool:
    return _debug["on"] or os.environ.get("VITEDGE_DEBUG", "") not in ("", "0")


def fail(exc: BaseException, command: str = "vitedge"):
    """Print ``exc`` as one ``vitedge: error:`` line (after its traceback under --debug) and exit with its code."""
    if debugging():
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, VitedgeError):
        message, code = str(exc), exc.exit_code
    elif isinstance(exc, OSError):
        where = " ".join(str(name) for name in (exc.filename, exc.filename2) if name)
        message, code = f"{describe(exc)}{': ' + where if where else ''}", 2
    elif isinstance(exc, MemoryError):
        message, code = f"out of memory in '{command}'; use a smaller --batch-size / --img-size / --limit", 2
    else:
        text = describe(exc)
        text = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
        message, code = f"internal error in '{command}': {text}{_where(exc)} (a bug in " \
                        "vitedge; rerun with --debug or VITEDGE_DEBUG=1 for the traceback)", INTERNAL_ERROR
    click.echo(f"vitedge: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _where(exc: BaseException) -> str:
    """`` at vitedge/x.py:123``: the innermost frame of vitedge's own code."""
    frame, last = exc.__traceback__, None
    while frame is not None:
        path = frame.tb_frame.f_code.co_filename
        if f"{os.sep}vitedge{os.sep}" in path:
            last = f" at vitedge{os.sep}{path.rsplit(os.sep + 'vitedge' + os.sep, 1)[1]}:{frame.tb_lineno}"
        frame = frame.tb_next
    return last or ""


def friendly(command):
    """Run ``command``; anything it raises becomes one clear line and its exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("vitedge: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the error boundary
            fail(exc, click.get_current_context().command_path if click.get_current_context(silent=True) else "vitedge")

    return wrapper


def log(message: str) -> None:
    click.echo(message, err=True)


graph_option = click.option(
    "--graph", type=click.Choice(["auto", "portable", "optimized"]), default="auto", show_default=True,
    help="ONNX Runtime graph: model.ort.onnx where 'vitedge optimize' wrote and proved it (auto), model.onnx "
         "(portable) or model.ort.onnx (optimized).")


def data_options(limit: int | None, limit_names: tuple[str, ...] = ("--limit",), what: str = "validation"):
    """The one set of data options of every command that reads images: --data, --limit, --shuffle-seed,
    --skip-bad-images (``--validate-data`` stays an alias of ``--data``)."""
    from vitedge.data import SOURCES_HELP

    options = [
        click.option("--data", "--validate-data", "data", default="default", metavar="SOURCE",
                     help=f"Images for {what}: {SOURCES_HELP}. Default: fashion-mnist for grey models, samples for RGB ones."),
        click.option(*limit_names, "limit", type=int, default=limit, show_default=limit is not None,
                     help="Use this many images (default: all)." if limit is None else "Use this many images."),
        click.option("--shuffle-seed", type=int, help="Draw the images at random, spread evenly over the classes, with this seed "
                                                      "(default: the first ones in order)."),
        click.option("--skip-bad-images", is_flag=True, help="Skip unreadable image files (counted in the report) instead of failing."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(map(_non_finite, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(_non_finite, value))
    return False


class FiniteNumbers(click.Command):
    """Every command refuses NaN and infinity for its number options (click's FLOAT accepts "nan" and "inf").

    NaN compares False with everything, so a NaN threshold or budget would switch a check
    off or run a whole search before failing.
    """

    def parse_args(self, ctx, args):
        rest = super().parse_args(ctx, args)
        for param in self.params:
            if _non_finite(ctx.params.get(param.name)):
                raise click.BadParameter(f"must be a finite number, got {ctx.params[param.name]!r}", ctx=ctx, param=param)
        return rest


class OneLineErrors(click.Group):
    """The error boundary: click's usage errors and anything escaping a command as one ``vitedge: error:`` line."""

    command_class = FiniteNumbers

    def __call__(self, *args, **kwargs):
        from vitedge import interrupts

        interrupts.install()
        return self.main(*args, **kwargs)

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx else ""
            click.echo(f"vitedge: error: {' '.join(exc.format_message().split())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("vitedge: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the error boundary
            fail(exc)


def _set_debug(ctx, param, value):
    _debug["on"] = bool(value)


@click.group(name="vitedge", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(vitedge.__version__, prog_name="vitedge")
@click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_set_debug,
              help="Print the traceback of an error (also VITEDGE_DEBUG=1).")
def main():
    """Export adaptive Vision Transformers to static, validated ONNX for edge runtimes."""


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Artifact folder to write.")
@click.option("--family", help=f"Model family ({', '.join(vitedge.available_families())}); read from vitedge checkpoints.")
@click.option("--arch", help="Named architecture (deit_tiny, deit_small, deit_base, vit_fmnist); default: inferred from the weights.")
@click.option("--img-size", type=int, help="Input size in pixels (position embeddings are resampled).")
@click.option("--num-heads", type=int, help="Attention heads, when not 64 channels per head.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Export recipe YAML; flags override its values.")
@click.option("--opset", type=int, help="ONNX opset (>= 17, default 18).")
@click.option("--batch-size", type=int, help="Static batch size of the graph (default 1).")
@click.option("--dynamic-batch/--static-batch", default=None, help="Symbolic batch dimension (token counts stay static).")
@click.option("--dynamic-resolution", metavar="MIN:MAX",
              help="Symbolic input size in this range (resolution-agnostic families, see 'vitedge families'); optimum at --img-size.")
@data_options(256, ("--limit", "--validate-limit"), "the quick validation")
@click.option("--no-validate", is_flag=True, help="Skip the quick validation.")
@click.option("--transform", metavar="PRESET|KEY=VALUE,...",
              help="Evaluation transform recorded in vitedge.json: a preset (deit, deit-384, lvvit, lvvit-384, levit, mae, "
                   "vit, swag, fashion-mnist) and/or crop_pct=, interpolation=, crop=, mean=a/b/c, std=a/b/c, channels=.")
@click.option("--calib", help="Calibration images for data-dependent settings given here: any --data source or a name "
                              "in calibration/ (default: fmnist-train-512 for grey models, samples for RGB ones).")
@click.option("--optimize", "optimize_ort", is_flag=True,
              help="Then run 'vitedge optimize': model.ort.onnx for ONNX Runtime where it passes and pays (default: off).")
@setting_options(from_file=True)
@friendly
def export(checkpoint, outdir, family, arch, img_size, num_heads, recipe, opset, batch_size, dynamic_batch,
           dynamic_resolution, data, limit, shuffle_seed, skip_bad_images, no_validate, transform, calib, optimize_ort,
           settings, calibration):
    """Load CHECKPOINT, rewrite it to a static graph, export, check and validate it."""
    report = vitedge.export(
        checkpoint, outdir, family=family, arch=arch, img_size=img_size, recipe=recipe,
        opset=opset, batch_size=batch_size, dynamic_batch=dynamic_batch, num_heads=num_heads,
        dynamic_resolution=dynamic_resolution,
        validate_data=None if no_validate else data, validate_limit=limit, log=log,
        settings=settings, calibration=calibration, calib=calib, transform=transform, validate_seed=shuffle_seed,
        skip_bad_images=skip_bad_images,
    )
    summary = {"outdir": outdir, "check": report["check"]["passed"]}
    if "validate" in report:
        summary["top1_agreement"] = report["validate"]["top1_agreement"]
        summary["kept_agreement"] = report["validate"]["kept_agreement"]
    if optimize_ort:
        from vitedge.optimize import optimize as run_optimize

        entry = run_optimize(outdir, None if no_validate else data, limit, log=log, shuffle_seed=shuffle_seed,
                             skip_bad_images=skip_bad_images)
        summary["ort_optimized"] = entry["written"]
    click.echo(json.dumps(summary))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["all", "fp32", "fp16", "int8"]), default="all", show_default=True,
              help="Which model file to check: every one in OUTDIR, or one precision.")
@friendly
def check(outdir, precision):
    """Lint OUTDIR's models: static shapes, no dynamic ops, TensorRT op support (Q/DQ included)."""
    result = vitedge.check(outdir, None if precision == "all" else precision)
    if precision in ("fp16", "int8"):
        results = [(f" ({precision}, {result['model']})", result)]
    else:
        results = [("", result)] + [(f" ({name}, {entry['model']})", entry) for name, entry in result.get("quantized", {}).items()]
    for label, entry in results:
        for line in entry["errors"]:
            click.echo(f"error{label}: {line}")
        for line in entry["warnings"]:
            click.echo(f"warning{label}: {line}")
        click.echo(f"check {'passed' if entry['passed'] else 'FAILED'}{label}: {sum(entry['ops'].values())} nodes, opset {entry['opset']}")
    if not all(entry["passed"] for _, entry in results):
        sys.exit(3)


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True, help="Target precision.")
@click.option("--calib", help="int8: calibration images, any --data source or a name in calibration/ "
                                "(default: fmnist-train-512 for grey models, samples for RGB ones).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True,
              help="int8: onnxruntime calibrator.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep matching nodes in float (glob on node name, op type or tensor name); repeatable.")
@click.option("--include-selection", is_flag=True, help="Quantize the token-selection path too (default: kept FP32).")
@click.option("--keep-fp32", default="LayerNormalization,Softmax,LogSoftmax", show_default=True,
              help="fp16: op types kept in FP32, comma-separated ('' for none).")
@data_options(1000, ("--limit", "--validate-limit"), "the comparison with FP32")
@click.option("--no-validate", is_flag=True, help="Skip the comparison with the FP32 graph.")
@friendly
def quantize(outdir, precision, calib, method, exclude, include_selection, keep_fp32, data, limit, shuffle_seed,
             skip_bad_images, no_validate):
    """Write OUTDIR/model.<precision>.onnx from OUTDIR/model.onnx, checked and compared with FP32."""
    from vitedge.quantize import quantize as run_quantize

    keep = tuple(op.strip() for op in keep_fp32.split(",") if op.strip())
    section = run_quantize(outdir, precision, calib=calib, method=method, exclude=exclude,
                           include_selection=include_selection, keep_fp32_ops=keep,
                           validate_data=None if no_validate else data, validate_limit=limit, log=log,
                           validate_seed=shuffle_seed, skip_bad_images=skip_bad_images)
    summary = {"model": section["quantize"]["model"], "check": section["check"]["passed"]}
    if "validate" in section:
        summary.update({k: section["validate"][k] for k in ("top1_agreement", "kept_agreement", "fp32_accuracy", "accuracy")
                        if k in section["validate"]})
    click.echo(json.dumps(summary))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@data_options(1000, ("--limit", "--validate-limit"), "the fidelity check of the optimised graph")
@click.option("--no-validate", is_flag=True, help="Skip the fidelity check: the graph is unproven, so --graph auto keeps model.onnx (--graph optimized runs it).")
@click.option("--rounds", type=int, default=30, show_default=True, help="Interleaved timing rounds against model.onnx.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--force", is_flag=True, help="Write model.ort.onnx even when it is not faster than model.onnx.")
@friendly
def optimize(outdir, data, limit, shuffle_seed, skip_bad_images, no_validate, rounds, threads, force):
    """Write OUTDIR/model.ort.onnx (fused attention and softmax for ONNX Runtime) when it passes the
    fidelity check and is faster than model.onnx; profile and predict then use it on ORT."""
    from vitedge.optimize import optimize as run_optimize

    entry = run_optimize(outdir, None if no_validate else data, limit, rounds, threads, force, log=log,
                         shuffle_seed=shuffle_seed, skip_bad_images=skip_bad_images)
    summary = {"model": entry["model"] if entry["written"] else None, "written": entry["written"], "reason": entry["reason"],
               "passes": entry["passes"]}
    if entry.get("timing"):
        summary["ratio"] = entry["timing"]["ratio"]
    if entry.get("fidelity"):
        summary["top1_agreement"] = entry["fidelity"]["top1_agreement"]
        summary["kept_agreement"] = entry["fidelity"]["kept_agreement"]
    click.echo(json.dumps(summary))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@data_options(None)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Where the source checkpoint is now, if it moved.")
@click.option("--min-top1-agreement", type=float, help="Override the threshold in vitedge.json.")
@click.option("--min-kept-agreement", type=float)
@click.option("--max-abs-logit-diff", type=float)
@click.option("--img-size", type=int, help="Another input size of a dynamic-resolution graph.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16/int8: compare that model with the FP32 graph (accuracy, agreement, first disagreement).")
@click.option("--max-accuracy-drop", type=float, help="fp16/int8: largest accuracy drop allowed (0.005 = half a point).")
@click.option("--graph", type=click.Choice(["portable", "optimized"]), default="portable", show_default=True,
              help="fp32: model.onnx (portable) or model.ort.onnx from 'vitedge optimize' (report section validate_ort).")
@friendly
def validate(outdir, data, limit, shuffle_seed, skip_bad_images, batch_size, checkpoint, min_top1_agreement,
             min_kept_agreement, max_abs_logit_diff, img_size, precision, max_accuracy_drop, graph):
    """Compare OUTDIR/model.onnx (ONNX Runtime) with the reference model on real images."""
    if precision != "fp32" and graph != "portable":
        raise VitedgeError("--graph optimized validates the FP32 model.ort.onnx; drop --precision")
    if precision != "fp32":
        from vitedge.quantize import validate_quantized

        result = validate_quantized(outdir, precision, data, limit, {"min_top1_agreement": min_top1_agreement,
                                    "max_accuracy_drop": max_accuracy_drop}, batch_size, log=log,
                                    shuffle_seed=shuffle_seed, skip_bad_images=skip_bad_images)
        click.echo(json.dumps({k: result[k] for k in ("images", "fp32_accuracy", "accuracy", "top1_agreement", "kept_agreement",
                                                       "first_disagreement", "passed") if k in result}))
        return
    thresholds = dict(vitedge.Artifact(outdir).metadata.get("validation", {}))
    overrides = {"min_top1_agreement": min_top1_agreement, "min_kept_agreement": min_kept_agreement,
                 "max_abs_logit_diff": max_abs_logit_diff}
    thresholds.update({k: v for k, v in overrides.items() if v is not None})
    result = vitedge.validate(outdir, data, limit, thresholds, batch_size, checkpoint, log=log, img_size=img_size,
                              shuffle_seed=shuffle_seed, skip_bad_images=skip_bad_images, graph=graph)
    keys = ("images", "top1_agreement", "kept_agreement", "near_ties", "max_abs_logit_diff", "budget_exceeded", "halting", "in_domain",
            "skipped_images", "passed")
    click.echo(json.dumps({k: result[k] for k in keys if k in result}))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@click.option("--batch", type=int, help="Batch size (default: the graph's).")
@click.option("--iterations", type=int, default=50, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--device", help="Device profile (see 'vitedge devices'): checked against the backend, its budget is the default.")
@click.option("--devices-dir", type=click.Path(file_okay=False), help="Folder with your own device YAML files.")
@click.option("--latency-budget-ms", type=float, help="Fail (exit 4) when the latency statistic is above this.")
@click.option("--budget-stat", type=click.Choice(["p50", "p90", "p99", "mean"]), default="p99", show_default=True,
              help="Which end-to-end latency statistic the budget applies to.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which model file to time (ort backend).")
@graph_option
@friendly
def profile(outdir, backend, batch, iterations, warmup, threads, device, devices_dir, latency_budget_ms, budget_stat,
            precision, graph):
    """Latency percentiles and throughput of OUTDIR on a backend, pass/fail against a latency budget."""
    section = backend if precision == "fp32" else f"{backend}-{precision}"
    try:
        result = vitedge.profile(outdir, backend, batch, iterations, warmup, threads, log=log, device=device,
                                 latency_budget_ms=latency_budget_ms, budget_stat=budget_stat, devices_dir=devices_dir,
                                 precision=precision, graph=graph)
    except vitedge.BudgetMissed:
        _echo_profile(vitedge.Artifact(outdir).report()["profile"][section])
        raise
    _echo_profile(result)


def _echo_profile(result: dict) -> None:
    click.echo(f"{result['backend']} batch {result['batch']} ({result['threads']} threads): p50 {result['p50_ms']:.2f} ms, "
               f"p90 {result['p90_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, {result['throughput_img_s']:.1f} img/s")
    if "gpu_compute_ms" in result:
        click.echo(f"GPU compute p50 {result['gpu_compute_ms']['p50_ms']:.3f} ms (end to end includes H2D "
                   f"{result['h2d_ms']['p50_ms']:.3f} ms + D2H {result['d2h_ms']['p50_ms']:.3f} ms)")
    budget = result.get("budget")
    if budget:
        click.echo(f"budget {budget['budget_ms']:g} ms ({budget['statistic']}): {'PASS' if budget['passed'] else 'FAIL'} "
                   f"(margin {budget['margin_ms']:+.2f} ms)")


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "best"]), default="fp32", show_default=True,
              help="int8/best build the QDQ model.int8.onnx from 'vitedge quantize'.")
@click.option("--device", help="Device profile (see 'vitedge devices'): checks precision, DLA cores and the GPU.")
@click.option("--devices-dir", type=click.Path(file_okay=False), help="Folder with your own device YAML files.")
@click.option("--workspace-mb", type=int, default=1024, show_default=True, help="Builder workspace memory pool limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file: loaded if present, saved after the build.")
@click.option("--dla-core", type=int, help="Run on this DLA core (Jetson), with GPU fallback; the DLA takes one input shape (--batch N).")
@click.option("--batch", help="Optimisation profile MIN:OPT:MAX for a --dynamic-batch export (default 1:1:8).")
@click.option("--version-compatible", is_flag=True, help="Build an engine later TensorRT versions can run.")
@click.option("--optimization-level", type=int, default=3, show_default=True, help="Builder optimisation level 0..5.")
@friendly
def build(outdir, precision, device, devices_dir, workspace_mb, timing_cache, dla_core, batch, version_compatible,
          optimization_level):
    """Build OUTDIR/model.plan with TensorRT and write OUTDIR/trtexec.sh (also where TensorRT is missing)."""
    engine = vitedge.build(outdir, precision=precision, device=device, workspace_mb=workspace_mb, timing_cache=timing_cache,
                           dla_core=dla_core, batch=batch, version_compatible=version_compatible,
                           optimization_level=optimization_level, devices_dir=devices_dir, log=log)
    click.echo(json.dumps({"plan": engine["plan"], "tensorrt": engine["tensorrt"], "gpu": engine["gpu"],
                           "precision": engine["precision"], "layer_precisions": engine["layer_precisions"]}))


@main.command()
@click.option("--devices-dir", type=click.Path(file_okay=False), help="Folder with your own device YAML files.")
def devices(devices_dir):
    """List the device profiles (shipped, VITEDGE_DEVICES, --devices-dir)."""
    from vitedge.devices import available_devices

    try:
        known = available_devices(devices_dir)
    except vitedge.VitedgeError as exc:
        click.echo(f"vitedge: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    for name, device in known.items():
        budget = f"{device.latency_budget_ms:g} ms" if device.latency_budget_ms else "-"
        click.echo(f"{name:15s} {'/'.join(device.backends):9s} {','.join(device.precisions):20s} "
                   f"DLA {device.dla_cores}  budget {budget:8s} {device.description}")


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
@friendly
def inspect(outdir, as_json):
    """Token budgets per block, FLOPs dense vs static, and the op histogram of OUTDIR."""
    info = vitedge.inspect(outdir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"family: {info['family']}  settings: {info['settings']}")
    click.echo(f"input: {info['input']['name']} {info['input']['shape']}  outputs: {', '.join(info['outputs'])}")
    flops = info["flops"]
    click.echo(f"FLOPs: {flops['static'] / 1e9:.3f} G static / {flops['dense'] / 1e9:.3f} G dense = {flops['ratio']:.3f}")
    click.echo("tokens per block (attention/mlp): " + " ".join(
        f"{b['attention']}/{b['mlp']}" for b in info["token_budgets"]["tokens_per_block"]))
    for step in info["token_budgets"]["selections"]:
        click.echo(f"  block {step['block']}: keep {step['kept_patches']} patch tokens -> {step['tokens_after']} tokens")
    if "halting" in info:
        halting = info["halting"]
        click.echo(f"halting (reference, {halting['images']} images): mean depth {halting['mean_depth']:.2f} blocks per "
                   "patch token; live patches per block " + " ".join(f"{v:.1f}" for v in halting["active_patches_mean"]))
    if "budget_exceeded" in info:
        click.echo("budget exceeded (share of images): " + " ".join(
            f"{name.rsplit('_', 1)[-1]}:{rate:.3f}" for name, rate in info["budget_exceeded"].items()))
    click.echo("ops: " + ", ".join(f"{op} {count}" for op, count in info["ops"].items()))
    if info["report"]:
        click.echo("report: " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in info["report"].items()))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_npy", type=click.Path(dir_okay=False), help="With a .npy input: the logits file to write.")
@click.option("--save-input", type=click.Path(dir_okay=False), help="With image files: write the preprocessed NCHW tensor (.npy).")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Classes to print per image.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@graph_option
@friendly
def predict(outdir, inputs, output_npy, save_input, top, as_json, graph):
    """Top classes for image files (preprocessed with OUTDIR's recorded transform), or logits for one
    INPUT.npy (NCHW float32, normalised) saved to -o OUTPUT.npy."""
    if all(str(path).endswith(".npy") for path in inputs):
        if len(inputs) != 1 or output_npy is None:
            raise VitedgeError("a .npy input takes exactly one file and -o OUTPUT.npy; image files print their top classes")
        logits = vitedge.predict_file(outdir, inputs[0], output_npy, graph=graph, log=log)
        click.echo(json.dumps({"output": output_npy, "shape": list(logits.shape), "top1": logits.argmax(1).tolist()[:16]}))
        return
    if output_npy is not None:
        raise VitedgeError("-o writes logits of a .npy input; for image files use --save-input FILE.npy or --json")
    results = vitedge.predict_images(outdir, inputs, top=top, save_input=save_input, graph=graph, log=log)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for result in results:
        click.echo(result["file"])
        for rank, entry in enumerate(result["top"], 1):
            label = f"  {entry['label']}" if entry["label"] else ""
            click.echo(f"  {rank}. class {entry['class']:4d}{label}  p={entry['probability']:.3f}  logit {entry['logit']:.3f}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Folder for the winning artifact + tune.md/.json/.png.")
@click.option("--latency-budget-ms", type=float, required=True, help="Latency budget per batch, in ms.")
@click.option("--family", help="Model family; read from vitedge checkpoints.")
@click.option("--arch", help="Named architecture; default: inferred from the weights.")
@click.option("--calib", help="Calibration images for data-dependent settings: any --data source or a name "
                              "in calibration/ (default: fmnist-train-512 for grey models, samples for RGB ones).")
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@data_options(2000, what="ranking by accuracy (labelled: fashion-mnist or one sub-folder per class)")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--statistic", type=click.Choice(["p50", "p90", "p99", "mean"]), default="p90", show_default=True, help="Latency statistic held to the budget.")
@click.option("--iterations", type=int, default=50, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--snap-budgets", is_flag=True,
              help="Also try each candidate with its token budgets raised to the top of their measured latency step; "
                   "a snap whose graph is measurably slower than the original's is reverted.")
@click.option("--graph", type=click.Choice(["auto", "portable", "optimized"]), default="auto", show_default=True,
              help="ONNX Runtime graph timed per candidate: model.ort.onnx where 'vitedge optimize' passes and pays (auto), "
                   "model.onnx (portable), or model.ort.onnx always (optimized).")
@setting_options(many=True)
@friendly
def tune(checkpoint, outdir, latency_budget_ms, family, arch, calib, backend, data, limit, shuffle_seed, skip_bad_images,
         batch, statistic, iterations, warmup, threads, snap_budgets, graph, settings, grid):
    """Export the most accurate token budget of CHECKPOINT that meets a latency budget (exit 4: none does).

    Candidates: the family's grid, or every combination of the values its list flags give (see 'vitedge families')."""
    summary = vitedge.tune(checkpoint, outdir, latency_budget_ms, family=family, arch=arch,
                           candidates=candidate_grid(grid) if grid else None, settings=settings,
                           backend=backend, data=None if data == "default" else data, limit=limit, batch=batch,
                           statistic=statistic, iterations=iterations, warmup=warmup, threads=threads, log=log, calib=calib,
                           shuffle_seed=shuffle_seed, skip_bad_images=skip_bad_images, snap_budgets=snap_budgets,
                           graph=graph)
    chosen = summary["chosen"]
    click.echo(json.dumps({"outdir": outdir, "chosen": chosen["settings"], "accuracy": chosen["accuracy"],
                           f"{statistic}_ms": chosen["latency_ms"], "budget_ms": latency_budget_ms}))


@main.command("export-bundle")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--family", help="Model family with variant bundles (see 'vitedge families'); read from vitedge checkpoints.")
@click.option("--arch", help="Named architecture; default: inferred from the weights.")
@click.option("--num-heads", type=int, help="Attention heads, when not 64 channels per head.")
@click.option("--opset", type=int, help="ONNX opset (>= 17, default 18).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Static batch size of every variant.")
@data_options(1000, ("--limit", "--validate-limit"), "validating every variant (accuracy + equality)")
@click.option("--device", help="Label for the latencies measured here (default: this machine, e.g. x86-cpu-ort).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--iterations", type=int, default=30, show_default=True, help="Interleaved timing rounds.")
@click.option("--optimize", "optimize_ort", is_flag=True,
              help="Run 'vitedge optimize' on every variant: each is timed on model.ort.onnx where it is proven and faster.")
@setting_options(many=True)
@friendly
def export_bundle(checkpoint, outdir, family, arch, num_heads, opset, batch_size, data, limit, shuffle_seed,
                  skip_bad_images, device, threads, iterations, optimize_ort, settings, grid):
    """Export every variant of CHECKPOINT (its family's bundle settings, e.g. size x keep rate) into one bundle folder.

    Each bundle setting spans the values its list flag gives, by default all the model was trained for."""
    bundle = vitedge.export_bundle(
        checkpoint, outdir, values=grid, family=family, settings=settings, arch=arch, num_heads=num_heads, opset=opset,
        batch_size=batch_size, validate_data=data, validate_limit=limit, device=device,
        threads=threads, iterations=iterations, log=log, validate_seed=shuffle_seed, skip_bad_images=skip_bad_images,
        optimize=optimize_ort,
    )
    device = bundle["devices"][0]
    for v in bundle["variants"]:
        accuracy = "n/a" if v["accuracy"] is None else f"{100 * v['accuracy']:.2f} %"
        click.echo(f"{v['name']:16s} FLOPs {v['flops']['ratio']:.3f} x dense  p50 {v['latency_ms'][device]['p50_ms']:.3f} ms"
                   f"  accuracy {accuracy}")


@main.command("profile-bundle")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--device", help="Label to store the latencies under (default: this machine, e.g. x86-cpu-ort).")
@click.option("--batch", type=int, help="Batch size (default: the graphs').")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--iterations", type=int, default=30, show_default=True)
@graph_option
@friendly
def profile_bundle(bundle, device, batch, threads, iterations, graph):
    """Time every variant of BUNDLE here and record the latencies under a device name."""
    for name, stats in vitedge.profile_bundle(bundle, device, batch, threads, iterations, log=log, graph=graph).items():
        click.echo(f"{name:16s} p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f} ms")


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--latency-ms", type=float, required=True, help="Latency budget (p50, milliseconds).")
@click.option("--device", help="Device whose measured latencies to use (needed when the bundle has several).")
@click.option("--json", "as_json", is_flag=True, help="Print the chosen variant as JSON.")
@friendly
def select(bundle, latency_ms, device, as_json):
    """Pick the most accurate variant of BUNDLE that meets a latency budget; prints its folder."""
    chosen = vitedge.select(bundle, latency_ms=latency_ms, device=device)
    if as_json:
        click.echo(json.dumps(chosen, indent=2))
        return
    accuracy = "n/a" if chosen["accuracy"] is None else f"{100 * chosen['accuracy']:.2f} %"
    click.echo(chosen["path"])
    log(f"{chosen['name']}: accuracy {accuracy}, p50 {chosen['latency_p50_ms']:.3f} ms on {chosen['device']} "
        f"(budget {chosen['budget_ms']:g} ms, {chosen['candidates']} variants fit, ranked by {chosen['ranked_by']})")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_file", required=True, type=click.Path(dir_okay=False),
              help="Budgets file to write (JSON), e.g. calibration/fmnist-avit-budgets.json.")
@click.option("--flops-ratio", type=float, help="Instead of a setting: the largest one whose FLOPs are at most this ratio to dense.")
@data_options(2000, what="calibration (fashion-mnist: the train split)")
@click.option("--family", help="Model family (read from vitedge checkpoints; see 'vitedge families' for which calibrate).")
@click.option("--num-heads", type=int, help="Attention heads, when not 64 channels per head.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="The export recipe YAML (family, settings).")
@setting_options()
@friendly
def calibrate(checkpoint, output_file, flops_ratio, data, limit, shuffle_seed, skip_bad_images, family, num_heads, recipe,
              settings):
    """Resolve a model's data-dependent settings (e.g. a halting model's token budgets) on calibration images."""
    result = vitedge.calibrate(checkpoint, output_file, data=data, flops_ratio=flops_ratio, limit=limit, family=family,
                               num_heads=num_heads, recipe=recipe, settings=settings, log=log,
                               shuffle_seed=shuffle_seed, skip_bad_images=skip_bad_images)
    click.echo(json.dumps(result["summary"]))


@main.command()
def families():
    """List the registered families and each one's settings (for --set NAME=VALUE and recipes)."""
    for name in vitedge.available_families():
        fam = get_family(name)
        traits = [label for flag, label in ((fam.resolution_agnostic, "resolution-agnostic (--dynamic-resolution)"),
                                            (fam.linear_attention, "linear attention only"),
                                            (bool(fam.bundle_axes), f"bundles over {', '.join(fam.bundle_axes)}"),
                                            (bool(fam.calibrated_settings),
                                             f"calibrates {', '.join(fam.calibrated_settings)} on data")) if flag]
        click.echo(f"{name:12s} {fam.summary}" + (f" [{'; '.join(traits)}]" if traits else ""))
        for setting in fam.settings:
            default = "" if setting.default is None else f", default {setting.format(setting.default)}"
            flags = ", ".join(a.flag for a in setting.aliases)
            click.echo(f"  {setting.name:16s} {setting.describe()}{default}: {setting.help}"
                       + (f" (flags: {flags})" if flags else ""))


def _number_list(kind):
    """click callback: ``"16,20,24"`` → [16, 20, 24] (None stays None)."""

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return [kind(item) for item in value.split(",") if item.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None

    return parse


def _token_range(ctx, param, value):
    """click callback: ``"8:197"`` → (8, 197); None stays None (every count the blocks can see)."""
    if value is None:
        return None
    try:
        low, high = (int(part) for part in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected LOW:HIGH token counts such as 8:197, got {value!r}") from None
    return low, high


@main.command("profile-tokens")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for staircase.json and staircase.png.")
@click.option("--family", help="Model family; read from vitedge checkpoints.")
@click.option("--arch", help="Named architecture; default: inferred from the weights.")
@click.option("--num-heads", type=int, help="Attention heads, when not 64 channels per head.")
@click.option("--tokens", "token_range", callback=_token_range, help="Range LOW:HIGH of token counts (default: 1:all).")
@click.option("--step", type=int, default=8, show_default=True, help="Profile every multiple of STEP in the range.")
@click.option("--near", callback=_number_list(int), help="Also every count from each of these to --window above it.")
@click.option("--window", type=int, default=16, show_default=True)
@click.option("--snap", "snap_tokens", callback=_number_list(int),
              help="Token counts to snap to the top of their latency step (profiled with their window).")
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--rounds", type=int, default=20, show_default=True, help="Interleaved rounds (each times every count once).")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--graph", type=click.Choice(["auto", "portable", "optimized"]), default="auto", show_default=True,
              help="ONNX Runtime form of the blocks: with the 'vitedge optimize' passes where they apply and are faster "
                   "(auto), as exported (portable), or with the passes (optimized).")
@friendly
def profile_tokens(checkpoint, outdir, family, arch, num_heads, token_range, step, near, window, snap_tokens, backend, batch,
                   rounds, warmup, threads, graph):
    """Latency of CHECKPOINT's blocks against the token count: steps found, budgets snapped."""
    low, high = token_range or (None, None)
    result = vitedge.profile_tokens(checkpoint, outdir, family=family, arch=arch, num_heads=num_heads, low=low, high=high, step=step,
                                    near=near, window=window, snap_tokens=snap_tokens, batch=batch, backend=backend,
                                    threads=threads, rounds=rounds, warmup=warmup, log=log, graph=graph)
    click.echo(json.dumps({"outdir": outdir, "graph": result["graph"], "steps": [[s["first"], s["last"]] for s in result["steps"]],
                           "snapped": result["snapped"]}))


if __name__ == "__main__":
    main()
