"""Evo-ViT on DeiT-Small shapes: vitedge's static graph against dense, PyTorch eager and the alternatives, in one run.

One process, one interleaved run per batch size (rounds time every variant once, the order
rotating; medians), so the ratios are measured under the same machine load. Variants:

  ort/dense            dense DeiT-S exported by vitedge (family "deit")
  ort/evovit           vitedge's static Evo-ViT: the sort as a constant TopK (K = 196), slow
                       tokens a prefix of the sorted tokens, the write-back a Concat (no scatter)
  ort/evovit-scatter   the other static form considered: TopK K = 98, gather the slow tokens,
                       write them (and their scores) back with ScatterElements (no reduction)
  ort/evovit-plain     plain ``torch.onnx.export(model, (x,), dynamo=True)`` of the reference, or,
                       where it does not export, of the official code's eval forward (in-place
                       writes, unstable sort), same weights; linted with vitedge.check
  eager/dense          the dense reference in PyTorch (SDPA attention)
  eager/evovit         the Evo-ViT reference in PyTorch (explicit attention: it needs the map)

Every latency ratio is printed beside its FLOPs ratio (the bound on a CPU that runs dense
DeiT-S at its sgemm limit) and beside accuracy: the Fashion-MNIST accuracy of the bundled
dense and Evo-ViT models (static ONNX, 10,000 test images, measured in the same run) and the
static-vs-reference agreement. DeiT-S timings use random weights (latency does not depend on
them), 224 px, 1000 classes, ``--threads`` threads for ONNX Runtime (spin-waiting off) and
PyTorch (OMP_WAIT_POLICY=PASSIVE). Writes benchmarks/results/evovit.json and the measured
section of docs/evovit.md.

Usage: python benchmarks/bench_evovit.py [--rounds N] [--quick] [--batches 1 8] [--threads 2] [--fmnist-limit N]
"""

from __future__ import annotations

import argparse
import json
import copy
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_token_pruning import (  # noqa: E402
    eager_runner,
    fidelity_on_input,
    interleaved,
    ort_runner,
    paired,
    plain_export,
    ratio_ci,
    run_environment,
    summary,
    vitedge_export,
    write_doc_section,
)

import vitedge  # noqa: E402
from vitedge.backbone import ARCHS, dense_flops  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.families.evovit import EvoViT, StaticEvoViT, ema, head_class_attention  # noqa: E402
from vitedge.tokens import gather_tokens, top_tokens  # noqa: E402

ARCH = "deit_small"
RESULTS = ROOT / "benchmarks" / "results" / "evovit.json"
DOC = ROOT / "docs" / "evovit.md"
BEGIN, END = "<!-- evovit-bench:begin -->", "<!-- evovit-bench:end -->"
FLOPS_SLACK = 1.05
DEFAULT_ROUNDS = 40


class ScatterWriteBackEvoViT(StaticEvoViT):
    """The alternative static form: TopK K = slow count, gather, ScatterElements write-back.

    Tokens stay at their original positions (no permutation), so the kept indices are the
    TopK indices themselves. Same function as the reference up to exact score ties.
    """

    def forward_features(self, images):
        x = self.embed(images)
        batch, _, channels = x.shape
        scores, full, kept = None, None, []
        ends = self.stage_ends()
        for i, block in enumerate(self.blocks):
            if i in self.split_blocks:
                slow = self.slow[self.split_blocks.index(i)]
                index = top_tokens(scores, slow)
                full, slow_scores = x, gather_tokens(scores, index)
                x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], index)], dim=1)
                kept.append(index)
            x, row = self.attention(i, x)
            if i == 0:
                scores = row
            elif full is None:
                scores = ema(scores, row, self.tradeoff[i])
            else:
                slow_scores = ema(slow_scores, row, self.tradeoff[i])
            x = block(x)
            if full is not None and i in ends:
                rows = torch.cat([torch.zeros_like(index[:, :1]), index + 1], dim=1)
                x = full.scatter(1, rows.unsqueeze(-1).expand(-1, -1, channels), x)
                scores = scores.scatter(1, index, slow_scores)
                full = None
        return x, kept


class OfficialStyleEvoViT(EvoViT):
    """The official eval forward as written (in-place writes into views, unstable sort), same weights."""

    def forward_features(self, images):
        x = self.embed(images)
        positions = torch.arange(x.shape[1] - 1).unsqueeze(0).expand(x.shape[0], -1)
        cls_attn, stage, kept, x_, n_keep = None, -1, [], None, 0
        ends = self.stage_ends()
        for i, block in enumerate(self.blocks):
            if i in self.split_blocks:
                stage += 1
                n_keep = int((x.shape[1] - 1) * self.keep_rates[stage])
                cls_attn, indices = torch.sort(cls_attn, dim=1, descending=True)
                positions = gather_tokens(positions, indices)
                x[:, 1:, :] = gather_tokens(x[:, 1:], indices)
                x_ = x
                x = x_[:, : n_keep + 1]
                kept.append(positions[:, :n_keep])
            h = self.norms[i](x)
            attn = self.qks[i](h)
            row = head_class_attention(attn)
            if i == 0:
                cls_attn = row
            elif x_ is None:
                cls_attn = (1 - self.tradeoff[i]) * cls_attn + self.tradeoff[i] * row
            else:
                cls_attn[:, :n_keep] = (1 - self.tradeoff[i]) * cls_attn[:, :n_keep] + self.tradeoff[i] * row
            x = x + self.projs[i]((attn @ self.vs[i](h)).transpose(1, 2).reshape(x.shape))
            x = block(x)
            if x_ is not None and i in ends:
                x_[:, : n_keep + 1] = x
                x = x_
        return x, kept


def fmnist_accuracy(limit: int | None) -> dict:
    """The bundled Fashion-MNIST models: static ONNX vs reference on the test set (vitedge.validate)."""
    rows = {}
    for family in ("deit", "evovit"):
        checkpoint = ROOT / "models" / f"fmnist-{family}.safetensors"
        if not checkpoint.is_file():
            rows[family] = {"missing": str(checkpoint.relative_to(ROOT))}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            vitedge.export(checkpoint, tmp, validate_data=None, dynamic_batch=True, log=lambda m: None)
            result = vitedge.validate(tmp, "fashion-mnist", limit, batch_size=250)
            meta = vitedge.Artifact(tmp).metadata
        rows[family] = {
            "checkpoint": str(checkpoint.relative_to(ROOT)),
            "settings": meta["settings"],
            "flops_ratio": meta["flops"]["ratio"],
            **{k: result[k] for k in ("images", "reference_accuracy", "exported_accuracy", "top1_agreement",
                                      "kept_agreement", "max_abs_logit_diff")},
        }
    return rows


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ARCHS[ARCH]
    evovit = get_family("evovit")
    settings = evovit.resolve_settings(cfg, {})
    plan = evovit.token_plan(cfg, settings)
    reference = evovit.reference(cfg, settings).eval()
    dense_model = get_family("deit").reference(cfg, {}).eval()
    dense_plan = get_family("deit").token_plan(cfg, {})
    flops_ratio = plan.flops(cfg) / dense_flops(cfg)
    results = {"settings": settings, "flops": {"dense_gflops": dense_flops(cfg) / 1e9, "evovit_gflops": plan.flops(cfg) / 1e9,
                                               "ratio": flops_ratio},
               "tokens_per_block": [b.attention for b in plan.blocks], "batches": {}}
    with tempfile.TemporaryDirectory(prefix="vitedge-evovit-") as tmp:
        tmp = Path(tmp)
        for batch in args.batches:
            images = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            print(f"batch {batch}: exporting", file=sys.stderr, flush=True)
            runners, exports, fidelity = {}, {}, {}
            for name, model, model_plan in (("dense", dense_model, dense_plan), ("evovit", reference, plan)):
                info = vitedge_export(model, cfg, model_plan, batch, tmp / f"{name}-b{batch}.onnx")
                runners[f"ort/{name}"] = ort_runner(info["path"], images, args.threads)
                fidelity[name] = fidelity_on_input(model, info.pop("static_model"), images, runners[f"ort/{name}"]())
                exports[name] = info
            scatter = ScatterWriteBackEvoViT(reference, plan).eval()
            info = vitedge_export(scatter, cfg, plan, batch, tmp / f"scatter-b{batch}.onnx")
            info.pop("static_model")
            runners["ort/evovit-scatter"] = ort_runner(info["path"], images, args.threads)
            fidelity["evovit-scatter"] = fidelity_on_input(reference, scatter, images, runners["ort/evovit-scatter"]())
            exports["evovit-scatter"] = info
            plain = plain_export(reference, batch, cfg, tmp / f"plain-b{batch}.onnx")
            plain["model"] = "vitedge reference model (family.reference), as returned"
            if not plain["exported"]:
                failed = plain
                official = copy.deepcopy(reference)
                official.__class__ = OfficialStyleEvoViT
                plain = plain_export(official.eval(), batch, cfg, tmp / f"official-b{batch}.onnx")
                plain["model"] = "the official eval forward as written (in-place writes, unstable sort), same weights"
                plain["reference_export"] = failed
                with torch.inference_mode():
                    probe = torch.from_numpy(images)
                    plain["max_abs_logit_diff_vs_reference"] = float((official(probe) - reference(probe)).abs().max())
            if plain["exported"]:
                runners["ort/evovit-plain"] = ort_runner(plain["path"], images, args.threads)
            dense_model.set_fused_attention(True)
            runners["eager/dense"] = eager_runner(dense_model, images)
            runners["eager/evovit"] = eager_runner(reference, images)
            print(f"batch {batch}: timing {len(runners)} variants x {args.rounds} rounds", file=sys.stderr, flush=True)
            load_before = os.getloadavg()
            samples, cpu = interleaved(runners, args.rounds, args.warmup)
            dense_model.set_fused_attention(False)
            stats = {name: summary(values, cpu[name]) for name, values in samples.items()}
            del runners
            results["batches"][str(batch)] = {
                "latency": stats,
                "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "exports": {k: {kk: (Path(vv).name if kk == "path" else vv) for kk, vv in v.items()} for k, v in exports.items()},
                "plain_export": {k: (Path(v).name if k == "path" else v) for k, v in plain.items()},
                "fidelity_on_benchmark_input": fidelity,
                "ratios": ratios(stats, samples, flops_ratio),
            }
    print("Fashion-MNIST accuracy of the bundled models", file=sys.stderr, flush=True)
    results["fmnist"] = fmnist_accuracy(args.fmnist_limit)
    return results


def ratios(stats: dict, samples: dict, flops_ratio: float) -> dict:
    dense = stats["ort/dense"]["median_ms"]
    out = {"flops_ratio": flops_ratio, "bound_ratio": FLOPS_SLACK * flops_ratio,
           "dense_speedup_vs_eager": stats["eager/dense"]["median_ms"] / dense}
    for name in ("evovit", "evovit-scatter", "evovit-plain"):
        key = f"ort/{name}"
        if key not in stats:
            continue
        out[name] = {
            "latency_ratio_vs_dense": stats[key]["median_ms"] / dense,
            "latency_ratio_vs_dense_ci95": ratio_ci(samples, key, "ort/dense"),
            "paired_latency_ratio_vs_dense": paired(samples, key, "ort/dense"),
            "cpu_time_ratio_vs_dense": stats[key]["cpu_median_ms"] / stats["ort/dense"]["cpu_median_ms"],
            "within_flops_bound": stats[key]["median_ms"] <= FLOPS_SLACK * flops_ratio * dense,
            "speedup_vs_eager_reference": stats["eager/evovit"]["median_ms"] / stats[key]["median_ms"],
        }
    out["evovit"]["eager_ratio_vs_dense_eager"] = stats["eager/evovit"]["median_ms"] / stats["eager/dense"]["median_ms"]
    if "ort/evovit-plain" in stats:
        out["evovit"]["speedup_vs_plain_export"] = stats["ort/evovit-plain"]["median_ms"] / stats["ort/evovit"]["median_ms"]
        out["evovit"]["speedup_vs_plain_export_ci95"] = [
            1.0 / v for v in reversed(ratio_ci(samples, "ort/evovit", "ort/evovit-plain"))
        ]
    return out


def environment(args) -> dict:
    command = ("python benchmarks/bench_evovit.py" + (" --quick" if args.quick else "")
               + (f" --rounds {args.rounds}" if not args.quick and args.rounds != DEFAULT_ROUNDS else "")
               + (f" --threads {args.threads}" if args.threads != 2 else ""))
    return run_environment(args.threads, args.rounds, args.warmup, command, arch=ARCH)


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def markdown(env: dict, results: dict) -> str:
    fm = results["fmnist"]
    acc = {k: (pct(v["exported_accuracy"]) if "exported_accuracy" in v else "not trained") for k, v in fm.items()}
    agree = fm.get("evovit", {}).get("top1_agreement")
    agree = pct(agree) if agree is not None else "—"
    lines = [
        BEGIN,
        "## Measured: DeiT-S shapes, ORT CPU, batch 1 and 8",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), {env['threads']} threads for ONNX Runtime "
        f"(spin-waiting off) and PyTorch (OMP_WAIT_POLICY={env['omp_wait_policy']}); load average "
        f"{env['load_average_at_start'][0]} at the start (other jobs shared the machine: compare ratios within a batch "
        f"size, not absolute times across runs); torch {env['torch']}, onnxruntime {env['onnxruntime']}. Random weights, "
        f"224 px, keep 0.5 at blocks 4 and 8 (197 → 99 tokens). One process; per batch size {env['warmup']} warm-up calls "
        f"per variant, then {env['rounds']} rounds timing every variant once in a rotating order; medians; "
        "brackets: 95 % bootstrap intervals.",
        "",
        f"Reproduce: `{env['command']}` (writes `benchmarks/results/evovit.json` and this section).",
        "",
        "Accuracy beside every speedup: the bundled Fashion-MNIST models (same architecture family, "
        "12 blocks, 49 patches, keep 0.5 at blocks 4 and 8; static ONNX on the "
        f"{fm.get('evovit', fm.get('deit', {})).get('images', '—')} test images, measured in this run): dense "
        f"{acc.get('deit')}, Evo-ViT {acc.get('evovit')}; Evo-ViT static ONNX vs its reference: top-1 agreement {agree}.",
        "",
        "| batch | graph | FLOPs vs dense | median (ms) | latency vs dense [95 % CI] | bound 1.05 x FLOPs | within bound | "
        "speedup vs PyTorch reference | Fashion-MNIST accuracy | static vs reference (this input) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, data in results["batches"].items():
        stats, r, fid = data["latency"], data["ratios"], data["fidelity_on_benchmark_input"]
        lines.append(
            f"| {batch} | ORT dense DeiT-S | 1.000 | {stats['ort/dense']['median_ms']:.1f} | 1.000 | — | — | "
            f"{r['dense_speedup_vs_eager']:.2f}x (vs eager dense) | {acc.get('deit')} | max |Δlogit| {fid['dense']['max_abs_logit_diff']:.1e} |"
        )
        for name, label in (("evovit", "ORT vitedge Evo-ViT (sort + concat)"), ("evovit-scatter", "ORT Evo-ViT, top-k + scatter write-back"),
                            ("evovit-plain", "ORT plain export")):
            if name not in r:
                continue
            row = r[name]
            ci = row["latency_ratio_vs_dense_ci95"]
            f = fid.get(name)
            fid_text = (f"max |Δlogit| {f['max_abs_logit_diff']:.1e}, kept sets {'same' if f['kept_sets_identical'] else '**differ**'}"
                        if f else f"max |Δlogit| {data['plain_export'].get('max_abs_logit_diff_vs_reference', 0.0):.1e}")
            lines.append(
                f"| {batch} | {label} | {r['flops_ratio']:.3f} | {stats[f'ort/{name}']['median_ms']:.1f} | "
                f"{row['latency_ratio_vs_dense']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {r['bound_ratio']:.3f} | "
                f"{'yes' if row['within_flops_bound'] else '**no**'} | {row['speedup_vs_eager_reference']:.2f}x | "
                f"{acc.get('evovit')} | {fid_text} |"
            )
        lines.append(
            f"| {batch} | PyTorch eager Evo-ViT reference | {r['flops_ratio']:.3f} | {stats['eager/evovit']['median_ms']:.1f} | "
            f"{r['evovit']['eager_ratio_vs_dense_eager']:.3f} (vs eager dense {stats['eager/dense']['median_ms']:.1f} ms) | — | — | 1.00x | "
            f"{acc.get('evovit')} | — |"
        )
    lines += ["", "Noise check (same run): paired per-round ratio vs dense (median [p25, p75]) and CPU-time ratio.", "",
              "| batch | graph | ratio of medians | paired ratio | CPU-time ratio | FLOPs ratio |", "|---|---|---|---|---|---|"]
    for batch, data in results["batches"].items():
        r = data["ratios"]
        for name in ("evovit", "evovit-scatter", "evovit-plain"):
            if name in r:
                p = r[name]["paired_latency_ratio_vs_dense"]
                lines.append(f"| {batch} | {name} | {r[name]['latency_ratio_vs_dense']:.3f} | {p['median']:.3f} "
                             f"[{p['p25']:.3f}, {p['p75']:.3f}] | {r[name]['cpu_time_ratio_vs_dense']:.3f} | {r['flops_ratio']:.3f} |")
    first = next(iter(results["batches"].values()))
    lines += ["", "Graphs (lint = `vitedge.check.check_model`, TensorRT rules):", ""]
    for name, e in first["exports"].items():
        ops = e["ops"]
        lines.append(f"- {name}: lint {'passes' if e['check_passed'] else 'fails: ' + '; '.join(e['check_errors'])}; "
                     f"TopK {ops.get('TopK', 0)}, Gather {ops.get('Gather', 0)}, ScatterElements {ops.get('ScatterElements', 0)}, "
                     f"ScatterND {ops.get('ScatterND', 0)}, Concat {ops.get('Concat', 0)}, {sum(ops.values())} nodes")
    plain = first["plain_export"]
    note = f"- plain export ({plain['model']}): "
    if "reference_export" in plain:
        note += f"the reference does not export (`{plain['reference_export']['error'][:160]}`); "
    if plain["exported"]:
        note += ("lint passes" if plain["check_passed"] else "lint fails: " + "; ".join(plain["check_errors"]))
        ops = plain["ops"]
        note += f"; TopK {ops.get('TopK', 0)}, ScatterND {ops.get('ScatterND', 0)}, ScatterElements {ops.get('ScatterElements', 0)}"
    else:
        note += f"export fails: {plain['error'][:200]}"
    lines += [note, END, ""]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_doc_section(DOC, BEGIN, END, section, "# Evo-ViT\n\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up, 512 Fashion-MNIST images")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fmnist-limit", type=int, default=None, help="first N test images (default: all 10,000)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.fmnist_limit = 3, 1, args.fmnist_limit or 512
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    env = environment(args)
    results = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"environment": env, **results}, indent=2, default=str) + "\n")
    section = markdown(env, results)
    write_doc(section)
    print(section)


if __name__ == "__main__":
    main()
