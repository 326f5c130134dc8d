"""Snapped budgets on the bundled Fashion-MNIST models: more tokens for the same latency?

Per family (EViT, DynamicViT, A-ViT by default; ``--families avit`` runs one alone):
``vitedge.tune(..., snap_budgets=True)`` over the family's grid (A-ViT: its budget quantiles
without the masked graph, calibrated on the default calibration set; accuracy on test images),
which measures the latency staircase of the model's blocks and adds each candidate's snapped
form beside it; every candidate is timed in the ORT form that runs (``graph="auto"``: model.ort.onnx
where ``vitedge optimize`` passed and paid). tune then times each snapped graph against its
original in one interleaved run and reverts the snap where it is measurably slower ("tune's
check"). Then every (original, snapped) pair tune kept is timed again, all pairs in one
interleaved run (benchmarks/bench_token_pruning.py's harness), as an independent confirmation: the
snapped graph's latency over the original's with a 95 % bootstrap interval, next to the tokens and
the accuracy each kept. "Within noise" means the interval reaches down to 1 or below (not
measurably slower). Progress lines carry the seconds since start; each section says what a
reduced run left out and how long the family took.

Writes benchmarks/results/tune_staircase.json, a section per family in docs/tune.md and
docs/tune_staircase_<family>.png (``--quick``: benchmarks/results/tune_staircase_quick.json
only, two candidates per family, few images and rounds).

Usage: python benchmarks/tune_staircase.py [--quick] [--families evit dynamicvit avit] [--batch 16]
       [--limit 2000] [--rounds 40] [--staircase-rounds 20] [--threads 2] [--graph auto]
       [--avit-quantiles 1,0.99,0.98,0.95,0.93]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tune_fmnist.py
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

import vitedge  # noqa: E402
from bench_token_pruning import interleaved, ort_runner, ratio_ci, write_doc_section  # noqa: E402
from vitedge.artifact import GRAPHS, Artifact  # noqa: E402
from vitedge.families.avit import TUNING_QUANTILES  # noqa: E402
from vitedge.staircase import DEFAULT_ROUNDS, snap_pairs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tune_staircase.json"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "tune_staircase_quick.json"
DOC = ROOT / "docs" / "tune.md"
QUICK_GRID = {"evit": [{"keep_rate": 0.7}, {"keep_rate": 0.5}], "dynamicvit": [{"keep_rate": 0.7}, {"keep_rate": 0.5}],
              "avit": [{"budget_quantile": 0.99}, {"budget_quantile": 0.95}]}
# A-ViT's own grid is the masked graph (no budget: nothing to snap) and its quantiles; the masked
# graph is left out (--avit-quantiles changes the quantiles).
AVIT_QUANTILES = TUNING_QUANTILES


STARTED = time.perf_counter()


def progress(message: str) -> None:
    """tune's per-candidate lines, with the seconds since start (which phase a long run is in)."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def pairs(summary: dict) -> list[tuple[tuple[int, dict], tuple[int, dict], dict]]:
    """((index, original), (index, snapped), move) for every candidate that snapping moved and that
    both validated; index: the candidate's place in tune's list (its folder under candidates/)."""
    candidates = summary["candidates"]
    found = snap_pairs([c["settings"] if c["error"] is None else None for c in candidates], summary["snapping"]["moves"])
    return [((first, candidates[first]), (second, candidates[second]), move)
            for first, second, move in found if first is not None and second is not None]


def grid(family: str, args) -> tuple[list[dict] | None, str]:
    """The candidates tune tries for ``family`` (None: the family's own grid) and what was left out."""
    if args.quick:
        return QUICK_GRID[family], "quick smoke setting: two candidates, 200 images, 5 rounds"
    if family == "avit":
        return ([{"budget_quantile": q} for q in args.avit_quantiles],
                f"budget quantiles {', '.join(f'{q:g}' for q in args.avit_quantiles)}; the masked graph is left out "
                "(it has no budget to snap)")
    return None, ""


def run_family(family: str, args, tmp: Path) -> dict:
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    checkpoint = ROOT / "models" / f"fmnist-{family}.safetensors"
    outdir = tmp / family
    candidates, reduced = grid(family, args)
    progress(f"{family}: tune --snap-budgets" + (f" ({reduced})" if reduced else ""))
    summary = vitedge.tune(checkpoint, outdir, 1e6, candidates=candidates, limit=args.limit, batch=args.batch,
                           iterations=args.iterations, threads=args.threads, log=progress, snap_budgets=True,
                           keep_candidates=True, graph=args.graph, staircase_rounds=args.staircase_rounds)
    found = pairs(summary)
    runners, rows = {}, []
    images = np.random.default_rng(0).standard_normal((args.batch, 1, 28, 28), dtype=np.float32)
    for (first, original), (second, snapped), move in found:
        check = move["verification"]
        row = {"original": original["label"], "snapped": snapped["label"],
               "tokens_before": move["tokens_before"], "tokens_after": move["tokens_after"],
               "accuracy_before": original["accuracy"], "accuracy_after": snapped["accuracy"],
               "flops_before": original["flops_ratio"], "flops_after": snapped["flops_ratio"],
               "graphs": [original["graph"], snapped["graph"]], "kept": check["kept"],
               "check_ratio": check["ratio"], "check_ratio_ci95": check["ratio_ci95"], "check_reason": check["reason"]}
        if check["kept"]:  # the graphs tune exported (batch args.batch), validated and timed: timed again, not exported again
            i = len(runners) // 2
            for kind, index, candidate in (("original", first, original), ("snapped", second, snapped)):
                path = Artifact(outdir / "candidates" / str(index)).ort_model(candidate["graph"])[0]
                runners[f"{i}/{kind}"] = ort_runner(path, images, args.threads)
            row["run"] = i
        rows.append(row)
    if runners:
        progress(f"{family}: confirming {len(runners) // 2} kept pair(s) x {args.rounds} rounds")
        samples, _ = interleaved(runners, args.rounds, args.warmup)
        for row in rows:
            if "run" not in row:
                continue
            a, b = f"{row['run']}/snapped", f"{row['run']}/original"
            row["latency_ratio"] = float(np.median(samples[a]) / np.median(samples[b]))
            row["latency_ratio_ci95"] = ratio_ci(samples, a, b)
            row["within_noise"] = row["latency_ratio_ci95"][0] <= 1.0
    plot = outdir / "staircase.png"
    if not args.quick and plot.is_file():
        shutil.copy(plot, ROOT / "docs" / f"tune_staircase_{family}.png")
    return {"date": datetime.date.today().isoformat(), "load_average": load_before, "batch": args.batch,
            "threads": args.threads, "rounds": args.rounds, "images": summary["data"]["images"], "graph": args.graph,
            "load_average_after": os.getloadavg()[0], "candidates": len(summary["candidates"]),
            "seconds": round(time.perf_counter() - started), "reduced": reduced,
            "staircase": summary["snapping"]["staircase"], "pairs": rows}


def _ratio(value, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def section(family: str, run: dict) -> str:
    stair = run["staircase"]
    form = " (ORT-optimised)" if stair.get("graph") == "optimized" else ""
    lines = [f"<!-- tune-staircase:{family}:begin -->", f"### Snapped budgets: {family}", "",
             f"Measured {run['date']} (load average {run['load_average']:.2f}"
             + (f" before, {run['load_average_after']:.2f} after" if "load_average_after" in run else "")
             + f"), ORT CPU, batch {run['batch']}, {run['threads']} threads"
             + (f", `graph={run['graph']}`" if "graph" in run else "") + ". "
             f"Staircase: {stair['blocks']} blocks{form} at {len(stair['counts'])} token counts, "
             f"{stair['rounds']} rounds, noise {stair['noise_ms']:.4f} ms. tune's check: each snapped graph against its "
             "original in one interleaved run (a snap measurably slower is reverted); confirmation: the kept pairs "
             f"timed again, all in one interleaved run of {run['rounds']} rounds; latency = snapped / original with its "
             "95 % interval."
             + (f" Accuracy on {run['images']} test images." if "images" in run else "")
             + (f" Reduced run: {run['reduced']}." if run.get("reduced") else "")
             + (f" The family took {run['seconds']} s." if "seconds" in run else ""), "",
             "| original | tokens per step | accuracy | snapped tokens | accuracy | graphs timed | tune's check [95 % CI] | "
             "snap | confirmation [95 % CI] | within noise |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in run["pairs"]:
        kept = row.get("kept", True)
        confirmation = (_ratio(row["latency_ratio"], row["latency_ratio_ci95"]) if "latency_ratio" in row else "—")
        noise = ("yes" if row.get("within_noise") else "**no**") if kept else "reverted"
        graphs = "/".join("ort" if g == "optimized" else "onnx" for g in row.get("graphs", ["portable"] * 2))
        check = _ratio(row["check_ratio"], row["check_ratio_ci95"]) if "check_ratio" in row else "—"
        lines.append(f"| {row['original']} | {','.join(map(str, row['tokens_before']))} | {row['accuracy_before']:.4f} | "
                     f"{','.join(map(str, row['tokens_after']))} | {row['accuracy_after']:.4f} | {graphs} | {check} | "
                     f"{'kept' if kept else 'reverted'} | {confirmation} | {noise} |")
    if not run["pairs"]:
        lines.append("| (no candidate moved: the curve was too noisy or every budget already sat at a step's top) "
                     "| | | | | | | | | |")
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
    parser.add_argument("--graph", choices=GRAPHS, default="auto", help="ORT graph timed per candidate (tune's --graph)")
    parser.add_argument("--staircase-rounds", type=int, default=DEFAULT_ROUNDS,
                        help="staircase rounds: more lower its noise on a loaded machine")
    parser.add_argument("--avit-quantiles", type=lambda text: [float(q) for q in text.split(",")],
                        default=list(AVIT_QUANTILES), help="A-ViT budget quantiles tried, comma-separated")
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
