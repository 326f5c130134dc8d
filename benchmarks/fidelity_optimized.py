"""Fidelity of the ONNX Runtime-optimised graphs (model.ort.onnx) of the bundled Fashion-MNIST models.

Per bundled model: export as benchmarks/fidelity.py does (dynamic batch), run vitedge.optimize's
passes with ``force`` (the graph is written whether or not it pays, so every one is proven),
then ``vitedge.validate(..., graph="optimized")``: the same reference, images, thresholds and
near-tie rule as model.onnx, on the 10,000 Fashion-MNIST test images. A fidelity run, not a
timing run: the short timing optimize does is not reported.

Writes benchmarks/results/fidelity_optimized.json and the table of docs/optimize.md (between
its BEGIN/END markers).
Usage: python benchmarks/fidelity_optimized.py [--limit N] [--models evit ats ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import vitedge  # noqa: E402
from vitedge.optimize import optimize  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from fidelity import bundled, merge_rows  # noqa: E402

BEGIN = "<!-- BEGIN fidelity_optimized (benchmarks/fidelity_optimized.py writes this table) -->"
END = "<!-- END fidelity_optimized -->"
DOC = ROOT / "docs" / "optimize.md"
RESULTS = ROOT / "benchmarks" / "results" / "fidelity_optimized.json"


def measured_on(limit: int | None) -> dict:
    """Each row says when and on how many images it was measured: rows of several runs share the file."""
    return {"date": datetime.date.today().isoformat(), "limit": limit}


def measure(family: str, limit: int | None) -> dict:
    checkpoint = ROOT / "models" / f"fmnist-{family}.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        vitedge.export(checkpoint, tmp, validate_data=None, dynamic_batch=True, log=lambda m: None)
        entry = optimize(tmp, data=None, rounds=2, force=True)
        started = time.time()
        if not entry["written"]:  # no pass applies: the ORT graph is model.onnx itself
            return {"family": family, "checkpoint": str(checkpoint.relative_to(ROOT)), "passes": entry["passes"],
                    "written": False, **measured_on(limit)}
        try:
            result = vitedge.validate(tmp, "fashion-mnist", limit, batch_size=250, graph="optimized")
        except vitedge.ValidationFailed:  # recorded as measured, with the verdict
            result = vitedge.Artifact(tmp).report()["validate_ort"]
    return {"family": family, "checkpoint": str(checkpoint.relative_to(ROOT)), "passes": entry["passes"],
            "written": True, **measured_on(limit), "seconds": round(time.time() - started, 1), **result}


def markdown(rows: list[dict]) -> str:
    lines = [
        BEGIN,
        f"Measured by `python benchmarks/fidelity_optimized.py` on {', '.join(sorted({r['date'] for r in rows}))} "
        f"(onnxruntime {__import__('onnxruntime').__version__}): model.ort.onnx against the reference PyTorch model, "
        "with model.onnx's thresholds (top-1 agreement ≥ 99.9 %, kept-token agreement ≥ 99.9 % with near-ties "
        "counted apart, max |logit diff| ≤ 1e-3 where every selection agrees).",
        "",
        "| model | passes (count) | images | accuracy (reference / optimised) | top-1 agreement | kept-token sets identical (per selection) | near-ties | max abs logit diff (selections agree / all) | passed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        passes = ", ".join(f"{k} {v}" for k, v in r["passes"].items() if v) or "none"
        if not r["written"]:
            lines.append(f"| {r['checkpoint']} | {passes} | — | — | — | — | — | — | model.onnx is the ORT graph |")
            continue
        kept = ", ".join(f"{100 * v:.2f} %" for v in r.get("kept_identical", {}).values()) or "—"
        ties = sum(t["count"] for t in r.get("near_ties", {}).values()) if r.get("near_ties") else 0
        bound = "—" if r["max_abs_logit_diff"] is None else f"{r['max_abs_logit_diff']:.1e}"
        lines.append(
            f"| {r['checkpoint']} | {passes} | {r['images']} | {100 * r['reference_accuracy']:.2f} % / "
            f"{100 * r['exported_accuracy']:.2f} % | {100 * r['top1_agreement']:.2f} % | {kept} | {ties} | "
            f"{bound} / {r['max_abs_logit_diff_all']:.1e} | {'yes' if r['passed'] else '**no**'} |")
    lines.append(END)
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="images (default: all 10,000)")
    parser.add_argument("--models", nargs="+", default=bundled(), choices=bundled())
    args = parser.parse_args()
    # The reference runs image by image on tiny tensors (no op is large enough to split): one torch
    # thread; two on a shared, loaded 2-core machine made every op wait for a time slice (70x slower).
    torch.set_num_threads(1)
    rows = []
    for family in args.models:
        print(f"{family}: export, optimise, validate", file=sys.stderr, flush=True)
        rows.append(measure(family, args.limit))
        print(f"{family}: {'passed' if rows[-1].get('passed', True) else 'FAILED'}", file=sys.stderr, flush=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = merge_rows(previous.get("models", []), rows, bundled())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"models": rows}, indent=2, default=str) + "\n")
    if all(row["limit"] is None for row in rows) and [r["family"] for r in rows] == bundled():
        write_doc(markdown(rows))
    else:
        print(markdown(rows))


if __name__ == "__main__":
    main()
