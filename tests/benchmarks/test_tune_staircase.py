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
