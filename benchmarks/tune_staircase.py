"""Snapped budgets on the bundled Fashion-MNIST models: more tokens for the same latency?

Per family (EViT, DynamicViT, A-ViT by default): ``vitedge.tune(..., snap_budgets=True)`` over the
family's grid (A-ViT calibrated on the default calibration set, accuracy on test images), which
measures the latency staircase of the model's blocks and adds each candidate's snapped form
beside it. Then every (original, snapped) pair is exported again and timed in one interleaved
run (benchmarks/bench_token_pruning.py's harness): the snapped graph's latency over the
original's with a 95 % bootstrap interval, next to the tokens and the accuracy each kept.
"Within noise" means the interval reaches down to 1 or below (not measurably slower).

Writes benchmarks/results/tune_staircase.json, a section per family in docs/tune.md and
docs/tune_staircase_<family>.png (``--quick``: benchmarks/results/tune_staircase_quick.json
only, two candidates per family, few images and rounds).

Usage: python benchmarks/tune_staircase.py [--quick] [--families evit dynamicvit avit] [--batch 16]
       [--limit 2000] [--rounds 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tune_fmnist.py
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

import vitedge  # noqa: E402
from bench_token_pruning import interleaved, ort_runner, ratio_ci, write_doc_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tune_staircase.json"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "tune_staircase_quick.json"
DOC = ROOT / "docs" / "tune.md"
QUICK_GRID = {"evit": [{"keep_rate": 0.7}, {"keep_rate": 0.5}], "dynamicvit": [{"keep_rate": 0.7}, {"keep_rate": 0.5}],
              "avit": [{"budget_quantile": 0.99}, {"budget_quantile": 0.95}]}


def quiet(_message: str) -> None:
    """Per-candidate logs are noise here."""


def _key(settings: dict) -> str:
    """A candidate's identity in tune.json: its full settings (labels come from the family's schema)."""
    return json.dumps(settings, sort_keys=True, default=str)


def pairs(summary: dict) -> list[tuple[dict, dict, dict]]:
    """(original, snapped, move) for every candidate that snapping moved and that both validated."""
    measured = {_key(c["settings"]): c for c in summary["candidates"] if c["error"] is None}
    out = []
    for move in summary["snapping"]["moves"]:
        if not move or move["tokens_after"] == move["tokens_before"]:
            continue
        original, snapped = measured.get(_key(move["original"])), measured.get(_key(move["settings"]))
        if original and snapped:
            out.append((original, snapped, move))
    return out


def run_family(family: str, args, tmp: Path) -> dict:
    checkpoint = ROOT / "models" / f"fmnist-{family}.safetensors"
    outdir = tmp / family
    print(f"{family}: tune --snap-budgets", file=sys.stderr, flush=True)
    summary = vitedge.tune(checkpoint, outdir, 1e6, candidates=QUICK_GRID[family] if args.quick else None,
                           limit=args.limit, batch=args.batch, iterations=args.iterations, threads=args.threads,
                           log=quiet, snap_budgets=True)
    found = pairs(summary)
    runners, rows = {}, []
    images = np.random.default_rng(0).standard_normal((args.batch, 1, 28, 28), dtype=np.float32)
    for i, (original, snapped, move) in enumerate(found):
        for kind, candidate in (("original", original), ("snapped", snapped)):
            folder = tmp / f"{family}-{i}-{kind}"
            vitedge.export(checkpoint, folder, settings=candidate["settings"], batch_size=args.batch,
                           validate_data=None, log=quiet)
            runners[f"{i}/{kind}"] = ort_runner(folder / "model.onnx", images, args.threads)
        rows.append({"original": original["label"], "snapped": snapped["label"],
                     "tokens_before": move["tokens_before"], "tokens_after": move["tokens_after"],
                     "accuracy_before": original["accuracy"], "accuracy_after": snapped["accuracy"],
                     "flops_before": original["flops_ratio"], "flops_after": snapped["flops_ratio"]})
    if runners:
        print(f"{family}: timing {len(rows)} pair(s) x {args.rounds} rounds", file=sys.stderr, flush=True)
        samples, _ = interleaved(runners, args.rounds, args.warmup)
        for i, row in enumerate(rows):
            a, b = f"{i}/snapped", f"{i}/original"
            row["latency_ratio"] = float(np.median(samples[a]) / np.median(samples[b]))
            row["latency_ratio_ci95"] = ratio_ci(samples, a, b)
            row["within_noise"] = row["latency_ratio_ci95"][0] <= 1.0
    plot = outdir / "staircase.png"
    if not args.quick and plot.is_file():
        shutil.copy(plot, ROOT / "docs" / f"tune_staircase_{family}.png")
    return {"date": datetime.date.today().isoformat(), "load_average": os.getloadavg()[0], "batch": args.batch,
            "threads": args.threads, "rounds": args.rounds, "staircase": summary["snapping"]["staircase"],
            "pairs": rows}


def section(family: str, run: dict) -> str:
    stair = run["staircase"]
    lines = [f"<!-- tune-staircase:{family}:begin -->", f"### Snapped budgets: {family}", "",
             f"Measured {run['date']} (load average {run['load_average']:.2f}), ORT CPU, batch {run['batch']}, "
             f"{run['threads']} threads. Staircase: {stair['blocks']} blocks at {len(stair['counts'])} token counts, "
             f"{stair['rounds']} rounds, noise {stair['noise_ms']:.4f} ms. Pairs timed in one interleaved run of "
             f"{run['rounds']} rounds; latency = snapped / original with its 95 % interval.", "",
             "| original | tokens per step | accuracy | snapped tokens | accuracy | latency snapped / original [95 % CI] | within noise |",
             "|---|---|---|---|---|---|---|"]
    for row in run["pairs"]:
        ci = row.get("latency_ratio_ci95", [float("nan")] * 2)
        lines.append(f"| {row['original']} | {','.join(map(str, row['tokens_before']))} | {row['accuracy_before']:.4f} | "
                     f"{','.join(map(str, row['tokens_after']))} | {row['accuracy_after']:.4f} | "
                     f"{row.get('latency_ratio', float('nan')):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                     f"{'yes' if row.get('within_noise') else '**no**'} |")
    if not run["pairs"]:
        lines.append("| (no candidate moved: the curve was too noisy or every budget already sat at a step's top) | | | | | | |")
    lines += ["", f"![{family} staircase](tune_staircase_{family}.png)", f"<!-- tune-staircase:{family}:end -->", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["evit", "dynamicvit", "avit"], choices=sorted(QUICK_GRID))
    parser.add_argument("--batch", type=int, default=16, help="the tiny model is overhead-bound at batch 1")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two candidates per family, 200 images, 5 rounds; JSON only")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.rounds, args.warmup, args.iterations = 200, 5, 1, 10
    target = QUICK_RESULTS if args.quick else RESULTS
    results = json.loads(target.read_text()) if target.exists() and not args.quick else {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="vitedge-stairs-") as tmp:
        for family in args.families:
            run = run_family(family, args, Path(tmp))
            results["runs"][family] = run
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(results, indent=2) + "\n")
            text = section(family, run)
            if not args.quick:
                write_doc_section(DOC, f"<!-- tune-staircase:{family}:begin -->", f"<!-- tune-staircase:{family}:end -->",
                                  text, "# Budget search: `vitedge tune`\n")
            print(text)


if __name__ == "__main__":
    main()
