"""Budget search on the bundled Fashion-MNIST models: the most accurate keep rate within a latency budget.

The budget is a fraction of the dense model's latency measured in the same run (so the
result means the same on any machine): "the most accurate EViT that runs in 75 % of the
dense time". Writes benchmarks/results/tune_fmnist.json, docs/tune_<family>.png and the
tables in benchmarks/results/tune_fmnist.md (pasted into docs/tune.md).

Usage: python benchmarks/tune_fmnist.py [--fraction 0.75] [--batch 16] [--limit 10000] [--families evit dynamicvit]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vitedge  # noqa: E402


def quiet(_message: str) -> None:
    """Per-candidate export logs are noise here."""


def dense_latency(statistic: str, batch: int, iterations: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        vitedge.export(ROOT / "models" / "fmnist-deit.safetensors", tmp, batch_size=batch, validate_data=None, log=quiet)
        result = vitedge.profile(tmp, "ort", batch, iterations, 20, threads, histogram=False)
    return result[f"{statistic}_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.75, help="budget as a fraction of the dense latency")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--families", nargs="+", default=["evit", "dynamicvit"])
    parser.add_argument("--statistic", default="p90")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="the tiny model is overhead-bound at batch 1")
    args = parser.parse_args()

    dense = dense_latency(args.statistic, args.batch, args.iterations, args.threads)
    budget = args.fraction * dense
    print(f"dense {args.statistic} {dense:.3f} ms; budget {budget:.3f} ms", file=sys.stderr)
    runs = {}
    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            outdir = Path(tmp) / family
            summary = vitedge.tune(ROOT / "models" / f"fmnist-{family}.safetensors", outdir, budget,
                                   limit=args.limit, batch=args.batch, statistic=args.statistic,
                                   iterations=args.iterations, threads=args.threads)
            shutil.copy(outdir / "tune_pareto.png", ROOT / "docs" / f"tune_{family}.png")
            runs[family] = {"summary": summary, "table": (outdir / "tune.md").read_text()}
    result = {
        "date": datetime.date.today().isoformat(),
        "load_average": os.getloadavg(),
        "batch": args.batch,
        "dense_latency_ms": dense,
        "fraction": args.fraction,
        "budget_ms": budget,
        "runs": {family: run["summary"] for family, run in runs.items()},
    }
    results = ROOT / "benchmarks" / "results"
    (results / "tune_fmnist.json").write_text(json.dumps(result, indent=2) + "\n")
    header = (f"Dense model {args.statistic}: {dense:.3f} ms (ORT CPU, batch {args.batch}, {args.threads} threads); budget = "
              f"{args.fraction:g} x dense = {budget:.3f} ms. Measured {result['date']}, load average "
              f"{result['load_average'][0]:.2f}.\n\n")
    (results / "tune_fmnist.md").write_text(header + "\n".join(run["table"] for run in runs.values()))
    print(json.dumps({f: {"chosen": r["summary"]["chosen"]["label"], "accuracy": r["summary"]["chosen"]["accuracy"]}
                      for f, r in runs.items()}))


if __name__ == "__main__":
    main()
