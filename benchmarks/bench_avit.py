"""A-ViT: masked vs fixed-budget static graphs vs dense vs the PyTorch reference, with fidelity beside speed.

Two parts, one process:

1. Fidelity on Fashion-MNIST (the trained models/fmnist-avit.safetensors, all 10k test images):
   the masked and the fixed-budget graph (budgets from calibration/fmnist-avit-budgets.json,
   calibrated on train images) are exported and validated against the reference model:
   top-1 agreement, logit error, how often each block's budget was exceeded, accuracy, and
   the reference's halting (mean blocks per patch token, live patches per block).
2. Speed on DeiT-S shapes (224 px, 197 tokens, random weights, official small gates 10 / 75):
   random weights do not halt realistically, so the DeiT-S budgets are the Fashion-MNIST
   model's calibrated per-block live fractions (the 0.99 quantile of live patches / 49)
   scaled to 196 patches, plus the class token, rounded up to a multiple of 8. One
   interleaved run (warm-up, rotating order, medians), ONNX Runtime CPU with ``--threads``
   threads and spin-waiting off, PyTorch eager (SDPA with the halting mask) on as many threads.

Writes benchmarks/results/avit.json and the table between the markers in docs/avit.md.

Usage: python benchmarks/bench_avit.py [--rounds N] [--threads 2] [--fmnist-limit N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_token_pruning: no spinning OpenMP pool on 2 cores

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_token_pruning import (  # noqa: E402
    cpu_model, eager_runner, interleaved, ort_runner, paired, ratio_ci, summary, write_doc_section,
)

import vitedge  # noqa: E402
from vitedge.artifact import write_json_atomic  # noqa: E402
from vitedge.backbone import ARCHS, dense_flops  # noqa: E402
from vitedge.calibrate import read_calibration, with_settings  # noqa: E402
from vitedge.families.avit import round_budget  # noqa: E402
from vitedge.load import load_model, read_checkpoint  # noqa: E402
from vitedge.pipeline import tool_versions  # noqa: E402

MODEL = ROOT / "models" / "fmnist-avit.safetensors"
DENSE_MODEL = ROOT / "models" / "fmnist-deit.safetensors"
BUDGETS = ROOT / "calibration" / "fmnist-avit-budgets.json"
RESULTS = ROOT / "benchmarks" / "results" / "avit.json"
DOC = ROOT / "docs" / "avit.md"
BEGIN, END = "<!-- avit-bench:begin -->", "<!-- avit-bench:end -->"
GOAL_SPEEDUP, GOAL_AGREEMENT = 1.4, 0.995


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fidelity(workdir: Path, limit: int | None) -> dict:
    """Export + validate the trained model's masked and fixed-budget graphs on Fashion-MNIST test images."""
    out = {}
    for name, budgets in (("masked", None), ("fixed_budget", BUDGETS)):
        report = vitedge.export(MODEL, workdir / f"fmnist-{name}", calibration=budgets, validate_limit=limit,
                                log=lambda m: None)
        v = report["validate"]
        out[name] = {k: v[k] for k in ("images", "top1_agreement", "max_abs_logit_diff", "kept_agreement",
                                       "reference_accuracy", "exported_accuracy", "halting") if k in v}
        out[name]["budget_exceeded"] = v.get("budget_exceeded", {})
        meta = json.loads((workdir / f"fmnist-{name}" / "vitedge.json").read_text())
        out[name]["token_budgets"] = [b["attention"] for b in meta["token_budgets"]["tokens_per_block"]]
        out[name]["flops_ratio"] = meta["flops"]["ratio"]
        log(f"fmnist {name}: top-1 agreement {v['top1_agreement']:.4f}, accuracy {v.get('exported_accuracy')}")
    out["dense_accuracy"] = read_checkpoint(DENSE_MODEL).metadata.get("test_accuracy")
    return out


def deit_small_budgets(calibration: dict) -> tuple[list[int], list[float]]:
    """The Fashion-MNIST model's per-block live fractions (0.99 quantile) scaled to DeiT-S's 196 patches."""
    patches = calibration["arch"]["img_size"] // calibration["arch"]["patch_size"]
    patches = patches * patches
    fractions = [count / patches for count in calibration["halting"]["active_patches_p99"]]
    budgets, previous = [], 197
    for fraction in fractions:
        previous = min(previous, round_budget(1 + math.ceil(fraction * 196), 197))
        budgets.append(previous)
    return budgets, fractions


def speed(workdir: Path, budgets: list[int], rounds: int, threads: int) -> dict:
    cfg = ARCHS["deit_small"]
    torch.manual_seed(0)
    checkpoint = workdir / "avit_small_random.pth"
    state = vitedge.get_family("avit").reference(cfg, {"gate_scale": 10.0, "gate_center": 75.0, "token_budgets": None}).state_dict()
    torch.save({"model": state}, checkpoint)
    variants = {
        "dense": {"family": "deit", "settings": {}},
        "avit_masked": {"family": "avit", "settings": {"gate_scale": 10.0, "gate_center": 75.0}},
        "avit_fixed_budget": {"family": "avit", "settings": {"gate_scale": 10.0, "gate_center": 75.0, "token_budgets": budgets}},
    }
    paths, records = {}, {}
    for name, spec in variants.items():
        outdir = workdir / f"deit_small-{name}"
        started = time.perf_counter()
        report = vitedge.export(checkpoint, outdir, family=spec["family"], settings=spec["settings"],
                                validate_data=None, log=lambda m: None)
        meta = json.loads((outdir / "vitedge.json").read_text())
        paths[name] = outdir / "model.onnx"
        records[name] = {"export_s": round(time.perf_counter() - started, 1), "check_passed": report["check"]["passed"],
                         "topk_k": report["check"].get("topk_k"), "flops_ratio": meta["flops"]["ratio"]}
        log(f"exported DeiT-S {name}: check {report['check']['passed']}, FLOPs ratio {meta['flops']['ratio']:.3f}")
    reference = load_model(checkpoint, family="avit", settings=variants["avit_masked"]["settings"]).model
    images = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    runners = {name: ort_runner(path, images, threads) for name, path in paths.items()}
    torch.set_num_threads(threads)
    runners["pytorch_reference"] = eager_runner(reference, images)
    log(f"timing {len(runners)} variants, {rounds} interleaved rounds")
    samples, cpu = interleaved(runners, rounds, warmup=3)
    timings = {name: summary(samples[name], cpu[name]) for name in runners}
    base = "avit_masked"
    ratios = {name: {"median_ratio": timings[base]["median_ms"] / timings[name]["median_ms"],
                     "ci95": [1 / hi for hi in ratio_ci(samples, name, base)[::-1]] if name != base else [1.0, 1.0],
                     "paired_median": 1 / paired(samples, name, base)["median"] if name != base else 1.0}
              for name in runners}
    # smoke check of the masked graph on this input (random weights: exact form)
    masked_logits = runners["avit_masked"]()[0]
    with torch.inference_mode():
        ref_logits = reference(torch.from_numpy(images)).numpy()
    return {"arch": "deit_small", "budgets": budgets, "flops": {"dense": dense_flops(cfg)}, "exports": records,
            "timings_ms": timings, "speedup_vs_masked": ratios,
            "masked_vs_reference_max_abs_logit_diff": float(np.abs(masked_logits - ref_logits).max())}


def table(result: dict) -> str:
    s, f = result["speed"], result["fidelity"]
    rows = ["| variant (DeiT-S, batch 1, ORT CPU) | tokens per block | FLOPs / dense | median ms | speed-up vs masked (95 % CI) |",
            "|---|---|---|---|---|"]
    tokens = {"dense": "197 x 12", "avit_masked": "197 x 12 (masked)",
              "avit_fixed_budget": " ".join(map(str, s["budgets"])), "pytorch_reference": "197 x 12 (masked, eager)"}
    for name in ("avit_masked", "avit_fixed_budget", "dense", "pytorch_reference"):
        t, r = s["timings_ms"][name], s["speedup_vs_masked"][name]
        flops = s["exports"].get(name, {}).get("flops_ratio", 1.0)
        rows.append(f"| {name} | {tokens[name]} | {flops:.3f} | {t['median_ms']:.1f} | {r['median_ratio']:.2f}x "
                    f"({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}) |")
    rows += ["", "| Fashion-MNIST test set (trained fmnist-avit) | budgets | FLOPs / dense | top-1 agreement | max abs logit diff | accuracy | budget exceeded (max over blocks) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("masked", "fixed_budget"):
        v = f[name]
        exceeded = max(v["budget_exceeded"].values()) if v["budget_exceeded"] else 0.0
        rows.append(f"| {name} | {' '.join(map(str, v['token_budgets']))} | {v['flops_ratio']:.3f} | {v['top1_agreement']:.4f} | "
                    f"{v['max_abs_logit_diff']:.2e} | {v['exported_accuracy']:.4f} | {exceeded:.4f} |")
    halting = f["masked"]["halting"]
    rows += ["", f"Reference halting on the test set: mean depth {halting['mean_depth']:.2f} of 12 blocks per patch token; "
             "live patches per block " + " ".join(f"{v:.1f}" for v in halting["active_patches_mean"]) +
             f". Dense model accuracy {f['dense_accuracy']}."]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fmnist-limit", type=int, default=None, help="test images for the fidelity part (default: all 10k)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    calibration = json.loads(BUDGETS.read_text())
    loaded = load_model(MODEL)
    read_calibration(BUDGETS, loaded)  # the committed budgets belong to the committed model
    with tempfile.TemporaryDirectory(prefix="bench-avit-") as tmp:
        workdir = Path(tmp)
        log("part 1: fidelity on Fashion-MNIST")
        fid = fidelity(workdir, args.fmnist_limit)
        budgets, fractions = deit_small_budgets(calibration)
        log(f"part 2: speed on DeiT-S shapes, budgets {budgets}")
        spd = speed(workdir, budgets, args.rounds, args.threads)
    spd["budget_source"] = {"file": str(BUDGETS.relative_to(ROOT)), "live_fraction_p99_per_block": [round(x, 4) for x in fractions],
                            "rule": "1 + ceil(fraction x 196), rounded up to a multiple of 8, never growing"}
    fmnist_flops = with_settings(loaded, {"token_budgets": calibration["token_budgets"]}).plan.flops(loaded.cfg) / dense_flops(loaded.cfg)
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "threads": args.threads, "load_average": os.getloadavg()},
        "tools": tool_versions(),
        "fidelity": {**fid, "fmnist_budget_flops_ratio": fmnist_flops},
        "speed": spd,
        "goals": {"fixed_budget_speedup_vs_masked": GOAL_SPEEDUP, "fixed_budget_top1_agreement": GOAL_AGREEMENT,
                  "met_speedup": spd["speedup_vs_masked"]["avit_fixed_budget"]["median_ratio"] >= GOAL_SPEEDUP,
                  "met_agreement": fid["fixed_budget"]["top1_agreement"] >= GOAL_AGREEMENT},
    }
    write_json_atomic(RESULTS, json.loads(json.dumps(result, default=str)))
    write_doc_section(DOC, BEGIN, END, f"{BEGIN}\n{table(result)}\n{END}\n", "# A-ViT\n")
    print(table(result))


if __name__ == "__main__":
    main()
