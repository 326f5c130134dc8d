"""Flush-to-zero on or off: what ONNX Runtime's denormal switch does to masked attention.

Masked keys (A-ViT's exact -1000 bias on halted tokens) drive MLAS's exp into float32's denormal
range, where x86 multiplies take microcode assists. ``vitedge.runtime.ort_session`` turns on
``session.set_denormal_as_zero``; this script measures what that buys, per family, against the
dense DeiT of the same shape, all after vitedge's ONNX Runtime passes (model.ort.onnx).

Random weights halt no token (every key bias is 0, so nothing is masked), so A-ViT's gate centre
is set as in bench_families (bench_families.row_overrides: a mean token depth of 78 %, A-ViT-S's
3.6 of DeiT-S's 4.6 GFLOPs); halted keys then carry the -1000 bias.

One interleaved run (bench_token_pruning's harness) of every graph twice: ``<graph>`` with the
switch on and ``<graph>/denormals`` with it off. ONNX Runtime sets the calling thread's mode only
from the first session a process creates, so each runner also sets the calling thread's own
flag (``torch.set_flush_denormal``) before every call: both halves of a pair then run as a fresh
process would. Ratios are medians with 95 % bootstrap intervals (rounds resampled, pairs kept).

Writes benchmarks/results/denormals.json and the denormals section of docs/optimize.md.

Usage: python benchmarks/bench_denormals.py [--families avit,ats] [--batches 1 8] [--rounds 30]
       [--warmup 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_token_pruning: no spinning OpenMP pool on 2 cores

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from bench_families import ROWS, row_overrides  # noqa: E402
from bench_token_pruning import interleaved, quiet, ratio_ci, run_environment, summary, write_doc_section  # noqa: E402
from vitedge.backbone import ARCHS  # noqa: E402
from vitedge.export import export_onnx  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.optimize import optimize_graph  # noqa: E402
from vitedge.rewrite import to_static  # noqa: E402
from vitedge.runtime import ort_session  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "denormals.json"
DOC = ROOT / "docs" / "optimize.md"
BEGIN, END = "<!-- denormals:begin -->", "<!-- denormals:end -->"
OFF = "/denormals"


def ort_graph(family_name: str, arch: str, overrides: dict, batch: int, path: Path) -> Path:
    """The family's static graph after vitedge's ONNX Runtime passes (what model.ort.onnx holds)."""
    family, cfg = get_family(family_name), ARCHS[arch]
    settings = family.resolve_settings(cfg, overrides)
    plan = family.token_plan(cfg, settings)
    torch.manual_seed(0)
    with quiet():
        proto = export_onnx(to_static(family.reference(cfg, settings).eval(), plan), cfg, plan, path,
                            batch_size=batch)
    optimize_graph(proto)
    onnx.save_model(proto, str(path))
    return path


def runner(path: Path, images: np.ndarray, threads: int, flush: bool):
    session = ort_session(path, threads, flush_denormals=flush)
    feed = {session.get_inputs()[0].name: images}

    def run():
        torch.set_flush_denormal(flush)  # the calling thread's half of the switch (see the module docstring)
        return session.run(None, feed)

    return run


def measure(families: list[str], batch: int, args, tmp: Path) -> dict:
    images = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    graphs = {"dense": ort_graph("deit", "deit_small", {}, batch, tmp / f"dense-b{batch}.onnx")}
    settings = {}
    for name in families:
        arch, overrides, _ = ROWS[name]
        overrides, settings[name] = row_overrides(name, ARCHS[arch], overrides)
        graphs[name] = ort_graph(name, arch, overrides, batch, tmp / f"{name}-b{batch}.onnx")
    runners = {}
    for name, path in graphs.items():
        runners[name] = runner(path, images, args.threads, True)
        runners[name + OFF] = runner(path, images, args.threads, False)
    outputs = {name: run()[0] for name, run in runners.items()}
    print(f"batch {batch}: timing {len(runners)} graphs x {args.rounds} rounds", file=sys.stderr, flush=True)
    samples, cpu = interleaved(runners, args.rounds, args.warmup)
    torch.set_flush_denormal(False)
    rows = {}
    for name in graphs:
        rows[name] = {
            "median_ms": summary(samples[name], cpu[name])["median_ms"],
            "median_ms_denormals": summary(samples[name + OFF], cpu[name + OFF])["median_ms"],
            "flush_vs_denormals": float(np.median(samples[name]) / np.median(samples[name + OFF])),
            "flush_vs_denormals_ci95": ratio_ci(samples, name, name + OFF),
            "max_abs_logit_diff_flush_vs_denormals": float(np.abs(outputs[name] - outputs[name + OFF]).max()),
        }
        rows[name].update(settings.get(name, {}))
        if name != "dense":
            rows[name]["vs_dense"] = float(np.median(samples[name]) / np.median(samples["dense"]))
            rows[name]["vs_dense_ci95"] = ratio_ci(samples, name, "dense")
            rows[name]["vs_dense_denormals"] = float(np.median(samples[name + OFF]) / np.median(samples["dense" + OFF]))
            rows[name]["vs_dense_denormals_ci95"] = ratio_ci(samples, name + OFF, "dense" + OFF)
    return rows


def fmt(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(env: dict, results: dict) -> str:
    lines = [
        BEGIN,
        f"Measured {env['date']} on {env['cpu']} ({env['threads']} threads, {env['rounds']} rounds, load "
        f"{env['load_average_at_start']} at the start); `{env['command']}`. Every graph is model.ort.onnx "
        "(vitedge's ONNX Runtime passes); \"flush\" is `vitedge.runtime.ort_session`'s default, \"denormals\" "
        "the same session with `session.set_denormal_as_zero` off.",
        "",
        "| graph | batch | flush / denormals [95 % CI] | / dense, flush | / dense, denormals | max abs logit change |",
        "|---|---|---|---|---|---|",
    ]
    for batch, rows in results.items():
        for name, row in rows.items():
            label = "dense DeiT-S" if name == "dense" else ROWS[name][2]
            versus = fmt(row["vs_dense"], row["vs_dense_ci95"]) if "vs_dense" in row else "1"
            versus_off = fmt(row["vs_dense_denormals"], row["vs_dense_denormals_ci95"]) if "vs_dense" in row else "1"
            lines.append(f"| {label} | {batch} | {fmt(row['flush_vs_denormals'], row['flush_vs_denormals_ci95'])} | "
                         f"{versus} | {versus_off} | {row['max_abs_logit_diff_flush_vs_denormals']:.1e} |")
    return "\n".join(lines + [END]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="avit,ats", help="comma-separated, from bench_families' rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(ROWS))
    if unknown or not families:
        parser.error(f"unknown families {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
    if args.rounds < 2 or args.warmup < 0 or min(args.batches) < 1:
        parser.error("--rounds must be >= 2, --warmup >= 0 and every batch >= 1")
    torch.set_num_threads(args.threads)
    command = f"python benchmarks/bench_denormals.py --families {','.join(families)} --batches " \
              f"{' '.join(map(str, args.batches))} --rounds {args.rounds}"
    env = run_environment(args.threads, args.rounds, args.warmup, command, families=families, batches=args.batches)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitedge-denormals-") as tmp:
        results = {str(batch): measure(families, batch, args, Path(tmp)) for batch in args.batches}
    env["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"environment": env, "batches": results}, indent=2) + "\n")
    section = markdown(env, results)
    write_doc_section(DOC, BEGIN, END, section, "# Optimising for a runtime\n\n")
    print(section)
    print(f"wall time {env['wall_s']} s; results in {RESULTS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
