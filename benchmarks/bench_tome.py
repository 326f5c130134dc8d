"""ToMe: accuracy on Fashion-MNIST at a few r, fidelity of the static graph, and speed on DeiT-S shapes.

Three parts, one process:

  accuracy  the bundled dense model (models/fmnist-deit.safetensors) with ToMe switched on at
            r = 0..4 off the shelf, and the model fine-tuned with ToMe on
            (models/fmnist-tome.safetensors, r = 3), on the 10,000 test images (reference
            PyTorch model, the paper's eval semantics);
  fidelity  the fine-tuned model exported by vitedge (static ONNX, ORT) against its reference
            on the 10,000 test images: top-1 agreement, per-block assignment agreement
            (element-wise), logit error;
  speed     DeiT-S shapes (224 px, 1000 classes, random weights), r = 13 as in the paper,
            batch 1 and 8, one interleaved run per batch size (warm-up, rounds that time every
            variant once in a rotating order, medians): vitedge's static graph (assignment
            MatMul) vs the same graph merging with ScatterElements(reduction=add) (the
            official op, which the TensorRT lint rejects) vs dense DeiT-S (ORT) vs the
            PyTorch reference (eager, SDPA) vs dense eager. Every ONNX variant is checked
            against the reference on the timed input.

ONNX Runtime CPU with ``--threads`` intra-op threads and spin-waiting off; PyTorch with the
same threads and OMP_WAIT_POLICY=PASSIVE (see bench_token_pruning.py for why).
Writes benchmarks/results/tome.json and docs/tome.md (the measured part, between markers).

Usage: python benchmarks/bench_tome.py [--rounds N] [--quick] [--batches 1 8] [--merge-count 13] [--threads 2]
"""

from __future__ import annotations

import argparse
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vitedge  # noqa: E402
from bench_token_pruning import (  # noqa: E402
    eager_runner,
    export_record,
    interleaved,
    ort_runner,
    paired,
    ratio_ci,
    run_environment,
    summary,
    write_doc_section,
)
from vitedge.backbone import ARCHS, dense_flops  # noqa: E402
from vitedge.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from vitedge.export import export_onnx  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.load import load_model  # noqa: E402
from vitedge.rewrite import to_static  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tome.json"
DOC = ROOT / "docs" / "tome.md"
BEGIN, END = "<!-- tome-measured:begin -->", "<!-- tome-measured:end -->"
FLOPS_SLACK = 1.05
PAPER = {"deit_small_dense_top1": 79.8, "deit_small_r13_top1": 79.4, "source": "ToMe paper (Bolya et al., ICLR 2023) for r = 13; DeiT paper for dense DeiT-S"}


def fmnist_test(limit: int | None):
    images, labels = load_fashion_mnist("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(np.asarray(labels))


@torch.inference_mode()
def accuracy(model, images, labels, batch: int = 500) -> float:
    correct = 0
    for start in range(0, len(images), batch):
        correct += int((model(images[start : start + batch]).argmax(1) == labels[start : start + batch]).sum())
    return correct / len(images)


def accuracy_table(limit: int | None, merge_counts=(0, 1, 2, 3, 4)) -> list[dict]:
    rows = []
    raw, labels = fmnist_test(limit)
    for name, counts in (("fmnist-deit", merge_counts), ("fmnist-tome", (2, 3, 4))):
        path = ROOT / "models" / f"{name}.safetensors"
        for r in counts:
            loaded = load_model(path, family="tome", settings={"merge_count": r})
            images = (raw - loaded.mean[0]) / loaded.std[0]
            rows.append({
                "checkpoint": f"models/{name}.safetensors",
                "merge_count": r,
                "tokens_per_block": [b.attention for b in loaded.plan.blocks],
                "tokens_at_head": loaded.plan.blocks[-1].mlp,
                "flops_ratio": loaded.plan.flops(loaded.cfg) / dense_flops(loaded.cfg),
                "accuracy": accuracy(loaded.model, images, labels),
                "images": len(labels),
            })
            print(f"accuracy {name} r={r}: {rows[-1]['accuracy']:.4f}", file=sys.stderr, flush=True)
    return rows


def near_tie(model, image: np.ndarray, block_index: int) -> dict:
    """The reference's closest calls at ``block_index`` for one image: the gap between the r-th and
    (r+1)-th best-match scores (which a tokens merge) and the smallest best-vs-second b gap (where)."""
    from vitedge.families.tome import bipartite_soft_matching, merge_weighted_average, mergeable, proportional_attention

    with torch.inference_mode():
        x, size = model.embed(torch.from_numpy(image[None])), None
        for i, block in enumerate(model.blocks):
            out, metric = proportional_attention(block.attn, block.norm1(x), size if model.prop_attn else None)
            x = x + out
            r = min(block.merge_count, mergeable(x.shape[1]))
            if i == block_index:
                unit = metric / metric.norm(dim=-1, keepdim=True)
                scores = (unit[:, 2::2] @ unit[:, 1::2].transpose(-1, -2))[0]
                top2 = scores.topk(2, dim=-1).values
                ranked = top2[:, 0].sort(descending=True).values
                return {"block": i, "rank_gap_at_r": float(ranked[r - 1] - ranked[r]),
                        "min_best_vs_second_gap": float((top2[:, 0] - top2[:, 1]).min())}
            if r > 0:
                x, size = merge_weighted_average(x, size, bipartite_soft_matching(metric, r))
            x = x + block.mlp(block.norm2(x))
    return {}


def fidelity(limit: int | None) -> dict:
    """Static ONNX (ORT) vs the reference per image: identical assignments in every block, top-1, logits.

    Also runs ``vitedge.validate`` (its verdict with the default thresholds is recorded, not
    raised) and, for every image whose merges differ, the reference's score gaps at the first
    differing block: a flip needs two scores within float rounding of each other.
    """
    from vitedge.data import load_dataset
    from vitedge.errors import ValidationFailed
    from vitedge.runtime import ort_session, run_batched
    from vitedge.validate import input_spec

    checkpoint = ROOT / "models" / "fmnist-tome.safetensors"
    loaded = load_model(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        vitedge.export(checkpoint, tmp, validate_data=None, dynamic_batch=True, log=lambda m: None)
        artifact = vitedge.Artifact(tmp)
        meta = artifact.metadata
        session = ort_session(artifact.model_path, 2)
        dataset = load_dataset("fashion-mnist", limit)
        same, diffs, top1, flips, offset = [], [], [], [], 0
        for images, _ in dataset.batches(input_spec(meta), 250):
            outputs = run_batched(session, images, 250)
            with torch.inference_mode():
                logits, assignments = loaded.model.forward_tokens(torch.from_numpy(images))
            agree = np.stack([(a.numpy() == o).all(axis=1) for a, o in zip(assignments, outputs[1:])], axis=1)
            same.append(agree.all(axis=1))
            diffs.append(np.abs(logits.numpy() - outputs[0]).max(axis=1))
            top1.append(logits.numpy().argmax(1) == outputs[0].argmax(1))
            for i in np.flatnonzero(~agree.all(axis=1)):
                first = meta["token_budgets"]["selections"][int(np.argmin(agree[i]))]["block"]
                flips.append({"image": offset + int(i), "first_differing_block": first,
                              "max_abs_logit_diff": float(diffs[-1][i]), **near_tie(loaded.model, images[i], first)})
            offset += len(images)
        same, diffs, top1 = np.concatenate(same), np.concatenate(diffs), np.concatenate(top1)
        try:
            verdict = vitedge.validate(tmp, "fashion-mnist", limit, batch_size=250)
        except ValidationFailed:
            verdict = artifact.report()["validate"]
    return {
        "checkpoint": "models/fmnist-tome.safetensors", "settings": meta["settings"], "flops_ratio": meta["flops"]["ratio"],
        "images": int(len(same)), "top1_agreement": float(top1.mean()),
        "assignments_identical_all_blocks": float(same.mean()),
        "max_abs_logit_diff": float(diffs.max()),
        "max_abs_logit_diff_where_merges_agree": float(diffs[same].max()),
        "flipped_images": flips,
        "validate_stage": verdict,
    }


def speed(args) -> dict:
    cfg = ARCHS["deit_small"]
    torch.manual_seed(0)
    tome, deit = get_family("tome"), get_family("deit")
    settings = tome.resolve_settings(cfg, {"merge_count": args.merge_count})
    reference = tome.reference(cfg, settings).eval()
    dense = deit.reference(cfg, {}).eval()
    dense.load_state_dict(reference.state_dict())
    plan, dense_plan = tome.token_plan(cfg, settings), deit.token_plan(cfg, {})
    flops_ratio = plan.flops(cfg) / dense_flops(cfg)
    results = {"settings": settings, "flops_ratio": flops_ratio, "gflops": plan.flops(cfg) / 1e9,
               "dense_gflops": dense_flops(cfg) / 1e9, "tokens_per_block": [[b.attention, b.mlp] for b in plan.blocks],
               "batches": {}}
    with tempfile.TemporaryDirectory(prefix="vitedge-tome-") as tmp:
        tmp = Path(tmp)
        for batch in args.batches:
            images = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            with torch.inference_mode():
                ref_logits, ref_assign = reference.forward_tokens(torch.from_numpy(images))
            exports, runners, checks = {}, {}, {}
            for name, model, model_plan in (("dense", dense, dense_plan), ("tome", reference, plan), ("tome-scatter", reference, plan)):
                print(f"batch {batch}: exporting {name}", file=sys.stderr, flush=True)
                started = time.perf_counter()
                static = to_static(model, model_plan)
                if name == "tome-scatter":
                    static.merge_with = "scatter"
                path = tmp / f"{name}-b{batch}.onnx"
                record = export_record(export_onnx(static, cfg, model_plan, path, batch_size=batch), path, started)
                runners[f"ort/{name}"] = ort_runner(path, images, args.threads)
                outputs = runners[f"ort/{name}"]()
                if name != "dense":
                    checks[name] = {
                        "max_abs_logit_diff": float(np.abs(outputs[0] - ref_logits.numpy()).max()),
                        "top1_agree": bool((outputs[0].argmax(1) == ref_logits.numpy().argmax(1)).all()),
                        "assignments_identical": all(np.array_equal(o, a.numpy()) for o, a in zip(outputs[1:], ref_assign)),
                    }
                record["path"] = path.name
                exports[name] = record
            reference.set_fused_attention(True)
            dense.set_fused_attention(True)
            runners["eager/tome"] = eager_runner(reference, images)
            runners["eager/dense"] = eager_runner(dense, images)
            print(f"batch {batch}: timing {len(runners)} variants x {args.rounds} rounds", file=sys.stderr, flush=True)
            load_before = os.getloadavg()
            samples, cpu = interleaved(runners, args.rounds, args.warmup)
            reference.set_fused_attention(False)
            dense.set_fused_attention(False)
            stats = {name: summary(values, cpu[name]) for name, values in samples.items()}
            med = {name: s["median_ms"] for name, s in stats.items()}
            ratios = {
                "tome_vs_dense": med["ort/tome"] / med["ort/dense"],
                "tome_vs_dense_ci95": ratio_ci(samples, "ort/tome", "ort/dense"),
                "tome_vs_dense_paired": paired(samples, "ort/tome", "ort/dense"),
                "tome_vs_dense_cpu_time": stats["ort/tome"]["cpu_median_ms"] / stats["ort/dense"]["cpu_median_ms"],
                "flops_ratio": flops_ratio,
                "bound_ratio": FLOPS_SLACK * flops_ratio,
                "within_flops_bound": med["ort/tome"] <= FLOPS_SLACK * flops_ratio * med["ort/dense"],
                "scatter_vs_matmul": med["ort/tome-scatter"] / med["ort/tome"],
                "scatter_vs_matmul_ci95": ratio_ci(samples, "ort/tome-scatter", "ort/tome"),
                "tome_speedup_vs_eager": med["eager/tome"] / med["ort/tome"],
                "tome_speedup_vs_eager_ci95": [1.0 / v for v in reversed(ratio_ci(samples, "ort/tome", "eager/tome"))],
                "dense_speedup_vs_eager": med["eager/dense"] / med["ort/dense"],
                "eager_tome_vs_eager_dense": med["eager/tome"] / med["eager/dense"],
            }
            del runners
            profile = {}
            if args.profile_runs:
                print(f"batch {batch}: ORT kernel profile ({args.profile_runs} runs per graph)", file=sys.stderr, flush=True)
                profile = kernel_profile({name: tmp / e["path"] for name, e in exports.items()}, images, args.threads, args.profile_runs)
            results["batches"][str(batch)] = {
                "latency": stats, "ratios": ratios, "exports": exports, "fidelity_on_benchmark_input": checks,
                "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "ort_kernel_profile": profile,
            }
    return results


# Ops that the dense graph runs only a handful of times (class token, patch flattening): in the
# ToMe graphs they are the matching, merge and assignment bookkeeping.
MERGE_OPS = {
    "TopK", "Gather", "GatherElements", "ScatterElements", "Concat", "Slice", "Squeeze", "Unsqueeze", "Equal",
    "Cast", "Expand", "ReduceSum", "ReduceMean", "Sqrt", "Log", "Div",
}


def kernel_profile(paths: dict[str, Path], images: np.ndarray, threads: int, runs: int) -> dict:
    """Median kernel time per inference (ms) by op type, from ONNX Runtime's profiler, graphs run in turns."""
    import collections

    from vitedge.runtime import ort_session

    sessions = {name: ort_session(path, threads, profile_prefix=str(path.with_suffix("")) + "-profile") for name, path in paths.items()}
    for _ in range(runs + 2):
        for session in sessions.values():
            session.run(None, {session.get_inputs()[0].name: images})
    out = {}
    for name, session in sessions.items():
        per_node, op_of = collections.defaultdict(list), {}
        for event in json.loads(Path(session.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_node[event["name"]].append(event["dur"])
                op_of[event["name"]] = event["args"]["op_name"]
        by_op = collections.Counter()
        for node, durations in per_node.items():
            by_op[op_of[node]] += float(np.median(durations[2:] or durations)) / 1000.0
        merge = sum(v for op, v in by_op.items() if op in MERGE_OPS)
        total = sum(by_op.values())
        out[name] = {"total_ms": round(total, 3), "merge_bookkeeping_ms": round(merge, 3), "nodes": len(per_node),
                     "by_op_ms": {op: round(v, 3) for op, v in by_op.most_common()}}
    return out


def environment(args) -> dict:
    return run_environment(args.threads, args.rounds, args.warmup,
                           "python benchmarks/bench_tome.py" + (" --quick" if args.quick else ""),
                           merge_count=args.merge_count)


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def markdown(env: dict, payload: dict) -> str:
    lines = [BEGIN, "## Measured", ""]
    lines += [
        f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), {env['threads']} threads; load average "
        f"{env['load_average_at_start'][0]} at the start (other jobs shared the machine: compare ratios, not absolute times); "
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}. Reproduce: `{env['command']}` (writes "
        "`benchmarks/results/tome.json` and this section).",
        "",
    ]
    if payload.get("accuracy"):
        lines += [
            "### Accuracy on Fashion-MNIST (10,000 test images, reference PyTorch model)",
            "",
            "| checkpoint | r per block | tokens per block (attention) | tokens at the head | FLOPs vs dense | top-1 |",
            "|---|---|---|---|---|---|",
        ]
        for row in payload["accuracy"]:
            tokens = " → ".join(map(str, row["tokens_per_block"][:1] + row["tokens_per_block"][-1:]))
            lines.append(f"| {row['checkpoint']} | {row['merge_count']} | {tokens} | {row['tokens_at_head']} | "
                         f"{row['flops_ratio']:.3f} | {pct(row['accuracy'])} |")
        lines += ["", "r = 0 is the dense model. `fmnist-deit` rows are ToMe off the shelf (no training); `fmnist-tome` "
                  "is the dense model fine-tuned 1 epoch with r = 3 (`python scripts/train_fmnist.py tome`).", ""]
    fid = payload.get("fidelity")
    if fid:
        stage = fid["validate_stage"]
        agree = list(stage["kept_agreement"].values())
        lines += [
            "### Fidelity: static ONNX (ORT) vs the reference",
            "",
            f"`{fid['checkpoint']}` ({', '.join(f'{k}={v}' for k, v in fid['settings'].items())}), {fid['images']} test images, "
            f"dynamic-batch export: top-1 agreement **{pct(fid['top1_agreement'])}**; every merge identical (all "
            f"{len(agree)} blocks' per-patch assignments) on **{pct(fid['assignments_identical_all_blocks'])}** of images "
            f"(per block {pct(min(agree))} to {pct(max(agree))}); max abs logit diff "
            f"**{fid['max_abs_logit_diff_where_merges_agree']:.1e}** where the merges agree, {fid['max_abs_logit_diff']:.1e} overall; "
            f"accuracy {pct(stage['reference_accuracy'])} (reference) / {pct(stage['exported_accuracy'])} (static ONNX); "
            f"FLOPs {fid['flops_ratio']:.3f} of dense. `vitedge validate` with its default thresholds: "
            + ("passes." if stage["passed"] else "fails (" + "; ".join(stage["failures"]) + ")."),
            "",
        ]
        if fid["flipped_images"]:
            lines += ["Images whose merges differ, with the reference's closest calls at the first differing block "
                      "(float32 resolution near a cosine of 1 is 6e-8):", "",
                      "| test image | first differing block | gap between the r-th and (r+1)-th best-match score | "
                      "smallest best vs second-best b score | max abs logit diff |", "|---|---|---|---|---|"]
            for f in fid["flipped_images"]:
                lines.append(f"| {f['image']} | {f['first_differing_block']} | {f.get('rank_gap_at_r', float('nan')):.1e} | "
                             f"{f.get('min_best_vs_second_gap', float('nan')):.1e} | {f['max_abs_logit_diff']:.1e} |")
            lines.append("")
    sp = payload.get("speed")
    if sp:
        lines += [
            f"### Speed: DeiT-S shapes, r = {sp['settings']['merge_count']} (197 → {sp['tokens_per_block'][-1][1]} tokens)",
            "",
            f"Random weights, 224 px, 1000 classes; {env['warmup']} warm-up calls per variant, then {env['rounds']} "
            "rounds timing every variant once in a rotating order; medians; brackets are 95 % bootstrap intervals. "
            f"FLOPs {sp['gflops'] / 2:.2f} G MACs vs {sp['dense_gflops'] / 2:.2f} dense (ratio {sp['flops_ratio']:.3f}; "
            f"the paper: 2.7 vs 4.6). Accuracy beside it: DeiT-S r = 13 is {PAPER['deit_small_r13_top1']} % vs "
            f"{PAPER['deit_small_dense_top1']} % dense on ImageNet off the shelf (paper; no ImageNet here); on "
            "Fashion-MNIST see the accuracy table (r = 3 is the same 6.6 % of tokens per block).",
            "",
            "| batch | dense ORT (ms) | ToMe ORT, assignment MatMul (ms) | ToMe vs dense [95 % CI] | bound 1.05 × FLOPs ratio | "
            "ToMe ORT, ScatterElements add (ms) | scatter vs MatMul [95 % CI] | PyTorch eager ToMe (ms) | vitedge vs eager [95 % CI] | "
            "eager dense (ms) | static graph = reference on the input |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for batch, data in sp["batches"].items():
            s, r, f = data["latency"], data["ratios"], data["fidelity_on_benchmark_input"]["tome"]
            mark = "" if r["within_flops_bound"] else " (over)"
            lines.append(
                f"| {batch} | {s['ort/dense']['median_ms']:.1f} | {s['ort/tome']['median_ms']:.1f} | "
                f"{r['tome_vs_dense']:.3f}{mark} [{r['tome_vs_dense_ci95'][0]:.3f}, {r['tome_vs_dense_ci95'][1]:.3f}] | "
                f"{r['bound_ratio']:.3f} | {s['ort/tome-scatter']['median_ms']:.1f} | {r['scatter_vs_matmul']:.3f} "
                f"[{r['scatter_vs_matmul_ci95'][0]:.3f}, {r['scatter_vs_matmul_ci95'][1]:.3f}] | {s['eager/tome']['median_ms']:.1f} | "
                f"{r['tome_speedup_vs_eager']:.2f}x [{r['tome_speedup_vs_eager_ci95'][0]:.2f}, {r['tome_speedup_vs_eager_ci95'][1]:.2f}] | "
                f"{s['eager/dense']['median_ms']:.1f} | top-1 {'yes' if f['top1_agree'] else 'NO'}, assignments "
                f"{'identical' if f['assignments_identical'] else 'DIFFER'}, max logit diff {f['max_abs_logit_diff']:.1e} |"
            )
        lines += ["", "Noise check: ToMe/dense as the median of per-round paired ratios and as a CPU-time ratio.", "",
                  "| batch | ratio of medians | paired median [p25, p75] | CPU-time ratio | FLOPs ratio | load average before/after |",
                  "|---|---|---|---|---|---|"]
        for batch, data in sp["batches"].items():
            r = data["ratios"]
            p = r["tome_vs_dense_paired"]
            lines.append(f"| {batch} | {r['tome_vs_dense']:.3f} | {p['median']:.3f} [{p['p25']:.3f}, {p['p75']:.3f}] | "
                         f"{r['tome_vs_dense_cpu_time']:.3f} | {r['flops_ratio']:.3f} | {data['load_average_before_after']} |")
        if any(d.get("ort_kernel_profile") for d in sp["batches"].values()):
            lines += ["", "Where the time goes (ONNX Runtime's profiler, graphs run in turns, median kernel time per inference). "
                      "Merge bookkeeping: every " + ", ".join(sorted(MERGE_OPS)) + " node (dense has a few of these too).", "",
                      "| batch | graph | nodes | kernel total (ms) | vs dense | merge bookkeeping (ms, share) | MatMul (ms) |",
                      "|---|---|---|---|---|---|---|"]
            for batch, data in sp["batches"].items():
                prof = data.get("ort_kernel_profile") or {}
                for name, p in prof.items():
                    lines.append(f"| {batch} | {name} | {p['nodes']} | {p['total_ms']:.2f} | {p['total_ms'] / prof['dense']['total_ms']:.3f} | "
                                 f"{p['merge_bookkeeping_ms']:.2f} ({100 * p['merge_bookkeeping_ms'] / p['total_ms']:.1f} %) | "
                                 f"{p['by_op_ms'].get('MatMul', 0.0) + p['by_op_ms'].get('FusedMatMul', 0.0):.2f} |")
        first = next(iter(sp["batches"].values()))["exports"]

        def lint(e):
            if e["check_passed"]:
                return "passes"
            reasons = sorted({re.sub(r"node_\w+ ", "", err) for err in e["check_errors"]})
            return f"fails ({len(e['check_errors'])} errors: " + "; ".join(reasons) + ")"

        lines += ["", "Lint (`vitedge.check`): " + "; ".join(f"{name} {lint(e)}" for name, e in first.items()) + "."]
        lines += ["", "Graph size (nodes): " + ", ".join(f"{name} {sum(e['ops'].values())}" for name, e in first.items()) + "."]
    lines += [END, ""]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_doc_section(DOC, BEGIN, END, section, "# ToMe\n\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up, 500 images")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--merge-count", type=int, default=13)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-runs", type=int, default=20, help="ORT-profiled runs per graph (0: no profile)")
    parser.add_argument("--limit", type=int, default=None, help="test images for accuracy and fidelity (default: all)")
    parser.add_argument("--parts", nargs="+", default=["accuracy", "fidelity", "speed"], choices=["accuracy", "fidelity", "speed"])
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.limit, args.profile_runs = 3, 1, args.limit or 500, min(args.profile_runs, 3)
    torch.set_num_threads(args.threads)
    env = environment(args)
    payload = dict(json.loads(RESULTS.read_text())) if RESULTS.exists() else {}
    payload["environment"] = env
    parts = {"accuracy": lambda: accuracy_table(args.limit), "fidelity": lambda: fidelity(args.limit), "speed": lambda: speed(args)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        payload[part] = parts[part]()
        RESULTS.write_text(json.dumps(payload, indent=2, default=str) + "\n")  # after each part: a late failure keeps the rest
    section = markdown(env, payload)
    write_doc(section)
    print(section)


if __name__ == "__main__":
    main()
