"""benchmarks/bench_families.py's table: rows from a subset run say which run measured them."""

from __future__ import annotations

import copy
import json
import sys

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_families as bench  # noqa: E402

RECORD = json.loads((REPO / "benchmarks" / "results" / "families.json").read_text())


def one_run() -> dict:
    """The committed rows, every one marked as measured by one run (the file's own may hold several)."""
    families = copy.deepcopy(RECORD["families"])
    for family in families.values():
        family["run"] = dict(RECORD["environment"] | {"cpu": "Some CPU"}, command="python benchmarks/bench_families.py")
    return families


def test_one_run_is_named_once_in_the_header_and_rows_carry_no_run_mark():
    table = bench.markdown(RECORD["environment"], one_run())
    assert f"Measured {RECORD['environment']['date']} on Some CPU" in table
    assert "(run a)" not in table and "runs (a subset run" not in table


def test_a_subset_run_on_another_machine_marks_its_rows_and_names_both_runs():
    families = one_run()
    families["castling"]["run"] = dict(families["castling"]["run"], cpu="Other CPU",
                                       command="python benchmarks/bench_families.py --families castling")
    table = bench.markdown(RECORD["environment"], families)
    assert "The rows come from 2 runs" in table
    assert "- run b: " in table and "on Other CPU" in table and "`python benchmarks/bench_families.py --families castling`" in table
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert [row for row in rows if "(run b)" in row] == [row for row in rows if "Castling" in row] != []
    assert all("(run a)" in row for row in rows if "Castling" not in row)
