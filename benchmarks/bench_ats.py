"""ATS: what K masked slots cost and what a lower K buys, with the accuracy beside it, in one run.

Two parts, one process:

1. Accuracy on Fashion-MNIST (the bundled 50-token model, static form in PyTorch, which
   equals the per-image reference): dense; ATS at K = 50 (all tokens, the analogue of the
   official K = 197) and at a lower K, each on the dense weights (ATS has no parameters)
   and on the ATS-fine-tuned weights. Per ATS block: the mean number of live (unique)
   tokens, i.e. what a runtime with data-dependent shapes would have computed, and the FLOPs
   that would have cost next to the static graph's.
2. Latency on DeiT-S shapes (224 px, batch 1, random weights), ONNX Runtime CPU, interleaved
   rounds (the order rotates; medians and per-round ratios): vitedge's dense DeiT-S graph,
   the static ATS graph at K = 197 and at a lower K, and the PyTorch reference (per image,
   dynamic shapes) at both K. The reference's latency depends on how many tokens the
   weights let through; its live counts on the benchmark input are recorded.

Writes benchmarks/results/ats.json and the table section of docs/ats.md.

Usage: python benchmarks/bench_ats.py [--rounds 30] [--threads 2] [--lower-k 99] [--fmnist-lower-k 25]
       [--accuracy-limit 10000] [--quick]
"""

from __future__ import annotations

import argparse
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
import torch  # noqa: E402

from bench_token_pruning import (  # noqa: E402
    eager_runner, interleaved, ort_runner, paired, quiet, run_environment, summary, write_doc_section,
)
from vitedge.artifact import write_json_atomic  # noqa: E402
from vitedge.backbone import ARCHS, block_flops, dense_flops, stem_head_flops  # noqa: E402
from vitedge.check import check_model  # noqa: E402
from vitedge.data import load_dataset  # noqa: E402
from vitedge.export import export_onnx  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.families.ats import MASKED  # noqa: E402
from vitedge.load import load_model  # noqa: E402
from vitedge.rewrite import to_static  # noqa: E402
from vitedge.validate import input_spec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ats.json"
DOC = ROOT / "docs" / "ats.md"
BEGIN, END = "<!-- ats-bench:begin -->", "<!-- ats-bench:end -->"
DENSE_FMNIST = ROOT / "models" / "fmnist-deit.safetensors"
ATS_FMNIST = ROOT / "models" / "fmnist-ats.safetensors"


def live_flops(cfg, prune_blocks: list[int], live: list[float]) -> float:
    """FLOPs with each ATS block's MLP on its mean live token count (attention on the previous one)."""
    counts = dict(zip(prune_blocks, live))
    tokens, total = cfg.num_patches + 1, stem_head_flops(cfg)
    for i in range(cfg.depth):
        after = counts.get(i, tokens)
        total += block_flops(cfg, round(tokens), round(after))
        tokens = after
    return total


def fmnist_accuracy(weights: Path, family: str, num_tokens: int | None, limit: int) -> dict:
    settings = {"num_tokens": num_tokens} if family == "ats" else {}
    loaded = load_model(weights, family=family, settings=settings)
    model = to_static(loaded.model, loaded.plan) if family == "ats" else loaded.model
    dataset = load_dataset("fashion-mnist", limit)
    spec = input_spec({"input": {"shape": [1, 1, 28, 28], "mean": loaded.mean, "std": loaded.std}})
    correct, seen, live = 0, 0, None
    with torch.inference_mode():
        for images, labels in dataset.batches(spec, 500):
            logits, kept = model.forward_tokens(torch.from_numpy(images))
            correct += int((logits.argmax(1).numpy() == labels).sum())
            seen += len(labels)
            counts = [float((k != MASKED).sum()) for k in kept]
            live = counts if live is None else [a + b for a, b in zip(live, counts)]
    cfg = loaded.cfg
    record = {"weights": weights.name, "family": family, "settings": loaded.settings, "images": seen,
              "accuracy": correct / seen, "flops_ratio_static": loaded.plan.flops(cfg) / dense_flops(cfg)}
    if family == "ats":
        mean_live = [1 + v / seen for v in live]  # + the class token
        record["mean_live_tokens"] = [round(v, 2) for v in mean_live]
        record["flops_ratio_live"] = live_flops(cfg, loaded.settings["prune_blocks"], mean_live) / dense_flops(cfg)
    return record


def accuracy_part(args) -> list[dict]:
    rows = [fmnist_accuracy(DENSE_FMNIST, "deit", None, args.accuracy_limit)]
    for k in (50, args.fmnist_lower_k):
        for weights in (DENSE_FMNIST, ATS_FMNIST):
            rows.append(fmnist_accuracy(weights, "ats", k, args.accuracy_limit))
            print(f"  fmnist {weights.name} K={k}: {rows[-1]['accuracy']:.4f}", flush=True)
    return rows


def latency_part(args, tmp: Path) -> dict:
    cfg = ARCHS["deit_small"]
    torch.manual_seed(0)
    images = torch.randn(1, 3, 224, 224).numpy()
    dense_family, ats = get_family("deit"), get_family("ats")
    graphs, references, records = {}, {}, {}
    dense = dense_family.reference(cfg, {}).eval()
    dense_plan = dense_family.token_plan(cfg, {})
    for k in (197, args.lower_k):
        settings = ats.resolve_settings(cfg, {"num_tokens": k})
        model = ats.reference(cfg, settings).eval()
        model.load_state_dict(dense.state_dict())
        plan = ats.token_plan(cfg, settings)
        path = tmp / f"ats{k}.onnx"
        started = time.perf_counter()
        with quiet():
            proto = export_onnx(to_static(model, plan), cfg, plan, path)
        check = check_model(proto)
        with torch.inference_mode():
            logits, kept = model.forward_tokens(torch.from_numpy(images))
        outputs = ort_runner(path, images, args.threads)()
        records[f"ats-K{k}"] = {
            "export_s": round(time.perf_counter() - started, 1), "check_passed": check.passed, "check_errors": check.errors,
            "flops_ratio_static": plan.flops(cfg) / dense_flops(cfg),
            "reference_live_tokens": [1 + int((row != MASKED).sum()) for row in kept],
            "max_abs_logit_diff_vs_reference": float(np.abs(outputs[0] - logits.numpy()).max()),
            "top1_agrees": bool(outputs[0].argmax() == int(logits.argmax())),
        }
        graphs[f"ort/ats-K{k}"] = path
        references[f"eager/ats-reference-K{k}"] = model
        print(f"  exported ATS K={k}: check {'passed' if check.passed else 'FAILED'}", flush=True)
    path = tmp / "dense.onnx"
    with quiet():
        export_onnx(to_static(dense, dense_plan), cfg, dense_plan, path)
    graphs = {"ort/dense": path, **graphs}
    torch.set_num_threads(args.threads)
    runners = {name: ort_runner(p, images, args.threads) for name, p in graphs.items()}
    runners.update({name: eager_runner(model, images) for name, model in references.items()})
    samples, cpu = interleaved(runners, args.rounds, args.warmup)
    stats = {name: summary(samples[name], cpu[name]) for name in runners}
    ratios = {name: paired(samples, name, "ort/dense") for name in runners if name != "ort/dense"}
    return {"arch": "deit_small", "batch": 1, "graphs": records, "latency": stats, "ratio_vs_ort_dense": ratios}


def environment(args) -> dict:
    return run_environment(args.threads, args.rounds, args.warmup, "python benchmarks/bench_ats.py " + " ".join(sys.argv[1:]))


def markdown(env: dict, accuracy: list[dict], latency: dict) -> str:
    lines = [BEGIN, "", f"Measured {env['date']} on {env['cpu']} ({env['threads']} threads, load average at start "
             f"{env['load_average_at_start'][0]}), `{env['command'].strip()}`.", "",
             "**Fashion-MNIST** (10-class, 50 tokens; static form, equal to the per-image reference):", "",
             "| model | weights | accuracy | static FLOPs / dense | live tokens per ATS block (mean, class token included) | live FLOPs / dense |",
             "|---|---|---|---|---|---|"]
    for row in accuracy:
        name = "dense DeiT" if row["family"] == "deit" else f"ATS K={row['settings']['num_tokens'][0]}"
        weights = "ATS fine-tuned" if row["weights"] == ATS_FMNIST.name else "dense"
        live = ", ".join(f"{v:.1f}" for v in row.get("mean_live_tokens", [])) or "50 (all)"
        lines.append(f"| {name} | {weights} | {row['accuracy'] * 100:.2f} % | {row['flops_ratio_static']:.3f} | {live} | "
                     f"{row.get('flops_ratio_live', 1.0):.3f} |")
    lines += ["", "**DeiT-S shapes** (224 px, batch 1, random weights; ONNX Runtime CPU, interleaved rounds):", "",
              "| variant | median ms | p10–p90 ms | ratio to ORT dense (per-round median) | static FLOPs / dense | check |",
              "|---|---|---|---|---|---|"]
    for name, stat in latency["latency"].items():
        key = name.split("/", 1)[1].replace("ats-reference-", "ats-")
        graph = latency["graphs"].get(key, {})
        ratio = latency["ratio_vs_ort_dense"].get(name, {"median": 1.0})["median"]
        flops = f"{graph['flops_ratio_static']:.3f}" if name.startswith("ort/ats") else ("1.000" if name == "ort/dense" else "—")
        check = ("passed" if graph.get("check_passed") else "**failed**") if name.startswith("ort/ats") else ("passed" if name == "ort/dense" else "no graph")
        lines.append(f"| {name} | {stat['median_ms']:.1f} | {stat['p10_ms']:.1f}–{stat['p90_ms']:.1f} | {ratio:.2f} | {flops} | {check} |")
    for key, graph in latency["graphs"].items():
        lines.append("")
        lines.append(f"Reference {key} on the benchmark input: live tokens per ATS block {graph['reference_live_tokens']}; "
                     f"ORT vs reference max |logit diff| {graph['max_abs_logit_diff_vs_reference']:.1e}, top-1 "
                     f"{'agrees' if graph['top1_agrees'] else 'differs'}.")
    lines += ["", END]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_doc_section(DOC, BEGIN, END, section + "\n", "# ATS\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lower-k", type=int, default=99, help="the lower DeiT-S budget (about half of 197)")
    parser.add_argument("--fmnist-lower-k", type=int, default=25, help="the lower Fashion-MNIST budget (half of 50)")
    parser.add_argument("--accuracy-limit", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="5 rounds, 1000 images: a smoke run, nothing written")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.accuracy_limit = 5, 1000
    torch.set_num_threads(1)
    env = environment(args)
    print("accuracy on Fashion-MNIST", flush=True)
    accuracy = accuracy_part(args)
    print("latency on DeiT-S shapes", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        latency = latency_part(args, Path(tmp))
    results = {"environment": env, "fashion_mnist": accuracy, "deit_small": latency}
    section = markdown(env, accuracy, latency)
    print(section)
    if not args.quick:
        write_json_atomic(RESULTS, results)
        write_doc(section)


if __name__ == "__main__":
    main()
