"""Budget search on the bundled Fashion-MNIST models: the most accurate candidate within a latency budget.

The budget is a fraction of the dense model's latency, measured in the same run just before
each family's search (so the result means the same on any machine): "the most accurate EViT
that runs in 90 % of the dense time". A-ViT's candidates (masked, then budget quantiles) are
calibrated on the default calibration set (Fashion-MNIST train images), accuracy is measured
on test images. Each family run replaces that family's entry in
benchmarks/results/tune_fmnist.json, its section of docs/tune.md and docs/tune_<family>.png,
so families can be re-measured one at a time; benchmarks/results/tune_fmnist.md holds all tables.

Usage: python benchmarks/tune_fmnist.py [--fraction 0.9] [--batch 16] [--limit 5000] [--families evit dynamicvit avit]
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

# Passive OpenMP waiting, set before torch is imported: the dense model is exported with torch
# and timed right after, and a spinning pool left by the export slowed that timing by a third.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import vitedge  # noqa: E402
from bench_token_pruning import write_doc_section  # noqa: E402
from vitedge.tune import render_markdown  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "tune.md"


def quiet(_message: str) -> None:
    """Per-candidate export logs are noise here."""


def dense_latency(statistic: str, batch: int, iterations: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        vitedge.export(ROOT / "models" / "fmnist-deit.safetensors", tmp, batch_size=batch, validate_data=None, log=quiet)
        result = vitedge.profile(tmp, "ort", batch, iterations, 20, threads, histogram=False)
    return result[f"{statistic}_ms"]


def run_family(family: str, args) -> dict:
    """One family's search, with the dense latency (and so the budget) measured right before it."""
    load_average = os.getloadavg()
    dense = dense_latency(args.statistic, args.batch, args.iterations, args.threads)
    budget = args.fraction * dense
    print(f"{family}: dense {args.statistic} {dense:.3f} ms; budget {budget:.3f} ms", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        outdir = Path(tmp) / family
        summary = vitedge.tune(ROOT / "models" / f"fmnist-{family}.safetensors", outdir, budget,
                               limit=args.limit, batch=args.batch, statistic=args.statistic,
                               iterations=args.iterations, threads=args.threads)
        shutil.copy(outdir / "tune_pareto.png", ROOT / "docs" / f"tune_{family}.png")
    return {
        "date": datetime.date.today().isoformat(),
        "load_average": {"before": load_average, "after": os.getloadavg()},
        "batch": args.batch,
        "threads": args.threads,
        "statistic": args.statistic,
        "dense_latency_ms": dense,
        "fraction": args.fraction,
        "budget_ms": budget,
        "summary": summary,
    }


def section(family: str, run: dict) -> str:
    """The family's part of docs/tune.md: how the budget was set, then tune's own table."""
    load = run["load_average"]
    after = f", {load['after'][0]:.2f} after" if "after" in load else ""
    header = (f"Dense model {run['statistic']}: {run['dense_latency_ms']:.3f} ms (ORT CPU, batch {run['batch']}, "
              f"{run['threads']} threads); budget = {run['fraction']:g} x dense = {run['budget_ms']:.3f} ms. "
              f"Measured {run['date']}, load average {load['before'][0]:.2f}{' before' + after if after else ''}.")
    table = render_markdown(run["summary"]).replace("# Budget search", "### Budget search", 1)
    return f"<!-- tune-fmnist:{family}:begin -->\n{header}\n\n{table}<!-- tune-fmnist:{family}:end -->\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.9, help="budget as a fraction of the dense latency")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--families", nargs="+", default=["evit", "dynamicvit", "avit"])
    parser.add_argument("--statistic", default="p90")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="the tiny model is overhead-bound at batch 1")
    args = parser.parse_args()

    path = RESULTS / "tune_fmnist.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for family in args.families:
        run = run_family(family, args)
        results["runs"][family] = run
        path.write_text(json.dumps(results, indent=2) + "\n")  # each family lands as soon as it is measured
        write_doc_section(DOC, f"<!-- tune-fmnist:{family}:begin -->", f"<!-- tune-fmnist:{family}:end -->",
                          section(family, run), "# Budget search: `vitedge tune`\n")
    (RESULTS / "tune_fmnist.md").write_text("\n".join(section(f, r) for f, r in results["runs"].items()))
    print(json.dumps({f: {"chosen": r["summary"]["chosen"]["label"], "accuracy": r["summary"]["chosen"]["accuracy"],
                          "latency_ms": r["summary"]["chosen"]["latency_ms"]} for f, r in results["runs"].items()}))


if __name__ == "__main__":
    main()
