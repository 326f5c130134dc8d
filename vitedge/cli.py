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
@click.option("--budgets", "budgets_file", type=click.Path(dir_okay=False),
              help="A-ViT: token budgets per block from 'vitedge calibrate' (fixed-budget graph).")
@click.option("--quantile", type=float, help="A-ViT: calibrate budgets now, covering this quantile of images per block.")
@friendly
def export(checkpoint, outdir, family, arch, keep_rate, img_size, num_heads, recipe, opset, batch_size,
           dynamic_batch, validate_data, validate_limit, no_validate, budgets_file, quantile):
    """Load CHECKPOINT, rewrite it to a static graph, export, check and validate it."""
    report = vitedge.export(
        checkpoint, outdir, family=family, arch=arch, keep_rate=keep_rate, img_size=img_size, recipe=recipe,
        opset=opset, batch_size=batch_size, dynamic_batch=dynamic_batch, num_heads=num_heads,
        validate_data=None if no_validate else validate_data, validate_limit=validate_limit, log=log,
        budgets=budgets_file, quantile=quantile,
    )
    summary = {"outdir": outdir, "check": report["check"]["passed"]}
    if "validate" in report:
        summary["top1_agreement"] = report["validate"]["top1_agreement"]
        summary["kept_agreement"] = report["validate"]["kept_agreement"]
    click.echo(json.dumps(summary))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@friendly
def check(outdir):
    """Lint OUTDIR/model.onnx: static shapes, no dynamic ops, TensorRT op support."""
    result = vitedge.check(outdir)
    for line in result["errors"]:
        click.echo(f"error: {line}")
    for line in result["warnings"]:
        click.echo(f"warning: {line}")
    click.echo(f"check {'passed' if result['passed'] else 'FAILED'}: {sum(result['ops'].values())} nodes, opset {result['opset']}")
    if not result["passed"]:
        sys.exit(3)


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--data", default="fashion-mnist", show_default=True, help="fashion-mnist or an image folder.")
@click.option("--limit", type=int, help="Use the first N images.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Where the source checkpoint is now, if it moved.")
@click.option("--min-top1-agreement", type=float, help="Override the threshold in vitedge.json.")
@click.option("--min-kept-agreement", type=float)
@click.option("--max-abs-logit-diff", type=float)
@friendly
def validate(outdir, data, limit, batch_size, checkpoint, min_top1_agreement, min_kept_agreement, max_abs_logit_diff):
    """Compare OUTDIR/model.onnx (ONNX Runtime) with the reference model on real images."""
    thresholds = dict(vitedge.Artifact(outdir).metadata.get("validation", {}))
    overrides = {"min_top1_agreement": min_top1_agreement, "min_kept_agreement": min_kept_agreement,
                 "max_abs_logit_diff": max_abs_logit_diff}
    thresholds.update({k: v for k, v in overrides.items() if v is not None})
    result = vitedge.validate(outdir, data, limit, thresholds, batch_size, checkpoint, log=log)
    keys = ("images", "top1_agreement", "kept_agreement", "max_abs_logit_diff", "budget_exceeded", "halting", "passed")
    click.echo(json.dumps({k: result[k] for k in keys if k in result}))


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@click.option("--batch", type=int, help="Batch size (default: the graph's).")
@click.option("--iterations", type=int, default=50, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@friendly
def profile(outdir, backend, batch, iterations, warmup, threads):
    """Latency percentiles and throughput of OUTDIR on a backend."""
    result = vitedge.profile(outdir, backend, batch, iterations, warmup, threads, log=log)
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
@click.argument("input_npy", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_npy", required=True, type=click.Path(dir_okay=False))
@friendly
def predict(outdir, input_npy, output_npy):
    """Logits for INPUT_NPY (NCHW float32, normalised) via ONNX Runtime, saved to OUTPUT."""
    logits = vitedge.predict_file(outdir, input_npy, output_npy)
    click.echo(json.dumps({"output": output_npy, "shape": list(logits.shape), "top1": logits.argmax(1).tolist()[:16]}))


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_file", required=True, type=click.Path(dir_okay=False),
              help="Budgets file to write (JSON), e.g. calibration/fmnist-avit-budgets.json.")
@click.option("--quantile", type=float, help="Cover this quantile of calibration images per block (default 0.99).")
@click.option("--flops-ratio", type=float, help="Instead: the largest quantile whose FLOPs are at most this ratio to dense.")
@click.option("--data", default="fashion-mnist", show_default=True, help="fashion-mnist (train split) or an image folder.")
@click.option("--limit", type=int, default=2000, show_default=True, help="Calibration images.")
@click.option("--family", help="Model family (read from vitedge checkpoints; only avit has budgets).")
@click.option("--num-heads", type=int, help="Attention heads, when not 64 channels per head.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="The export recipe YAML (family, gates in settings).")
@friendly
def calibrate(checkpoint, output_file, quantile, flops_ratio, data, limit, family, num_heads, recipe):
    """Measure live tokens per block of a halting model (A-ViT) and write per-block token budgets."""
    result = vitedge.calibrate(checkpoint, output_file, data=data, quantile=quantile, flops_ratio=flops_ratio,
                               limit=limit, family=family, num_heads=num_heads, recipe=recipe, log=log)
    click.echo(json.dumps({k: result[k] for k in ("token_budgets", "quantile", "flops")} |
                          {"mean_depth": result["halting"]["mean_depth"]}))


@main.command()
def families():
    """List the registered families."""
    for name in vitedge.available_families():
        click.echo(f"{name:12s} {vitedge.get_family(name).summary}")


if __name__ == "__main__":
    main()
