"""The ``vitedge`` command: a thin click shell over the Python API in ``vitedge``.

Every command prints progress to stderr, results to stdout, and turns a VitedgeError into
one line on stderr with a non-zero exit (2 bad input, 3 validation failed, 4 budget missed).
"""

from __future__ import annotations

import functools
import json
import sys

import click

import vitedge
from vitedge.errors import VitedgeError


def friendly(command):
    """Run ``command``; a VitedgeError becomes one clear line and its exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VitedgeError as exc:
            click.echo(f"vitedge: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("vitedge: interrupted", err=True)
            sys.exit(130)

    return wrapper


def log(message: str) -> None:
    click.echo(message, err=True)


class OneLineErrors(click.Group):
    """click's usage errors (a bad flag value, a missing argument) as one ``vitedge: error:`` line too."""

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
            click.echo(f"vitedge: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("vitedge: interrupted", err=True)
            sys.exit(130)


@click.group(name="vitedge", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(vitedge.__version__, prog_name="vitedge")
def main():
    """Export adaptive Vision Transformers to static, validated ONNX for edge runtimes."""


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Artifact folder to write.")
@click.option("--family", help=f"Model family ({', '.join(vitedge.available_families())}); read from vitedge checkpoints.")
@click.option("--arch", help="Named architecture (deit_tiny, deit_small, deit_base, vit_fmnist); default: inferred from the weights.")
@click.option("--keep-rate", type=float, help="Token keep rate in (0, 1] (EViT: per pruning block; DynamicViT: base rho).")
@click.option("--img-size", type=int, help="Input size in pixels (position embeddings are resampled).")
@click.option("--num-heads", type=int, help="Attention heads, when not 64 channels per head.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Export recipe YAML; flags override its values.")
@click.option("--opset", type=int, help="ONNX opset (>= 17, default 18).")
@click.option("--batch-size", type=int, help="Static batch size of the graph (default 1).")
@click.option("--dynamic-batch/--static-batch", default=None, help="Symbolic batch dimension (token counts stay static).")
@click.option("--validate-data", default="fashion-mnist", show_default=True, help="fashion-mnist or an image folder.")
@click.option("--validate-limit", type=int, default=256, show_default=True, help="Images for the quick validation.")
@click.option("--no-validate", is_flag=True, help="Skip the quick validation.")
@friendly
def export(checkpoint, outdir, family, arch, keep_rate, img_size, num_heads, recipe, opset, batch_size,
           dynamic_batch, validate_data, validate_limit, no_validate):
    """Load CHECKPOINT, rewrite it to a static graph, export, check and validate it."""
    report = vitedge.export(
        checkpoint, outdir, family=family, arch=arch, keep_rate=keep_rate, img_size=img_size, recipe=recipe,
        opset=opset, batch_size=batch_size, dynamic_batch=dynamic_batch, num_heads=num_heads,
        validate_data=None if no_validate else validate_data, validate_limit=validate_limit, log=log,
    )
    summary = {"outdir": outdir, "check": report["check"]["passed"]}
    if "validate" in report:
        summary["top1_agreement"] = report["validate"]["top1_agreement"]
        summary["kept_agreement"] = report["validate"]["kept_agreement"]
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
@click.option("--calib", help="int8: calibration set, a name in calibration/ or a YAML file (default fmnist-train-512).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True,
              help="int8: onnxruntime calibrator.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep matching nodes in float (glob on node name, op type or tensor name); repeatable.")
@click.option("--include-selection", is_flag=True, help="Quantize the token-selection path too (default: kept FP32).")
@click.option("--keep-fp32", default="LayerNormalization,Softmax,LogSoftmax", show_default=True,
              help="fp16: op types kept in FP32, comma-separated ('' for none).")
@click.option("--validate-data", default="fashion-mnist", show_default=True, help="fashion-mnist or an image folder.")
@click.option("--validate-limit", type=int, default=1000, show_default=True, help="Images for the comparison with FP32.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison with the FP32 graph.")
@friendly
def quantize(outdir, precision, calib, method, exclude, include_selection, keep_fp32, validate_data, validate_limit, no_validate):
    """Write OUTDIR/model.<precision>.onnx from OUTDIR/model.onnx, checked and compared with FP32."""
    from vitedge.quantize import quantize as run_quantize

    keep = tuple(op.strip() for op in keep_fp32.split(",") if op.strip())
    section = run_quantize(outdir, precision, calib=calib, method=method, exclude=exclude,
                           include_selection=include_selection, keep_fp32_ops=keep,
                           validate_data=None if no_validate else validate_data, validate_limit=validate_limit, log=log)
    summary = {"model": section["quantize"]["model"], "check": section["check"]["passed"]}
    if "validate" in section:
        summary.update({k: section["validate"][k] for k in ("top1_agreement", "kept_agreement", "fp32_accuracy", "accuracy")
                        if k in section["validate"]})
    click.echo(json.dumps(summary))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--data", default="fashion-mnist", show_default=True, help="fashion-mnist or an image folder.")
@click.option("--limit", type=int, help="Use the first N images.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Where the source checkpoint is now, if it moved.")
@click.option("--min-top1-agreement", type=float, help="Override the threshold in vitedge.json.")
@click.option("--min-kept-agreement", type=float)
@click.option("--max-abs-logit-diff", type=float)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16/int8: compare that model with the FP32 graph (accuracy, agreement, first disagreement).")
@click.option("--max-accuracy-drop", type=float, help="fp16/int8: largest accuracy drop allowed (0.005 = half a point).")
@friendly
def validate(outdir, data, limit, batch_size, checkpoint, min_top1_agreement, min_kept_agreement, max_abs_logit_diff,
             precision, max_accuracy_drop):
    """Compare OUTDIR/model.onnx (ONNX Runtime) with the reference model on real images."""
    if precision != "fp32":
        from vitedge.quantize import validate_quantized

        result = validate_quantized(outdir, precision, data, limit, {"min_top1_agreement": min_top1_agreement,
                                    "max_accuracy_drop": max_accuracy_drop}, batch_size, log=log)
        click.echo(json.dumps({k: result[k] for k in ("images", "fp32_accuracy", "accuracy", "top1_agreement", "kept_agreement",
                                                       "first_disagreement", "passed") if k in result}))
        return
    thresholds = dict(vitedge.Artifact(outdir).metadata.get("validation", {}))
    overrides = {"min_top1_agreement": min_top1_agreement, "min_kept_agreement": min_kept_agreement,
                 "max_abs_logit_diff": max_abs_logit_diff}
    thresholds.update({k: v for k, v in overrides.items() if v is not None})
    result = vitedge.validate(outdir, data, limit, thresholds, batch_size, checkpoint, log=log)
    click.echo(json.dumps({k: result[k] for k in ("images", "top1_agreement", "kept_agreement", "max_abs_logit_diff", "passed")}))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@click.option("--batch", type=int, help="Batch size (default: the graph's).")
@click.option("--iterations", type=int, default=50, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which model file to time (ort backend).")
@friendly
def profile(outdir, backend, batch, iterations, warmup, threads, precision):
    """Latency percentiles and throughput of OUTDIR on a backend."""
    result = vitedge.profile(outdir, backend, batch, iterations, warmup, threads, log=log, precision=precision)
    click.echo(f"{backend} batch {result['batch']} ({result['threads']} threads): p50 {result['p50_ms']:.2f} ms, "
               f"p90 {result['p90_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, {result['throughput_img_s']:.1f} img/s")


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
    click.echo("ops: " + ", ".join(f"{op} {count}" for op, count in info["ops"].items()))
    if info["report"]:
        click.echo("report: " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in info["report"].items()))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.argument("input_npy", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_npy", required=True, type=click.Path(dir_okay=False))
@friendly
def predict(outdir, input_npy, output_npy):
    """Logits for INPUT_NPY (NCHW float32, normalised) via ONNX Runtime, saved to OUTPUT."""
    logits = vitedge.predict_file(outdir, input_npy, output_npy)
    click.echo(json.dumps({"output": output_npy, "shape": list(logits.shape), "top1": logits.argmax(1).tolist()[:16]}))


@main.command()
def families():
    """List the registered families."""
    for name in vitedge.available_families():
        click.echo(f"{name:12s} {vitedge.get_family(name).summary}")


if __name__ == "__main__":
    main()
