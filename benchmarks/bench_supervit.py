"""SuperViT variants on DeiT-Small shapes: every static (size, keep rate) graph against dense and the PyTorch reference.

One process, one interleaved run per batch size (1 and 8): after a warm-up, every round times
each model once (the order rotates and alternates direction) and each model's median is taken,
so the ratios printed are measured under the same machine load. Models, per batch size:

  ort/dense              dense DeiT-S exported by vitedge (family "deit", the 224 px table)
  ort/<size>px-keep<r>   vitedge's static graph of that variant (rewrite.to_static + export.export_onnx,
                         as export-bundle does); input 224 px, resized in the graph
  eager/<size>px-keep<r> the SuperViT reference model in PyTorch at that setting (eval, SDPA where
                         no attention map is needed, torch.inference_mode)

Random weights (latency does not depend on them), ImageNet-1k head, the official grid
128/160/192/224 px x keep 0.5/0.7/1. Each graph is exported once with a symbolic batch
dimension (token counts stay constants) and timed at batch 1 and 8. ONNX Runtime CPU with
``--threads`` intra-op threads and spin-waiting off; ``torch.set_num_threads(--threads)``,
OpenMP passive waiting (see bench_token_pruning.py).

Beside each speed ratio stands the accuracy of the same grid point of the trained Fashion-MNIST
SuperViT (models/fmnist-supervit.safetensors, 16/20/24/28 px stand for 128/160/192/224): the
benchmark exports its bundle (vitedge.export_bundle, all 10,000 test images) in the same run.

Writes benchmarks/results/supervit.json and the benchmark section of docs/supervit.md.

Usage: python benchmarks/bench_supervit.py [--rounds N] [--quick] [--batches 1 8] [--threads 2]
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_token_pruning import interleaved, quiet, run_environment, summary, write_doc_section  # noqa: E402

import vitedge  # noqa: E402
from vitedge.backbone import ARCHS, VisionTransformer, dense_flops  # noqa: E402
from vitedge.bundle import variant_name  # noqa: E402
from vitedge.check import check_model  # noqa: E402
from vitedge.export import export_onnx  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.families.deit import DeiT  # noqa: E402
from vitedge.rewrite import to_static  # noqa: E402
from vitedge.runtime import ort_session  # noqa: E402

ARCH = "deit_small"
FMNIST_MODEL = ROOT / "models" / "fmnist-supervit.safetensors"
RESULTS = ROOT / "benchmarks" / "results" / "supervit.json"
DOC = ROOT / "docs" / "supervit.md"
BEGIN, END = "<!-- supervit-bench:begin -->", "<!-- supervit-bench:end -->"
DEFAULT_ROUNDS = 20
FLOPS_SLACK = 1.05  # the bound beside each measured ratio: 1.05 x the FLOP ratio


def build_models(tmp: Path, arch: str) -> tuple[dict, dict]:
    """Every variant (reference, static graph) and the dense graph, sharing one set of random weights."""
    cfg = ARCHS[arch]
    family = get_family("supervit")
    torch.manual_seed(0)
    base = family.resolve_settings(cfg, {})
    state = family.reference(cfg, base).state_dict()
    variants = {}
    for size in base["resolutions"]:
        for rate in base["keep_rates"]:
            settings = family.resolve_settings(cfg, {"resolution": size, "keep_rate": rate})
            model = family.reference(cfg, settings)
            model.load_state_dict(state)
            model.eval().set_fused_attention(True)
            plan = family.token_plan(cfg, settings)
            name = variant_name(family, settings)
            path = tmp / f"{name}.onnx"
            started = time.perf_counter()
            with quiet():
                proto = export_onnx(to_static(model, plan), cfg, plan, path, dynamic_batch=True)
            check = check_model(proto)
            print(f"exported {name} in {time.perf_counter() - started:.0f}s, check {'passed' if check.passed else 'FAILED'}",
                  flush=True)
            variants[name] = {"reference": model, "path": path, "resolution": size, "keep_rate": rate,
                              "flops_ratio": plan.flops(cfg) / dense_flops(cfg), "check_passed": check.passed,
                              "topk_k": check.topk_k,
                              "tokens_after_selections": [s["tokens_after"] for s in plan.selections]}
    dense_state = {k: v for k, v in state.items() if not k.startswith("pos_embed_list.")}
    dense_state["pos_embed"] = state[f"pos_embed_list.{base['resolutions'].index(cfg.img_size)}"]
    dense = VisionTransformer(cfg)
    dense.load_state_dict(dense_state)
    dense_path = tmp / "dense.onnx"
    plan = DeiT().token_plan(cfg, {})
    with quiet():
        check = check_model(export_onnx(to_static(dense.eval(), plan), cfg, plan, dense_path, dynamic_batch=True))
    return variants, {"path": dense_path, "check_passed": check.passed}


def fidelity(variants: dict, images: np.ndarray, threads: int) -> dict:
    """Static graph vs reference on the benchmark input (random weights: a smoke check; validation is the FMNIST bundle)."""
    out = {}
    for name, v in variants.items():
        onnx_logits = ort_session(v["path"], threads).run(None, {"images": images})[0]
        with torch.inference_mode():
            ref = v["reference"](torch.from_numpy(images)).numpy()
        out[name] = {"max_abs_logit_diff": float(np.abs(onnx_logits - ref).max()),
                     "top1_agreement": float((onnx_logits.argmax(1) == ref.argmax(1)).mean())}
    return out


def time_batch(variants: dict, dense: dict, batch: int, rounds: int, warmup: int, threads: int, arch: str) -> dict:
    cfg = ARCHS[arch]
    rng = np.random.default_rng(batch)
    images = rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size), dtype=np.float32)
    x = torch.from_numpy(images)
    runners = {}
    for name, path in [("dense", dense["path"])] + [(n, v["path"]) for n, v in variants.items()]:
        session = ort_session(path, threads)
        runners[f"ort/{name}"] = (lambda s: (lambda: s.run(None, {"images": images})))(session)
    for name, v in variants.items():
        runners[f"eager/{name}"] = (lambda m: (lambda: _eager(m, x)))(v["reference"])
    samples, cpu = interleaved(runners, rounds, warmup)
    stats = {name: summary(samples[name], cpu[name]) for name in runners}
    dense_ms = stats["ort/dense"]["median_ms"]
    rows = []
    for name, v in variants.items():
        ort_ms, eager_ms = stats[f"ort/{name}"]["median_ms"], stats[f"eager/{name}"]["median_ms"]
        rows.append({
            "variant": name, "resolution": v["resolution"], "keep_rate": v["keep_rate"],
            "flops_ratio": v["flops_ratio"], "bound": FLOPS_SLACK * v["flops_ratio"],
            "ort_ms": ort_ms, "latency_vs_dense": ort_ms / dense_ms,
            "within_bound": ort_ms / dense_ms <= FLOPS_SLACK * v["flops_ratio"],
            "eager_ms": eager_ms, "speedup_vs_eager": eager_ms / ort_ms,
        })
    return {"batch": batch, "dense_ort_ms": dense_ms, "rows": rows, "stats": stats, "fidelity": fidelity(variants, images, threads)}


def _eager(model, x):
    with torch.inference_mode():
        return model(x)


def fmnist_accuracy(tmp: Path, threads: int) -> dict | None:
    """The trained Fashion-MNIST SuperViT as a bundle (all 10,000 test images per variant)."""
    if not FMNIST_MODEL.is_file():
        print(f"{FMNIST_MODEL} missing: no accuracy column", flush=True)
        return None
    bundle = vitedge.export_bundle(FMNIST_MODEL, tmp / "fmnist-bundle", validate_limit=None, threads=threads,
                                   iterations=50, log=lambda m: print(m, flush=True) if not m.startswith("   ") else None)
    device = bundle["devices"][0]
    return {
        v["name"]: {"accuracy": v["accuracy"], "reference_accuracy": v["validation"]["reference_accuracy"],
                    "top1_agreement": v["validation"]["top1_agreement"],
                    "max_abs_logit_diff": v["validation"]["max_abs_logit_diff"], "images": v["validation"]["images"],
                    "flops_ratio": v["flops"]["ratio"], "p50_ms": v["latency_ms"][device]["p50_ms"]}
        for v in bundle["variants"]
    }


FMNIST_SIZE = {128: 16, 160: 20, 192: 24, 224: 28}


def markdown(env: dict, results: dict) -> str:
    fm = results.get("fmnist") or {}
    lines = [
        BEGIN,
        "## Benchmark: DeiT-S variants (ORT CPU) with the Fashion-MNIST accuracy of each grid point",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), {env['threads']} threads for ONNX Runtime "
        f"(spin-waiting off) and PyTorch (OMP_WAIT_POLICY={env['omp_wait_policy']}); load average "
        f"{env['load_average_at_start'][0]} at the start; torch {env['torch']}, onnxruntime {env['onnxruntime']}. "
        f"Random weights, 224 px input (every variant resizes in its graph), 1000 classes. One process; per batch size "
        f"{env['warmup']} warm-up calls per model, then {env['rounds']} rounds timing every model once in a rotating "
        "order; medians. Compare ratios within a batch size, not absolute times across runs.",
        "",
        f"Reproduce: `{env['command']}` (writes `benchmarks/results/supervit.json` and this section).",
        "",
        "FMNIST columns: the same grid point of `models/fmnist-supervit.safetensors` (16/20/24/28 px for "
        "128/160/192/224): accuracy of its exported graph on all 10,000 Fashion-MNIST test images, and how the graph "
        "compares with its PyTorch reference there (top-1 agreement, max |logit diff|; a top-1 difference with every "
        "logit within 1e-4 is a near-tie of the reference's two best classes).",
        "",
        "| batch | variant | tokens after blocks 3/6/9 | FLOPs vs dense | bound 1.05 x FLOPs | ORT (ms) | latency vs dense | "
        "PyTorch reference (ms) | speedup vs reference | FMNIST accuracy | FMNIST top-1 agreement | FMNIST max abs logit diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results["batches"]:
        lines.append(f"| {result['batch']} | dense | {results['dense_tokens']} | 1.000 | — | {result['dense_ort_ms']:.1f} | 1.000 | "
                     "— | — | — | — | — |")
        for row in result["rows"]:
            tokens = results["variants"][row["variant"]]["tokens_after_selections"]
            fm_name = variant_name(get_family("supervit"), {"resolution": FMNIST_SIZE.get(row["resolution"], row["resolution"]),
                                                            "keep_rate": row["keep_rate"]})
            acc = fm.get(fm_name)
            lines.append(
                f"| {result['batch']} | {row['variant']} | {'/'.join(map(str, tokens)) or '—'} | {row['flops_ratio']:.3f} | "
                f"{row['bound']:.3f} | {row['ort_ms']:.1f} | {row['latency_vs_dense']:.3f}"
                f"{'' if row['within_bound'] else ' (over)'} | {row['eager_ms']:.1f} | {row['speedup_vs_eager']:.2f}x | "
                + (f"{100 * acc['accuracy']:.2f} % ({fm_name}) | {100 * acc['top1_agreement']:.2f} % | "
                   f"{acc['max_abs_logit_diff']:.1e} |" if acc else "— | — | — |")
            )
    lines += ["", END, ""]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_doc_section(DOC, BEGIN, END, section, "# SuperViT\n\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 warm-up call")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fmnist", action="store_true", help="skip the Fashion-MNIST bundle (accuracy column)")
    parser.add_argument("--arch", default=ARCH, help="backbone shapes (default %(default)s; vit_fmnist for a smoke run)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section from the recorded JSON")
    args = parser.parse_args(argv)
    if args.render_only:
        recorded = json.loads(RESULTS.read_text())
        write_doc(markdown(recorded.pop("environment"), recorded))
        return
    if args.quick:
        args.rounds, args.warmup = 2, 1
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_supervit.py" + (" --quick" if args.quick else
                                                       f" --rounds {args.rounds}" if args.rounds != DEFAULT_ROUNDS else "")
    env = run_environment(args.threads, args.rounds, args.warmup, command, arch=args.arch)
    with tempfile.TemporaryDirectory(prefix="vitedge-bench-supervit-") as tmp:
        tmp = Path(tmp)
        fmnist = None if args.no_fmnist else fmnist_accuracy(tmp, args.threads)
        variants, dense = build_models(tmp, args.arch)
        batches = [time_batch(variants, dense, b, args.rounds, args.warmup, args.threads, args.arch) for b in args.batches]
    results = {
        "variants": {n: {k: v[k] for k in ("resolution", "keep_rate", "flops_ratio", "check_passed", "topk_k",
                                            "tokens_after_selections")} for n, v in variants.items()},
        "dense_check_passed": dense["check_passed"],
        "dense_tokens": ARCHS[args.arch].num_patches + 1,
        "batches": batches,
        "fmnist": fmnist,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    if args.arch != ARCH:  # a smoke run: print, keep the recorded results
        print(markdown(env, results))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"environment": env, **results}, indent=2, default=str) + "\n")
    section = markdown(env, results)
    write_doc(section)
    print(section)


if __name__ == "__main__":
    main()
