"""Fidelity of the bundled Fashion-MNIST models: static ONNX (ORT) vs reference PyTorch on the 10,000 test images.

Writes benchmarks/results/fidelity.json and the table of docs/fidelity.md (the text after
``HAND_WRITTEN`` there is kept).
Usage: python benchmarks/fidelity.py [--limit N] [--models evit dynamicvit ...]  (default: every bundled model)
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

import vitedge  # noqa: E402

HAND_WRITTEN = "<!-- written by hand below: benchmarks/fidelity.py keeps it -->"


def bundled() -> list[str]:
    """The bundled Fashion-MNIST models by family name, as ``models/fmnist-<family>.safetensors`` names them."""
    return sorted(p.stem.removeprefix("fmnist-") for p in (ROOT / "models").glob("fmnist-*.safetensors"))


def measure(family: str, limit: int | None) -> dict:
    checkpoint = ROOT / "models" / f"fmnist-{family}.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        vitedge.export(checkpoint, tmp, validate_data=None, dynamic_batch=True, log=lambda m: None)
        started = time.time()
        try:
            result = vitedge.validate(tmp, "fashion-mnist", limit, batch_size=250)
        except vitedge.ValidationFailed:  # recorded as measured, with the verdict, not dropped
            result = vitedge.Artifact(tmp).report()["validate"]
        meta = vitedge.Artifact(tmp).metadata
    return {
        "family": family,
        "checkpoint": str(checkpoint.relative_to(ROOT)),
        "settings": meta["settings"],
        "tokens_after_selection": [s.get("tokens_after", "?") for s in meta["token_budgets"]["selections"]],
        "flops_ratio": meta["flops"]["ratio"],
        "seconds": round(time.time() - started, 1),
        "date": datetime.date.today().isoformat(),
        **result,
    }


def markdown(rows: list[dict]) -> str:
    dates = sorted({row["date"] for row in rows})
    lines = [
        "# Fidelity of the bundled models",
        "",
        "Static ONNX graph (ONNX Runtime CPU) against the reference PyTorch model (the paper's eval",
        "semantics), on the Fashion-MNIST test set. Measured by `python benchmarks/fidelity.py` on "
        f"{', '.join(dates)} (each row's date: benchmarks/results/fidelity.json).",
        "",
        "| model | settings | tokens after each selection | FLOPs vs dense | images | accuracy (reference) | accuracy (static ONNX) | top-1 agreement | kept-token sets identical (per selection) | every selection identical | max abs logit diff (selections agree / all images) | passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = ", ".join(f"{100 * v:.2f} %" for v in r.get("kept_identical", r["kept_agreement"]).values()) or "—"
        bound = "—" if r["max_abs_logit_diff"] is None else f"{r['max_abs_logit_diff']:.1e}"
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "—"
        tokens = " → ".join(map(str, r["tokens_after_selection"])) or "—"
        lines.append(
            f"| {r['checkpoint']} | {settings} | {tokens} | {r['flops_ratio']:.3f} | {r['images']} | "
            f"{100 * r['reference_accuracy']:.2f} % | {100 * r['exported_accuracy']:.2f} % | "
            f"{100 * r['top1_agreement']:.2f} % | {kept} | {100 * r.get('selections_identical', 1.0):.2f} % | "
            f"{bound} / {r.get('max_abs_logit_diff_all', r['max_abs_logit_diff']):.1e} | "
            f"{'yes' if r.get('passed', True) else 'no'} |"
        )
    lines += ["", "Acceptance: top-1 agreement ≥ 99.9 % and kept-token sets identical or differing by a near-tie "
              "(below) on ≥ 99.9 % of images.", ""]
    return "\n".join(lines)


def merge_rows(previous: list[dict], rows: list[dict], order: list[str]) -> list[dict]:
    """``previous`` with each family measured now replaced by its new row, in ``order``.

    A run with ``--models X`` remeasures X; the other models' rows are still true and stay
    (rewriting the results with X alone would drop them from the file and the docs table)."""
    merged = {row["family"]: row for row in previous} | {row["family"]: row for row in rows}
    return [merged[family] for family in order if family in merged] + [
        row for family, row in merged.items() if family not in order]


def keep_hand_written(table: str, path: Path) -> str:
    """``table`` followed by the hand-written part of the current ``path`` (from ``HAND_WRITTEN`` on)."""
    current = path.read_text() if path.is_file() else ""
    return table + ("\n" + current[current.index(HAND_WRITTEN):] if HAND_WRITTEN in current else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="first N test images (default: all 10,000)")
    parser.add_argument("--models", nargs="+", default=bundled(), help="default: every bundled model")
    args = parser.parse_args()
    results = ROOT / "benchmarks" / "results" / "fidelity.json"
    previous = json.loads(results.read_text()) if results.is_file() else []
    rows = merge_rows(previous, [measure(family, args.limit) for family in args.models], bundled())
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=2) + "\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    docs = ROOT / "docs" / "fidelity.md"
    docs.write_text(keep_hand_written(markdown(rows), docs))
    print(markdown(rows))


if __name__ == "__main__":
    main()
