"""benchmarks/tune_staircase.py: which graphs it pairs and which grid it gives tune (the timed run is the benchmark itself)."""

from __future__ import annotations

import argparse
import sys

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import tune_staircase as bench  # noqa: E402


def _candidate(keep: float, error: str | None = None) -> dict:
    return {"settings": {"keep_rate": [keep]}, "error": error}


def test_pairs_point_at_the_folders_tune_kept_and_skip_what_did_not_move_or_failed():
    candidates = [_candidate(0.7), _candidate(0.72), _candidate(0.5), _candidate(0.52, "validation failed"),
                  _candidate(0.4)]
    moved = {"tokens_before": [35], "tokens_after": [36], "original": candidates[0]["settings"],
             "settings": candidates[1]["settings"]}
    failed = {"tokens_before": [25], "tokens_after": [26], "original": candidates[2]["settings"],
              "settings": candidates[3]["settings"]}
    unmoved = {"tokens_before": [20], "tokens_after": [20], "original": candidates[4]["settings"],
               "settings": candidates[4]["settings"]}
    summary = {"candidates": candidates, "snapping": {"moves": [moved, None, failed, unmoved]}}
    found = bench.pairs(summary)
    assert [(first, second) for (first, _), (second, _), _ in found] == [(0, 1)]
    (_, original), (_, snapped), move = found[0]
    assert original is candidates[0] and snapped is candidates[1] and move is moved


def test_avit_grid_leaves_out_the_masked_graph_and_says_so():
    args = argparse.Namespace(quick=False, avit_quantiles=[0.99, 0.95])
    grid, reduced = bench.grid("avit", args)
    assert grid == [{"budget_quantile": 0.99}, {"budget_quantile": 0.95}]
    assert "masked graph is left out" in reduced
    assert bench.grid("evit", args) == (None, "")  # the family's own grid
    quick, note = bench.grid("evit", argparse.Namespace(quick=True, avit_quantiles=[]))
    assert quick == bench.QUICK_GRID["evit"] and "quick" in note


def _row(kept: bool, **extra) -> dict:
    return {"original": "keep 0.7", "tokens_before": [37, 28, 21], "accuracy_before": 0.80, "tokens_after": [40, 32, 24],
            "accuracy_after": 0.81, "graphs": ["optimized", "portable"], "kept": kept, "check_ratio": 1.06,
            "check_ratio_ci95": [1.04, 1.08], **extra}


def test_the_section_says_which_snaps_tune_reverted_and_confirms_the_kept_ones():
    stair = {"blocks": 12, "counts": list(range(1, 51)), "rounds": 20, "noise_ms": 0.1, "graph": "optimized"}
    run = {"date": "2026-12-02", "load_average": 1.0, "load_average_after": 1.5, "batch": 16, "threads": 2, "rounds": 40,
           "graph": "auto", "staircase": stair,
           "pairs": [_row(False), _row(True, latency_ratio=0.99, latency_ratio_ci95=[0.97, 1.01], within_noise=True),
                     _row(True, latency_ratio=1.03, latency_ratio_ci95=[1.01, 1.05], within_noise=False)]}
    rows = [line for line in bench.section("evit", run).splitlines() if line.startswith("| keep 0.7")]
    assert rows[0].endswith("| ort/onnx | 1.060 [1.040, 1.080] | reverted | — | reverted |")
    assert rows[1].endswith("| kept | 0.990 [0.970, 1.010] | yes |")
    assert rows[2].endswith("| kept | 1.030 [1.010, 1.050] | **no** |")  # a kept snap the confirmation finds slower is shown
    assert "12 blocks (ORT-optimised)" in bench.section("evit", run)
