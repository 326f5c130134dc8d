"""Every family against both plain exporters: vitedge's static graph vs what a user gets without vitedge.

Reproduces issue 17's table. Per family and batch size, one interleaved run (benchmarks/
bench_token_pruning.py's harness: warm-up, then rounds that time every variant once in a
rotating, alternating order; medians; ONNX Runtime CPU, pinned threads, spin-waiting off) of:

  dense       dense DeiT of the family's shape exported by vitedge (family "deit"): the ratio base
  vitedge     the family's static graph (rewrite.to_static + export.export_onnx, as the pipeline does)
  optimized   that graph after vitedge.optimize's ONNX Runtime passes (model.ort.onnx; fused attention
              and softmax), timed even where 'vitedge optimize' would not write it, so the column shows
              what the passes do (absent where no pass applies: then model.onnx is the ORT graph);
              "fastest ORT form" is the faster of vitedge and optimized
  dense-optimized  the dense graph after the same passes: the base of the like-for-like column
              (fastest ORT form / dense ORT form), since an ORT user would optimise a dense model too
  torchscript plain ``torch.onnx.export(model, (x,), dynamo=False, opset_version=17)``
  dynamo      plain ``torch.onnx.export(model, (x,), dynamo=True)``

where ``model`` is the official-style code: the selection written as the official repository
writes it where vitedge has a transcription (EViT, DynamicViT: bench_token_pruning.official_style;
Evo-ViT: bench_evovit.OfficialStyleEvoViT), else vitedge's reference model (the paper's eval
semantics). An exporter that fails is a result ("no export"), as is a graph that fails the
TensorRT lint (vitedge.check.check_model). Ratios are to dense in the same run, with 95 %
bootstrap intervals (rounds resampled, pairs kept); the FLOP bound is 1.05 x the FLOPs ratio.
With ``--profile-runs`` > 0, ONNX Runtime's profiler then runs dense and vitedge in turns and the
op types whose kernel time exceeds dense's the most are named: that is where each family's gap
goes. Random weights (latency does not depend on them), 224 px, 1000 classes.

Writes benchmarks/results/families.json and the families section of docs/benchmarks.md
(``--quick``: benchmarks/results/families_quick.json only, never the docs).

Usage: python benchmarks/bench_families.py [--quick] [--families evit,ats] [--batches 1 8] [--rounds 30]
       [--warmup 3] [--threads 2] [--profile-runs 10] [--arch deit_tiny]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import re
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

from bench_evovit import OfficialStyleEvoViT  # noqa: E402
from bench_token_pruning import (  # noqa: E402
    FLOPS_SLACK,
    OFFICIAL_STYLE,
    export_record,
    interleaved,
    official_style,
    ort_runner,
    paired,
    quiet,
    ratio_ci,
    run_environment,
    summary,
    write_doc_section,
)
from vitedge.backbone import ARCHS, dense_flops  # noqa: E402
from vitedge.errors import VitedgeError  # noqa: E402
from vitedge.export import export_onnx  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.families.tome import (  # noqa: E402
    Matching,
    ToMeBlock,
    merge_source,
    merge_weighted_average,
    mergeable,
    proportional_attention,
)
from vitedge.optimize import optimize_graph  # noqa: E402
from vitedge.rewrite import to_static  # noqa: E402
from vitedge.runtime import ort_session  # noqa: E402

# family: (arch, settings, label) -- the rows of issue 17's table
ROWS = {
    "evit": ("deit_small", {"keep_rate": 0.7}, "EViT keep 0.7"),
    "dynamicvit": ("deit_small", {"keep_rate": 0.7}, "DynamicViT rho 0.7"),
    "evovit": ("deit_small", {}, "Evo-ViT"),
    "supervit": ("deit_small", {"resolution": 224, "keep_rate": 0.7}, "SuperViT 224 / 0.7"),
    "tome": ("deit_small", {"merge_count": 13}, "ToMe r 13"),
    "avit": ("deit_small", {}, "A-ViT (masked, 78 % token depth)"),
    "ats": ("deit_small", {}, "ATS K = 197"),
    "castling": ("deit_tiny", {}, "Castling (DeiT-T)"),
}
EXPORTERS = ("torchscript", "dynamo")
TARGET_DEPTH = 3.6 / 4.6  # A-ViT-S's GFLOPs over DeiT-S's (A-ViT paper): the share of token-blocks run


def token_depth(cfg, settings: dict, images: np.ndarray) -> float:
    """Mean share of the blocks a patch token runs, in A-ViT's static masked form."""
    family = get_family("avit")
    settings = family.resolve_settings(cfg, settings)
    torch.manual_seed(0)
    model = to_static(family.reference(cfg, settings).eval(), family.token_plan(cfg, settings))
    with torch.inference_mode():
        _, kept = model.forward_tokens(torch.from_numpy(images))
    return float(np.mean([(k >= 0).float().mean().item() for k in kept]))


def halting_gate_center(cfg, images: np.ndarray, target: float = TARGET_DEPTH, steps: int = 12) -> tuple[float, float]:
    """The gate centre whose mean token depth on ``images`` is ``target`` (bisection; depth rises with it).

    Random weights halt no token (channel 0 stays far below the released gate centre), which
    leaves A-ViT's masking idle; a trained A-ViT halts, and its halted keys' -1000 bias is what
    the masked graph pays for."""
    low, high = 0.0, 20.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if token_depth(cfg, {"gate_center": middle}, images) < target else (low, middle)
    center = (low + high) / 2
    return center, token_depth(cfg, {"gate_center": center}, images)


def row_overrides(name: str, cfg, overrides: dict) -> tuple[dict, dict]:
    """A row's settings with what random weights need to exercise the family, and a record of that.

    A-ViT's gate is set so that tokens halt (``halting_gate_center`` on 8 fixed random images):
    random weights halt none, which would leave its masking idle."""
    if name != "avit":
        return overrides, {}
    calibration = np.random.default_rng(0).standard_normal((8, cfg.in_chans, cfg.img_size, cfg.img_size),
                                                           dtype=np.float32)
    center, depth = halting_gate_center(cfg, calibration)
    print(f"avit: gate centre {center:.3f} (mean token depth {depth:.3f})", file=sys.stderr, flush=True)
    return {**overrides, "gate_center": center}, {"halting_gate_center": round(center, 4),
                                                   "mean_token_depth": round(depth, 4)}


RESULTS = ROOT / "benchmarks" / "results" / "families.json"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "families_quick.json"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
OFFICIAL_EVOVIT = "the official Evo-ViT eval forward as written (in-place writes, unstable sort), same weights"


OFFICIAL_TOME = "ToMe's official bipartite_soft_matching order (plain, unstable argsort of the edges), same weights"


def official_matching(metric: torch.Tensor, r: int) -> Matching:
    """vitedge's reference matching with the official (unstable) argsort: the same merges but on exact ties."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -float("inf")
        best, best_index = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged = order[:, :r]
        return Matching(order[:, r:].sort(dim=1).values, merged, best_index.gather(1, merged))


class OfficialStyleToMeBlock(ToMeBlock):
    """ToMeBlock whose matching sorts the edges as the official code does (the reference's stable
    argsort has no ONNX translation in either exporter)."""

    def forward(self, x, size=None, source=None):
        out, metric = proportional_attention(self.attn, self.norm1(x), size if self.prop_attn else None, self.attn.fused)
        x = x + out
        r = min(self.merge_count, mergeable(x.shape[1]))
        if r > 0:
            matching = official_matching(metric, r)
            if source is not None:
                source = merge_source(source, matching)
            x, size = merge_weighted_average(x, size, matching)
        return x + self.mlp(self.norm2(x)), size, source


def official_model(name: str, reference: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The code a user would export without vitedge, and what it is."""
    if name in OFFICIAL_STYLE:
        return official_style(name, reference), OFFICIAL_STYLE[name]
    if name == "tome":
        model = copy.deepcopy(reference)
        for block in model.blocks:
            if isinstance(block, ToMeBlock):
                block.__class__ = OfficialStyleToMeBlock
        return model.eval(), OFFICIAL_TOME
    if name == "evovit":
        model = copy.deepcopy(reference)
        model.__class__ = OfficialStyleEvoViT
        return model.eval(), OFFICIAL_EVOVIT
    return reference, "vitedge's reference model (the paper's eval semantics), as returned"


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 to /dev/null: the TorchScript exporter prints its whole IR graph there on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def plain_export(model, exporter: str, example: torch.Tensor, path: Path) -> dict:
    """One plain export with nothing set beyond the exporter; the lint result or the failure line."""
    started = time.perf_counter()
    try:
        with quiet(), native_stderr_silenced():
            if exporter == "torchscript":
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)
                proto = onnx.load(str(path))
            else:
                proto = torch.onnx.export(model, (example,), dynamo=True).model_proto
                onnx.save_model(proto, str(path))
    except Exception as exc:  # every exporter failure type is a result here
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines() if line.strip()]
        telling = [line for line in lines if re.search(r"Error|Unsupported|not supported|No ONNX function", line)]
        return {"exported": False, "error": ((telling or lines or [type(exc).__name__])[0])[:300]}
    return {"exported": True, **export_record(proto, path, started)}


def op_times(paths: dict[str, Path], images: np.ndarray, threads: int, runs: int) -> dict[str, dict[str, float]]:
    """Median kernel ms per inference per op type, graphs run in turns (ONNX Runtime's profiler)."""
    sessions = {name: ort_session(path, threads, profile_prefix=str(path.with_suffix("")) + "-profile")
                for name, path in paths.items()}
    warmup = 2
    for _ in range(runs + warmup):
        for session in sessions.values():
            session.run(None, {session.get_inputs()[0].name: images})
    out = {}
    for name, session in sessions.items():
        per_node, ops = collections.defaultdict(list), {}
        for event in json.loads(Path(session.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_node[event["name"]].append(event["dur"])
                ops[event["name"]] = event["args"]["op_name"]
        totals = collections.Counter()
        for node, durations in per_node.items():
            totals[ops[node]] += float(np.median(durations[warmup:] or durations)) / 1000.0
        out[name] = {op: round(ms, 3) for op, ms in totals.most_common()}
    return out


def gap(profile: dict[str, dict[str, float]], top: int = 4) -> list[list]:
    """The op types whose time in the vitedge graph exceeds dense's the most: [op, ms over dense]."""
    dense, static = profile["dense"], profile["vitedge"]
    excess = {op: static.get(op, 0.0) - dense.get(op, 0.0) for op in set(dense) | set(static)}
    return [[op, round(ms, 3)] for op, ms in sorted(excess.items(), key=lambda kv: -kv[1])[:top] if ms > 0]


def run_family(name: str, args, tmp: Path) -> dict:
    arch, overrides, label = ROWS[name]
    cfg = ARCHS[args.arch or arch]
    family, dense_family = get_family(name), get_family("deit")
    overrides, halting = row_overrides(name, cfg, overrides)
    settings = family.resolve_settings(cfg, overrides)
    plan = family.token_plan(cfg, settings)
    torch.manual_seed(0)
    reference = family.reference(cfg, settings).eval()
    dense = dense_family.reference(cfg, {}).eval()
    dense_plan = dense_family.token_plan(cfg, {})
    official, official_what = official_model(name, reference)
    out = {"label": label, "arch": args.arch or arch, "settings": settings, "plain_model": official_what,
           "flops_ratio": plan.flops(cfg) / dense_flops(cfg), **halting, "batches": {}}
    for batch in args.batches:
        print(f"{name} batch {batch}: exporting", file=sys.stderr, flush=True)
        images = np.random.default_rng(batch).standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size),
                                                              dtype=np.float32)
        example = torch.from_numpy(images)
        paths, exports = {}, {}
        for variant, model, model_plan in (("dense", dense, dense_plan), ("vitedge", reference, plan)):
            path = tmp / f"{name}-{variant}-b{batch}.onnx"
            started = time.perf_counter()
            with quiet():
                proto = export_onnx(to_static(model, model_plan), cfg, model_plan, path, batch_size=batch)
            exports[variant] = {"exported": True, **export_record(proto, path, started)}
            paths[variant] = path
        for source, variant in (("vitedge", "optimized"), ("dense", "dense-optimized")):
            optimized_proto = onnx.load(str(paths[source]))
            passes = optimize_graph(optimized_proto)
            if any(passes.values()):  # else model.onnx is the ORT graph: timing a copy would only add a noisy twin
                paths[variant] = tmp / f"{name}-{variant}-b{batch}.onnx"
                onnx.save_model(optimized_proto, str(paths[variant]))
                exports[variant] = {"exported": True, "passes": passes, "check_passed": False,
                                    "note": "ONNX Runtime only (com.microsoft ops), never for TensorRT"}
        for exporter in EXPORTERS:
            entry = plain_export(official, exporter, example, tmp / f"{name}-{exporter}-b{batch}.onnx")
            exports[exporter] = entry
            if entry["exported"]:
                paths[exporter] = entry["path"]
        runners = {}
        for variant, path in paths.items():
            try:
                runners[variant] = ort_runner(path, images, args.threads)
            except VitedgeError as exc:  # a plain graph ONNX Runtime refuses to load is a result too
                exports[variant].update(exported=False, error=f"exports, but {exc}"[:300])
        paths = {variant: path for variant, path in paths.items() if variant in runners}
        with torch.inference_mode():
            expected = reference(example).numpy()
        fidelity = {variant: float(np.abs(runner()[0] - expected).max()) for variant, runner in runners.items()  # the family's graphs only
                    if not variant.startswith("dense")}
        print(f"{name} batch {batch}: timing {len(runners)} variants x {args.rounds} rounds", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        samples, cpu = interleaved(runners, args.rounds, args.warmup)
        del runners
        stats = {variant: summary(values, cpu[variant]) for variant, values in samples.items()}
        ratios = {variant: {"vs_dense": stats[variant]["median_ms"] / stats["dense"]["median_ms"],
                            "vs_dense_ci95": ratio_ci(samples, variant, "dense"),
                            "paired_vs_dense": paired(samples, variant, "dense")}
                  for variant in samples if variant != "dense"}
        fastest = min(("vitedge", "optimized") if "optimized" in stats else ("vitedge",), key=lambda v: stats[v]["median_ms"])
        dense_ort = min(("dense", "dense-optimized") if "dense-optimized" in stats else ("dense",),
                        key=lambda v: stats[v]["median_ms"])
        plain_done = [e for e in EXPORTERS if e in samples]
        best_plain = min(plain_done, key=lambda e: stats[e]["median_ms"]) if plain_done else None
        row = {"latency": stats, "ratios": ratios, "max_abs_logit_diff_vs_reference": fidelity,
               "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "exports": {k: {kk: (Path(vv).name if kk == "path" else vv) for kk, vv in v.items()}
                           for k, v in exports.items()},
               "best_plain": best_plain,
               "bound_ratio": FLOPS_SLACK * out["flops_ratio"],
               "within_flops_bound": ratios["vitedge"]["vs_dense"] <= FLOPS_SLACK * out["flops_ratio"]}
        if best_plain:
            ci = ratio_ci(samples, "vitedge", best_plain)
            row["vitedge_vs_best_plain"] = stats["vitedge"]["median_ms"] / stats[best_plain]["median_ms"]
            row["vitedge_vs_best_plain_ci95"] = ci
            row["faster_than_best_plain"] = ci[1] < 1.0  # the whole interval below 1
            ci = ratio_ci(samples, fastest, best_plain)
            row["fastest_vs_best_plain"] = stats[fastest]["median_ms"] / stats[best_plain]["median_ms"]
            row["fastest_vs_best_plain_ci95"] = ci
            row["fastest_faster_than_best_plain"] = ci[1] < 1.0
        row["fastest_ort_form"] = fastest
        row["dense_ort_form"] = dense_ort
        row["fastest_vs_dense_ort"] = stats[fastest]["median_ms"] / stats[dense_ort]["median_ms"]
        row["fastest_vs_dense_ort_ci95"] = ratio_ci(samples, fastest, dense_ort)
        if "optimized" in stats:
            row["optimized_vs_vitedge"] = stats["optimized"]["median_ms"] / stats["vitedge"]["median_ms"]
            row["optimized_vs_vitedge_ci95"] = ratio_ci(samples, "optimized", "vitedge")
        if args.profile_runs:
            print(f"{name} batch {batch}: ORT profile ({args.profile_runs} runs)", file=sys.stderr, flush=True)
            profile = op_times({"dense": paths["dense"], "vitedge": paths["vitedge"]}, images, args.threads,
                               args.profile_runs)
            row["op_ms"] = profile
            row["gap_ops"] = gap(profile)
        out["batches"][str(batch)] = row
    return out


def fmt_ratio(row: dict, variant: str) -> str:
    r = row["ratios"].get(variant)
    if r is None:
        return "no runnable export"
    lint = "" if row["exports"][variant]["check_passed"] else " (lint fails)"
    return f"{r['vs_dense']:.3f} [{r['vs_dense_ci95'][0]:.3f}, {r['vs_dense_ci95'][1]:.3f}]{lint}"


RUN_KEYS = ("date", "cpu", "cores", "threads", "onnxruntime", "torch", "load_average_at_start", "warmup", "rounds",
            "command")


def run_record(env: dict) -> dict:
    """What a family's rows say about the run that measured them: a subset run replaces some rows
    and keeps the others, which may come from another day or machine."""
    return {key: env[key] for key in RUN_KEYS}


def run_sentence(run: dict) -> str:
    return (f"{run['date']} on {run['cpu']} ({run['cores']} cores), {run['threads']} threads, ONNX Runtime "
            f"{run['onnxruntime']} (spin-waiting off), torch {run['torch']}; load average "
            f"{run['load_average_at_start'][0]} at the start; {run['warmup']} warm-up calls per variant, then "
            f"{run['rounds']} rounds; `{run['command']}`")


def markdown(env: dict, results: dict) -> str:
    runs = []  # the distinct runs behind the rows, in row order
    for fam in results.values():
        if fam["run"] not in runs:
            runs.append(fam["run"])
    letters = [chr(ord("a") + i) for i in range(len(runs))]
    if len(runs) == 1:
        measured = [f"Measured {run_sentence(runs[0])}."]
    else:
        measured = [f"The rows come from {len(runs)} runs (a subset run replaces its families' rows and keeps the "
                    "others), marked in the model column:", ""]
        measured += [f"- run {letter}: {run_sentence(run)}" for letter, run in zip(letters, runs)]
    lines = [
        BEGIN,
        "## Every family vs both plain exporters",
        "",
        *measured,
        "",
        "Per family and batch, one interleaved run: warm-up calls per variant, then rounds timing every variant once "
        "in a rotating order; medians. Ratios are latency / dense latency of the same shape in the same run, with "
        "95 % bootstrap intervals; \"lint fails\": the plain graph fails vitedge's TensorRT lint. Random weights, 224 px.",
        "",
        f"Reproduce: `{env['command'] if len(runs) == 1 else 'python benchmarks/bench_families.py'}` (writes "
        f"`{env['results_file']}`" + (" only)." if "--quick" in env["command"] else " and this section)."),
        "",
        "| batch | model | FLOPs / dense | bound (1.05 x) | plain TorchScript / dense | plain dynamo / dense | "
        "vitedge / dense | vitedge / best plain [95 % CI] | faster than every plain export | "
        "optimized (model.ort.onnx) / model.onnx [95 % CI] | fastest ORT form / best plain [95 % CI] | faster | "
        "like for like: fastest ORT form / dense ORT form [95 % CI] | "
        "where the gap to dense goes (ms over dense, ORT profiler) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in sorted({int(batch) for fam in results.values() for batch in fam["batches"]}):
        for name, fam in results.items():
            row = fam["batches"].get(str(batch))
            if row is None:
                continue
            vs_plain = "—"
            if row.get("best_plain"):
                ci = row["vitedge_vs_best_plain_ci95"]
                vs_plain = f"{row['vitedge_vs_best_plain']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({row['best_plain']})"
            faster = "—" if not row.get("best_plain") else ("yes" if row["faster_than_best_plain"] else "**no**")
            optimized = "no pass applies"
            if "optimized_vs_vitedge" in row:
                ci = row["optimized_vs_vitedge_ci95"]
                optimized = f"{row['optimized_vs_vitedge']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
            fastest, fastest_faster = "—", "—"
            if row.get("best_plain"):
                ci = row["fastest_vs_best_plain_ci95"]
                fastest = f"{row['fastest_vs_best_plain']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({row['fastest_ort_form']})"
                fastest_faster = "yes" if row["fastest_faster_than_best_plain"] else "**no**"
            like = "—"
            if "fastest_vs_dense_ort" in row:
                ci = row["fastest_vs_dense_ort_ci95"]
                like = f"{row['fastest_vs_dense_ort']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
            mark = "" if row["within_flops_bound"] else " (over)"
            gaps = ", ".join(f"{op} {ms:.2f}" for op, ms in row.get("gap_ops", [])) or "—"
            run = f" (run {letters[runs.index(fam['run'])]})" if len(runs) > 1 else ""
            lines.append(
                f"| {batch} | {fam['label']}{run} | {fam['flops_ratio']:.3f} | {row['bound_ratio']:.3f} | "
                f"{fmt_ratio(row, 'torchscript')} | {fmt_ratio(row, 'dynamo')} | {fmt_ratio(row, 'vitedge')}{mark} | "
                f"{vs_plain} | {faster} | {optimized} | {fastest} | {fastest_faster} | {like} | {gaps} |")
    lines += ["", "What each plain export is, and why one failed:", ""]
    for name, fam in results.items():
        first = next(iter(fam["batches"].values()))
        fails = "; ".join(f"{e} fails: `{first['exports'][e]['error']}`" for e in EXPORTERS if not first["exports"][e]["exported"])
        lines.append(f"- {fam['label']}: {fam['plain_model']}" + (f"; {fails}" if fails else ""))
    lines += [END, ""]
    return "\n".join(lines)


DEFAULT_ROUNDS = 30


def command(args) -> str:
    parts = ["python benchmarks/bench_families.py"]
    if args.quick:
        parts.append("--quick")
    elif args.rounds != DEFAULT_ROUNDS:
        parts.append(f"--rounds {args.rounds}")
    if args.families != list(ROWS):
        parts.append("--families " + ",".join(args.families))
    if args.batches != [1, 8]:
        parts.append("--batches " + " ".join(map(str, args.batches)))
    if args.threads != 2:
        parts.append(f"--threads {args.threads}")
    if args.arch:
        parts.append(f"--arch {args.arch}")
    return " ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(ROWS), help="comma-separated (default: all eight)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-runs", type=int, default=10, help="ORT-profiled runs of dense and vitedge (0: skip)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="one shape for every family (default: the table's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up, 2 profiled runs; "
                        "writes benchmarks/results/families_quick.json only")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(args.families) - set(ROWS))
    if unknown or not args.families:
        parser.error(f"unknown families {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
    if args.quick:
        args.rounds, args.warmup, args.profile_runs = 3, 1, min(args.profile_runs, 2)
    if args.rounds < 2 or args.warmup < 0 or min(args.batches) < 1:
        parser.error("--rounds must be >= 2, --warmup >= 0 and every batch >= 1")
    torch.set_num_threads(args.threads)
    target = QUICK_RESULTS if args.quick else RESULTS
    env = run_environment(args.threads, args.rounds, args.warmup, command(args), batches=args.batches,
                          families=args.families, results_file=str(target.relative_to(ROOT)))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitedge-families-") as tmp:
        results = {name: {**run_family(name, args, Path(tmp)), "run": run_record(env)} for name in args.families}
    env["wall_s"] = round(time.perf_counter() - started, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not args.quick and target.exists():  # a subset run replaces its own rows and keeps the others
        earlier = json.loads(target.read_text()).get("families", {})
        results = {name: results.get(name, earlier.get(name)) for name in ROWS if name in results or name in earlier}
    target.write_text(json.dumps({"environment": env, "families": results}, indent=2, default=str) + "\n")
    section = markdown(env, results)
    if not args.quick:
        write_doc_section(DOC, BEGIN, END, section, "# Benchmarks\n\n")
    print(section)
    print(f"wall time {env['wall_s']} s; results in {target.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
