"""benchmarks/bench_denormals.py and the halting calibration it shares with bench_families."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_denormals as bench  # noqa: E402
import bench_families  # noqa: E402

from vitedge.backbone import ARCHS  # noqa: E402


def test_gate_centre_bisection_reaches_the_target_depth_where_random_weights_halt_nothing():
    cfg = ARCHS["vit_fmnist"]
    images = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    released = bench_families.token_depth(cfg, {}, images)
    center, depth = bench_families.halting_gate_center(cfg, images, target=0.6, steps=10)
    assert released == 1.0  # the released gate centre: every token runs every block
    assert abs(depth - 0.6) < 0.05 and 0.0 < center < 20.0
    assert bench_families.token_depth(cfg, {"gate_center": center / 2}, images) < depth  # depth rises with the centre


def test_table_states_both_sides_of_the_switch_per_graph():
    record = json.loads((REPO / "benchmarks" / "results" / "denormals.json").read_text())
    table = bench.markdown(record["environment"], record["batches"])
    assert table.startswith(bench.BEGIN) and table.rstrip().endswith(bench.END)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == sum(len(graphs) for graphs in record["batches"].values())
    avit = record["batches"]["1"]["avit"]
    assert f"{avit['flush_vs_denormals']:.3f}" in next(row for row in rows if row.startswith("| A-ViT") and "| 1 |" in row)


@pytest.mark.parametrize("argv", [["--families", "nosuch"], ["--rounds", "1"], ["--batches", "0"]])
def test_bad_arguments_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
