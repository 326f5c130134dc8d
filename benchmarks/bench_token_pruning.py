"""Token pruning on DeiT-Small shapes: vitedge's static EViT / DynamicViT graphs against dense, PyTorch eager and a plain export.

One process, one interleaved run per batch size: after a warm-up, every round times each
variant once (the order rotates from round to round) and each variant's median is taken, so
the ratios printed are measured under the same machine load. Variants, per batch size:

  ort/dense          dense DeiT-S exported by vitedge (family "deit")
  ort/<family>       vitedge static graph (rewrite.to_static + export.export_onnx, as the pipeline does)
  ort/<family>-plain plain ``torch.onnx.export(reference, (x,), dynamo=True)`` of the reference model,
                     linted with vitedge.check; where the reference does not export (its stable
                     argsort has no ONNX translation), the same weights with the selection written
                     as the official code writes it (checked equal to the reference on the input)
  eager/<family>     the reference model in PyTorch (eval, SDPA where no attention map is needed,
                     torch.inference_mode)

Then, per batch size, ONNX Runtime's profiler splits each vitedge graph's kernel time into
linear layers / attention / selection / other, and a small GEMM probe measures how much the
MLP GEMMs slow down at small token counts when their weights stream from memory (batch 1).

Random weights (the latency does not depend on them), 224 px, ImageNet-1k head. ONNX Runtime
CPU with ``--threads`` intra-op threads and spin-waiting off (vitedge.runtime.ort_session),
``torch.set_num_threads(--threads)``. ONNX files go to a temporary folder; only
benchmarks/results/token_pruning.json and the token-pruning section of docs/benchmarks.md are
written.

PyTorch's OpenMP pool is set to passive waiting (OMP_WAIT_POLICY=PASSIVE, before torch is
imported) for the same reason ONNX Runtime's spinning is off: on 2 cores a spinning pool starves
whatever is timed next, and under load from other processes a spinning OpenMP barrier makes
eager PyTorch several times slower than it is. ``--torch-spin`` keeps OpenMP's default.

Usage: python benchmarks/bench_token_pruning.py [--rounds N] [--quick] [--batches 1 8] [--keep-rate 0.7]
       [--threads 2] [--profile-runs 20] [--probe-rounds 20] [--torch-spin]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--torch-spin" not in sys.argv:  # must be set before the OpenMP runtime starts (torch import)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from vitedge.artifact import write_text_atomic  # noqa: E402
from vitedge.backbone import ARCHS, dense_flops  # noqa: E402
from vitedge.check import check_model  # noqa: E402
from vitedge.export import export_onnx  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.families.dynamicvit import DynamicViT  # noqa: E402
from vitedge.families.evit import FUSED_POSITION, EViTBlock, kept_count  # noqa: E402
from vitedge.tokens import gather_tokens  # noqa: E402
from vitedge.pipeline import tool_versions  # noqa: E402
from vitedge.rewrite import to_static  # noqa: E402
from vitedge.runtime import ort_session  # noqa: E402

ARCH = "deit_small"
FAMILIES = ("evit", "dynamicvit")
RESULTS = ROOT / "benchmarks" / "results" / "token_pruning.json"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- token-pruning:begin -->", "<!-- token-pruning:end -->"

# Acceptance targets (DeiT-S, keep 0.7, batch 1).
FLOPS_SLACK = 1.05  # static latency <= 1.05 x FLOPs ratio x dense latency
MIN_SPEEDUP_VS_EAGER = 1.25
MIN_SPEEDUP_VS_PLAIN = 1.0


class OfficialStyleEViTBlock(EViTBlock):
    """EViT selection written the way the official code writes it (topk, then the complement
    of the kept indices by scatter + sort, gathers with indices expanded over channels).

    Same semantics as vitedge's reference block (the fused token is a sum, so the order of the
    complement does not matter); used only where the reference block (its complement is a
    stable argsort) does not export with the dynamo exporter, so that "what users get today"
    has a measured row.
    """

    def select(self, x, scores, positions):
        keep = kept_count(self.keep_rate, x.shape[1])
        patches = x[:, 1:]
        batch, tokens, channels = patches.shape
        if keep >= tokens:
            return x, positions
        index = torch.topk(scores, keep, dim=1, largest=True, sorted=True).indices
        kept = torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, channels))
        kept_positions = torch.gather(positions, 1, index)
        marked = torch.arange(tokens, device=x.device).unsqueeze(0).expand(batch, -1).scatter(1, index, 0)
        rest = torch.sort(marked, dim=1).values[:, keep:]
        others = torch.gather(patches, 1, rest.unsqueeze(-1).expand(-1, -1, channels))
        fused = (others * torch.gather(scores, 1, rest).unsqueeze(-1)).sum(dim=1, keepdim=True)
        fused_position = torch.full_like(positions[:, :1], FUSED_POSITION)
        return torch.cat([x[:, :1], kept, fused], dim=1), torch.cat([kept_positions, fused_position], dim=1)


class OfficialStyleDynamicViT(DynamicViT):
    """DynamicViT selection as the official eval code writes it: a plain (unstable) argsort of the keep score."""

    def select(self, step, x, positions):
        patches = x[:, 1:]
        policy = torch.ones_like(patches[..., :1])
        score = self.score_predictor[step](patches, policy)[..., 0]
        index = torch.argsort(score, dim=1, descending=True)[:, : self.kept[step]]
        return torch.cat([x[:, :1], gather_tokens(patches, index)], dim=1), gather_tokens(positions, index)


def official_style(name: str, reference: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``reference`` (same weights) whose selection is written the way the official code writes it."""
    import copy

    model = copy.deepcopy(reference)
    if name == "evit":
        for block in model.blocks:
            if isinstance(block, EViTBlock):
                block.__class__ = OfficialStyleEViTBlock
    else:
        model.__class__ = OfficialStyleDynamicViT
    return model.eval()


OFFICIAL_STYLE = {
    "evit": "official-code-style EViT selection (topk, complement by scatter + sort, gathers with expanded indices), same weights",
    "dynamicvit": "official-code-style DynamicViT selection (unstable argsort of the keep score), same weights",
}


@contextlib.contextmanager
def quiet():
    previous = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("torch.onnx").setLevel(previous)


def export_record(proto: onnx.ModelProto, path: Path, started: float) -> dict:
    """What the benchmark keeps of one exported graph: time, lint result, op histogram."""
    check = check_model(proto)
    return {
        "export_s": round(time.perf_counter() - started, 1),
        "opset": check.opset,
        "path": path,
        "check_passed": check.passed,
        "check_errors": check.errors,
        "check_warnings": check.warnings,
        "ops": dict(collections.Counter(n.op_type for n in proto.graph.node)),
    }


def plain_export(model: torch.nn.Module, batch: int, cfg, path: Path) -> dict:
    """``torch.onnx.export(model, (x,), dynamo=True)`` with nothing else set; the lint result or the failure."""
    example = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    started = time.perf_counter()
    try:
        with quiet():
            program = torch.onnx.export(model, (example,), dynamo=True)
    except Exception as exc:  # the exporter raises many types; keep the line that says what failed
        text = str(exc)
        reason = next((line.strip() for line in text.splitlines() if "No ONNX function" in line or "Error" in line), "")
        return {"exported": False, "error": (reason or text.strip().splitlines()[0])[:400]}
    proto = program.model_proto
    onnx.save_model(proto, str(path))
    return {"exported": True, **export_record(proto, path, started)}


def vitedge_export(model, cfg, plan, batch: int, path: Path) -> dict:
    started = time.perf_counter()
    static = to_static(model, plan)
    proto = export_onnx(static, cfg, plan, path, batch_size=batch)
    return {**export_record(proto, path, started), "static_model": static}


def ort_runner(path: Path, images: np.ndarray, threads: int):
    session = ort_session(path, threads)
    feed = {session.get_inputs()[0].name: images}
    return lambda: session.run(None, feed)


def eager_runner(model: torch.nn.Module, images: np.ndarray):
    x = torch.from_numpy(images)

    def run():
        with torch.inference_mode():
            return model(x)

    return run


def interleaved(runners: dict, rounds: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm up every variant, then ``rounds`` rounds each timing every variant once, order rotated.

    Returns wall-clock and process CPU time per call (ms). CPU time (all threads of this
    process) is what a call costs, less sensitive than wall time to other processes taking a core.
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        if (index // len(names)) % 2:  # alternate direction too, so no variant always follows the same one
            order = order[::-1]
        for name in order:
            start_cpu = time.process_time()
            start = time.perf_counter()
            runners[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
            cpu[name].append((time.process_time() - start_cpu) * 1000.0)
    return samples, cpu


def summary(values: list[float], cpu: list[float]) -> dict:
    array = np.asarray(values)
    return {
        "median_ms": float(np.median(array)),
        "p10_ms": float(np.percentile(array, 10)),
        "p90_ms": float(np.percentile(array, 90)),
        "min_ms": float(array.min()),
        "cpu_median_ms": float(np.median(cpu)),
        "samples": int(array.size),
    }


def ratio_ci(samples: dict, name: str, base: str, resamples: int = 2000) -> list[float]:
    """95 % bootstrap interval of median(name) / median(base), resampling whole rounds (pairs kept)."""
    a, b = np.asarray(samples[name]), np.asarray(samples[base])
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(a[index], axis=1) / np.median(b[index], axis=1)
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def paired(samples: dict, name: str, base: str) -> dict:
    """Per-round ratio ``name / base`` (both timed in the same round): median and quartiles."""
    ratio = np.asarray(samples[name]) / np.asarray(samples[base])
    return {"median": float(np.median(ratio)), "p25": float(np.percentile(ratio, 25)), "p75": float(np.percentile(ratio, 75))}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fidelity_on_input(reference, static, images: np.ndarray, onnx_outputs: list[np.ndarray]) -> dict:
    """Static ONNX vs eager reference on the benchmark input (random weights: a smoke check, not validation)."""
    with torch.inference_mode():
        logits, kept = reference.forward_tokens(torch.from_numpy(images))
    same_sets = all(
        np.array_equal(np.sort(k.numpy(), axis=1), np.sort(o, axis=1)) for k, o in zip(kept, onnx_outputs[1:])
    )
    return {"max_abs_logit_diff": float(np.abs(logits.numpy() - onnx_outputs[0]).max()), "kept_sets_identical": bool(same_sets)}


SELECTION_OPS = {
    "TopK", "Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "Concat", "Slice", "Cast",
    "Expand", "ReduceMean", "ReduceSum", "Unsqueeze", "LogSoftmax", "Where", "ArgMax",
}


def op_category(op: str) -> str:
    if op == "Gemm":
        return "linear layers (Gemm)"
    if op in ("MatMul", "FusedMatMul", "Softmax"):
        return "attention (MatMul, Softmax)"
    if op in SELECTION_OPS:
        return "selection and bookkeeping"
    return "other (LayerNorm, Gelu, Transpose, Reshape, Add, Conv, ...)"


def ort_profiles(paths: dict[str, Path], images: np.ndarray, threads: int, runs: int) -> dict:
    """Kernel time per op category (ms per inference) from ONNX Runtime's profiler, same session settings.

    The graphs are run in turns (interleaved, like the timing), so a change in machine load
    affects them alike.
    """
    sessions = {
        name: ort_session(path, threads, profile_prefix=str(path.with_suffix("")) + "-profile")
        for name, path in paths.items()
    }
    warmup = 2
    for _ in range(runs + warmup):
        for session in sessions.values():
            session.run(None, {session.get_inputs()[0].name: images})
    out = {}
    for name, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        per_node = collections.defaultdict(list)
        ops = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_node[event["name"]].append(event["dur"])
                ops[event["name"]] = event["args"]["op_name"]
        totals = collections.Counter()
        counts = collections.Counter()
        for node, durations in per_node.items():
            category = op_category(ops[node])
            totals[category] += float(np.median(durations[warmup:] or durations)) / 1000.0
            counts[category] += 1
        out[name] = {"ms": {k: round(v, 3) for k, v in totals.items()}, "nodes": dict(counts), "total_ms": round(sum(totals.values()), 3)}
    return out


def linear_flops(plan, cfg) -> int:
    """FLOPs of the Linear layers alone (qkv, proj, fc1, fc2, predictors): what runs as Gemm."""
    dim, hidden = cfg.embed_dim, cfg.mlp_hidden
    return sum(2 * (4 * b.attention * dim * dim + 2 * b.mlp * dim * hidden) for b in plan.blocks) + plan.extra_flops


def weight_streaming_probe(tmp: Path, threads: int, rounds: int, tokens=(197, 140, 100, 72)) -> dict:
    """GEMM throughput of the MLP shapes at each token count, weights cached vs streamed.

    12 back-to-back fc1/fc2 pairs (384 -> 1536 -> 384, with bias, as the exported graphs run
    them): once reusing one weight pair (4.7 MB, stays in cache), once with 12 distinct pairs
    (57 MB, more than this CPU's last-level cache, as DeiT-S's 88 MB of weights). If the
    streamed case loses throughput as the token count falls, small-token blocks at batch 1 are
    bound by reading weights, not by FLOPs.
    """
    from onnx import TensorProto, helper, numpy_helper

    dim, hidden, pairs = 384, 1536, 12
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((dim, hidden), dtype=np.float32) * 0.02, rng.standard_normal((hidden, dim), dtype=np.float32) * 0.02)
               for _ in range(pairs)]
    sessions = {}
    for count in tokens:
        for distinct in (1, pairs):
            inits = [numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"), numpy_helper.from_array(np.zeros(dim, np.float32), "b2")]
            for i in range(distinct):
                inits += [numpy_helper.from_array(weights[i][0], f"w{i}"), numpy_helper.from_array(weights[i][1], f"v{i}")]
            nodes, previous = [], "x"
            for i in range(pairs):
                j = i % distinct
                nodes += [helper.make_node("Gemm", [previous, f"w{j}", "b1"], [f"h{i}"]),
                          helper.make_node("Gemm", [f"h{i}", f"v{j}", "b2"], [f"o{i}"])]
                previous = f"o{i}"
            graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count, dim])],
                                      [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [count, dim])], inits)
            path = tmp / f"probe-{count}-{distinct}.onnx"
            onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
            key = f"{count}/{'cached' if distinct == 1 else 'streamed'}"
            sessions[key] = ort_runner(path, rng.standard_normal((count, dim), dtype=np.float32), threads)
    samples, _ = interleaved(sessions, rounds, 2)
    out = {}
    for count in tokens:
        flops = pairs * 2 * 2 * count * dim * hidden
        row = {kind: flops / (np.median(samples[f"{count}/{kind}"]) / 1000.0) / 1e9 for kind in ("cached", "streamed")}
        out[str(count)] = {"cached_gflops": round(row["cached"], 1), "streamed_gflops": round(row["streamed"], 1)}
    return out


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ARCHS[ARCH]
    dense = dense_flops(cfg)
    models = {}
    for name in ("deit", *FAMILIES):
        family = get_family(name)
        settings = family.resolve_settings(cfg, {} if name == "deit" else {"keep_rate": args.keep_rate})
        reference = family.reference(cfg, settings).eval()
        plan = family.token_plan(cfg, settings)
        models[name] = {"family": family, "settings": settings, "reference": reference, "plan": plan,
                        "flops_ratio": plan.flops(cfg) / dense}
    label = {"deit": "dense", "evit": "evit", "dynamicvit": "dynamicvit"}
    results = {"batches": {}}
    with tempfile.TemporaryDirectory(prefix="vitedge-bench-") as tmp:
        tmp = Path(tmp)
        for batch in args.batches:
            images = np.random.default_rng(batch).standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size), dtype=np.float32)
            runners, exports, plain, fidelity = {}, {}, {}, {}
            print(f"batch {batch}: exporting", file=sys.stderr, flush=True)
            for name, m in models.items():
                info = vitedge_export(m["reference"], cfg, m["plan"], batch, tmp / f"{name}-b{batch}.onnx")
                runner = ort_runner(info["path"], images, args.threads)
                fidelity[label[name]] = fidelity_on_input(m["reference"], info.pop("static_model"), images, runner())
                exports[label[name]] = info
                runners[f"ort/{label[name]}"] = runner
            for name in FAMILIES:
                reference = models[name]["reference"]
                entry = plain_export(reference, batch, cfg, tmp / f"{name}-plain-b{batch}.onnx")
                entry["model"] = "vitedge reference model (family.reference), as returned"
                if not entry["exported"]:
                    failed = entry
                    official = official_style(name, reference)
                    entry = plain_export(official, batch, cfg, tmp / f"{name}-official-b{batch}.onnx")
                    entry["model"] = OFFICIAL_STYLE[name]
                    with torch.inference_mode():
                        probe = torch.from_numpy(images)
                        entry["max_abs_logit_diff_vs_reference"] = float((official(probe) - reference(probe)).abs().max())
                    entry["reference_export"] = failed
                plain[name] = entry
                if entry["exported"]:
                    runners[f"ort/{name}-plain"] = ort_runner(entry["path"], images, args.threads)
            for name, m in models.items():
                eager = m["reference"]
                eager.set_fused_attention(True)
                runners[f"eager/{label[name]}"] = eager_runner(eager, images)
            print(f"batch {batch}: timing {len(runners)} variants x {args.rounds} rounds", file=sys.stderr, flush=True)
            load_before = os.getloadavg()
            samples, cpu = interleaved(runners, args.rounds, args.warmup)
            stats = {name: summary(values, cpu[name]) for name, values in samples.items()}
            for name in models:
                models[name]["reference"].set_fused_attention(False)
            del runners
            profile = {}
            if args.profile_runs:
                print(f"batch {batch}: ORT profile ({args.profile_runs} runs per graph)", file=sys.stderr, flush=True)
                profile = ort_profiles({label[n]: exports[label[n]]["path"] for n in models}, images, args.threads, args.profile_runs)
                for name, m in models.items():
                    profile[label[name]]["linear_flops_ratio"] = linear_flops(m["plan"], cfg) / linear_flops(models["deit"]["plan"], cfg)
            results["batches"][str(batch)] = {
                "latency": stats,
                "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "vitedge_exports": {k: {kk: (str(vv.name) if kk == "path" else vv) for kk, vv in v.items()} for k, v in exports.items()},
                "plain_exports": {k: {kk: (Path(vv).name if kk == "path" else vv) for kk, vv in v.items()} for k, v in plain.items()},
                "fidelity_on_benchmark_input": fidelity,
                "ratios": ratios(stats, models, plain, samples),
                "ort_profile": profile,
            }
        if args.probe_rounds:
            print(f"weight-streaming probe ({args.probe_rounds} rounds)", file=sys.stderr, flush=True)
            results["weight_streaming_probe"] = weight_streaming_probe(tmp, args.threads, args.probe_rounds)
    results["flops"] = {label[n]: {"gflops": m["plan"].flops(cfg) / 1e9, "ratio": m["flops_ratio"]} for n, m in models.items()}
    results["tokens_per_block"] = {label[n]: [[b.attention, b.mlp] for b in m["plan"].blocks] for n, m in models.items()}
    results["targets"] = targets(results)
    return results


def ratios(stats: dict, models: dict, plain: dict, samples: dict) -> dict:
    """Ratios of medians (the reported figures), plus per-round paired ratios and CPU-time ratios as a noise check."""
    dense = stats["ort/dense"]["median_ms"]
    out = {"dense": {"speedup_vs_eager": stats["eager/dense"]["median_ms"] / dense}}
    for name in FAMILIES:
        static = stats[f"ort/{name}"]["median_ms"]
        flops_ratio = models[name]["flops_ratio"]
        row = {
            "latency_ratio_vs_dense": static / dense,
            "flops_ratio": flops_ratio,
            "bound_ratio": FLOPS_SLACK * flops_ratio,
            "within_flops_bound": static <= FLOPS_SLACK * flops_ratio * dense,
            "speedup_vs_eager": stats[f"eager/{name}"]["median_ms"] / static,
            "eager_ratio_vs_dense_eager": stats[f"eager/{name}"]["median_ms"] / stats["eager/dense"]["median_ms"],
            "latency_ratio_vs_dense_ci95": ratio_ci(samples, f"ort/{name}", "ort/dense"),
            "speedup_vs_eager_ci95": [1.0 / v for v in reversed(ratio_ci(samples, f"ort/{name}", f"eager/{name}"))],
            "paired_latency_ratio_vs_dense": paired(samples, f"ort/{name}", "ort/dense"),
            "cpu_time_ratio_vs_dense": stats[f"ort/{name}"]["cpu_median_ms"] / stats["ort/dense"]["cpu_median_ms"],
        }
        key = f"ort/{name}-plain"
        if key in stats:
            row["speedup_vs_plain_export"] = stats[key]["median_ms"] / static
            row["plain_ratio_vs_dense"] = stats[key]["median_ms"] / dense
            row["plain_export_lint_passed"] = plain[name]["check_passed"]
            row["paired_speedup_vs_plain_export"] = 1.0 / paired(samples, f"ort/{name}", key)["median"]
            row["speedup_vs_plain_export_ci95"] = [1.0 / v for v in reversed(ratio_ci(samples, f"ort/{name}", key))]
        out[name] = row
    return out


def targets(results: dict) -> dict:
    batch = results["batches"].get("1")
    if batch is None:
        return {}
    out = {}
    for name in FAMILIES:
        r = batch["ratios"][name]
        out[name] = {
            f"latency <= {FLOPS_SLACK} x FLOPs ratio x dense": r["within_flops_bound"],
            f">= {MIN_SPEEDUP_VS_EAGER}x faster than PyTorch eager": r["speedup_vs_eager"] >= MIN_SPEEDUP_VS_EAGER,
            # non-inferiority: met unless the whole 95 % interval of the speedup lies below 1
            "no slower than the plain dynamo export": (
                r["speedup_vs_plain_export_ci95"][1] >= MIN_SPEEDUP_VS_PLAIN if "speedup_vs_plain_export" in r else None
            ),
        }
    return out


def run_environment(threads: int, rounds: int, warmup: int, command: str, **extra) -> dict:
    """What every benchmark records about its run: date, machine, load, thread and spin settings,
    tool versions, then its own settings (``extra``), rounds and the command that reproduces it."""
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "ort_spinning": "off (session.intra_op.allow_spinning=0)",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        **tool_versions(),
        **extra,
        "rounds": rounds,
        "warmup": warmup,
        "command": command,
    }


def environment(args) -> dict:
    return run_environment(args.threads, args.rounds, args.warmup, command(args), arch=ARCH, keep_rate=args.keep_rate)


def command(args) -> str:
    parts = ["python benchmarks/bench_token_pruning.py"]
    if args.quick:
        parts.append("--quick")
    elif args.rounds != DEFAULT_ROUNDS:
        parts.append(f"--rounds {args.rounds}")
    if args.batches != [1, 8]:
        parts.append("--batches " + " ".join(map(str, args.batches)))
    if args.keep_rate != 0.7:
        parts.append(f"--keep-rate {args.keep_rate}")
    if args.threads != 2:
        parts.append(f"--threads {args.threads}")
    if args.torch_spin:
        parts.append("--torch-spin")
    if not args.quick and args.profile_runs != 20:
        parts.append(f"--profile-runs {args.profile_runs}")
    if not args.quick and args.probe_rounds != 20:
        parts.append(f"--probe-rounds {args.probe_rounds}")
    return " ".join(parts)


def yes_no(value) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def markdown(env: dict, results: dict) -> str:
    lines = [
        BEGIN,
        "## Token pruning: DeiT-S, keep 0.7 (EViT, DynamicViT)",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), {env['threads']} threads for ONNX Runtime "
        f"(spin-waiting off) and PyTorch (OMP_WAIT_POLICY={env['omp_wait_policy']}); load average "
        f"{env['load_average_at_start'][0]} at the start; torch {env['torch']}, onnx {env['onnx']}, onnxruntime {env['onnxruntime']}, "
        f"vitedge {env['vitedge']}, Python {env['python']}. Random weights, 224 px, 1000 classes. "
        f"One process; per batch size, {env['warmup']} warm-up calls per variant, then {env['rounds']} rounds "
        "that time every variant once in a rotating order; medians. Other jobs may have shared the machine: "
        "compare ratios within a batch size, not absolute times across runs.",
        "",
        f"Reproduce: `{env['command']}` (writes `benchmarks/results/token_pruning.json` and this section).",
        "",
        "- **ORT vitedge**: the static graph vitedge exports (`rewrite.to_static` + `export.export_onnx`), "
        "ONNX Runtime CPU.",
        "- **ORT plain export**: `torch.onnx.export(reference, (x,), dynamo=True)` of the reference model, "
        "nothing else (what a user gets without vitedge).",
        "- **PyTorch eager**: the reference model, `eval()`, SDPA attention wherever no attention map is "
        "needed, `torch.inference_mode()`.",
        "",
        "Brackets: 95 % bootstrap intervals (rounds resampled, pairs kept).",
        "",
        "| batch | model | FLOPs vs dense | ORT vitedge (ms) | latency vs dense [95 % CI] | bound 1.05 x FLOPs ratio | "
        "PyTorch eager (ms) | vitedge speedup vs eager | ORT plain export (ms) | vitedge speedup vs plain [95 % CI] | "
        "plain export passes the TensorRT lint |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, data in results["batches"].items():
        stats, r = data["latency"], data["ratios"]
        lines.append(
            f"| {batch} | DeiT-S dense | 1.000 | {stats['ort/dense']['median_ms']:.1f} | 1.000 | — | "
            f"{stats['eager/dense']['median_ms']:.1f} | {r['dense']['speedup_vs_eager']:.2f}x | — | — | — |"
        )
        for name in FAMILIES:
            row = r[name]
            plain_key = f"ort/{name}-plain"
            plain = data["plain_exports"][name]
            plain_ms = f"{stats[plain_key]['median_ms']:.1f}" if plain_key in stats else "export fails"
            vs_plain = (
                f"{row['speedup_vs_plain_export']:.3f}x [{row['speedup_vs_plain_export_ci95'][0]:.3f}, {row['speedup_vs_plain_export_ci95'][1]:.3f}]"
                if "speedup_vs_plain_export" in row else "—"
            )
            lint = yes_no(plain.get("check_passed")) if plain["exported"] else "—"
            mark = "" if row["within_flops_bound"] else " (over)"
            lines.append(
                f"| {batch} | {name} keep {env['keep_rate']} | {row['flops_ratio']:.3f} | "
                f"{stats[f'ort/{name}']['median_ms']:.1f} | {row['latency_ratio_vs_dense']:.3f}{mark} "
                f"[{row['latency_ratio_vs_dense_ci95'][0]:.3f}, {row['latency_ratio_vs_dense_ci95'][1]:.3f}] | "
                f"{row['bound_ratio']:.3f} | {stats[f'eager/{name}']['median_ms']:.1f} | "
                f"{row['speedup_vs_eager']:.2f}x | {plain_ms} | {vs_plain} | {lint} |"
            )
    lines += [
        "",
        "Noise check (same run): the static/dense latency ratio as the median of per-round paired ratios "
        "(with quartiles), and as a ratio of median process CPU time per call (all threads; less sensitive "
        "to other processes taking a core than wall time).",
        "",
        "| batch | model | ratio of medians | paired ratio median [p25, p75] | CPU-time ratio | FLOPs ratio |",
        "|---|---|---|---|---|---|",
    ]
    for batch, data in results["batches"].items():
        for name in FAMILIES:
            row = data["ratios"][name]
            pr = row["paired_latency_ratio_vs_dense"]
            lines.append(
                f"| {batch} | {name} | {row['latency_ratio_vs_dense']:.3f} | {pr['median']:.3f} [{pr['p25']:.3f}, {pr['p75']:.3f}] | "
                f"{row['cpu_time_ratio_vs_dense']:.3f} | {row['flops_ratio']:.3f} |"
            )
    if any(data.get("ort_profile") for data in results["batches"].values()):
        lines += [
            "",
            "Where the time goes (ONNX Runtime's profiler, graphs run in turns, kernel time per inference, medians over the profiled runs; "
            "the profiler adds a little time per node). \"Selection\" is every TopK, Gather, Scatter, Concat, Slice, Cast, "
            "Expand, Reduce and LogSoftmax node (dense has two: the class-token Concat and Gather).",
            "",
            "| batch | graph | total (ms) | linear layers (Gemm) ms | Gemm time vs dense | Linear FLOPs vs dense | attention ms | selection ms (share) | other ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for batch, data in results["batches"].items():
            prof = data.get("ort_profile") or {}
            dense_gemm = prof.get("dense", {}).get("ms", {}).get("linear layers (Gemm)")
            for name, entry in prof.items():
                ms = entry["ms"]
                gemm = ms.get("linear layers (Gemm)", 0.0)
                selection = ms.get("selection and bookkeeping", 0.0)
                other = sum(v for k, v in ms.items() if k.startswith("other"))
                lines.append(
                    f"| {batch} | {name} | {entry['total_ms']:.2f} | {gemm:.2f} | "
                    f"{gemm / dense_gemm:.3f} | {entry['linear_flops_ratio']:.3f} | "
                    f"{ms.get('attention (MatMul, Softmax)', 0.0):.2f} | {selection:.2f} ({100 * selection / entry['total_ms']:.1f} %) | {other:.2f} |"
                )
    probe = results.get("weight_streaming_probe")
    if probe:
        lines += [
            "",
            "Weight-streaming probe: throughput of 12 back-to-back MLP GEMM pairs (384 → 1536 → 384, with bias) at "
            "each token count, reusing one weight pair (4.7 MB, cached) or with 12 distinct pairs (57 MB, more than "
            "the last-level cache, like DeiT-S's 88 MB of weights):",
            "",
            "| tokens (GEMM rows) | " + " | ".join(probe) + " |",
            "|---|" + "---|" * len(probe),
            "| weights cached, GFLOP/s | " + " | ".join(f"{v['cached_gflops']:.0f}" for v in probe.values()) + " |",
            "| weights streamed, GFLOP/s | " + " | ".join(f"{v['streamed_gflops']:.0f}" for v in probe.values()) + " |",
        ]
    lines += [
        "",
        "Acceptance targets at batch 1 (the FLOPs bound and the eager speedup on the medians; \"no slower than the "
        "plain export\" is met unless the whole 95 % interval of the speedup lies below 1, since the two graphs "
        "differ only in their selection bookkeeping and tie within noise):",
        "",
    ]
    for name, checks in results["targets"].items():
        lines.append(f"- {name}: " + "; ".join(f"{what}: {yes_no(ok)}" for what, ok in checks.items()))
    lines += ["", "Plain exports (the TensorRT lint is `vitedge.check.check_model`):", ""]
    first = next(iter(results["batches"].values()))
    for name, plain in first["plain_exports"].items():
        note = []
        if "reference_export" in plain:
            note.append(f"vitedge's reference model does not export (`{plain['reference_export']['error']}`); measured instead: {plain['model']}")
        if plain["exported"]:
            verdict = "passes" if plain["check_passed"] else "fails: " + "; ".join(plain["check_errors"])
            note.append(f"lint {verdict}")
        else:
            note.append(f"export fails: {plain['error']}")
        lines.append(f"- {name}: " + "; ".join(note))
    lines += ["", "vitedge graphs: " + "; ".join(
        f"{name} lint {'passes' if e['check_passed'] else 'fails'}" + (f" ({'; '.join(e['check_warnings'])})" if e["check_warnings"] else "")
        for name, e in first["vitedge_exports"].items()
    ) + "."]
    lines += [END, ""]
    return "\n".join(lines)


def write_doc_section(doc: Path, begin: str, end: str, section: str, title: str) -> None:
    """Replace the ``begin`` ... ``end`` part of ``doc`` with ``section`` (or append it), keeping the prose around it."""
    doc.parent.mkdir(exist_ok=True)
    text = doc.read_text() if doc.exists() else title
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    write_text_atomic(doc, text)


def write_doc(section: str) -> None:
    write_doc_section(DOC, BEGIN, END, section,
                      "# Benchmarks\n\nGenerated by the scripts in `benchmarks/`; each section says how to reproduce it.\n\n")


DEFAULT_ROUNDS = 60


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds per batch size (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls per variant (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up call, batch 1 and 8")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-spin", action="store_true", help="leave OpenMP's wait policy at its default (spinning)")
    parser.add_argument("--profile-runs", type=int, default=20, help="ORT-profiled runs per vitedge graph (0: no profile)")
    parser.add_argument("--probe-rounds", type=int, default=20, help="rounds of the weight-streaming GEMM probe (0: skip)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
        args.profile_runs, args.probe_rounds = min(args.profile_runs, 3), min(args.probe_rounds, 3)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    env = environment(args)
    results = run(args)
    payload = {"environment": env, **results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    section = markdown(env, results)
    write_doc(section)
    print(section)


if __name__ == "__main__":
    main()
