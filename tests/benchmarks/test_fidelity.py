"""benchmarks/fidelity.py's row merge: a run over some models keeps the other models' rows."""

from __future__ import annotations

import sys

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from fidelity import merge_rows  # noqa: E402


def test_remeasured_models_replace_their_rows_and_the_others_stay_in_bundle_order():
    previous = [{"family": "ats", "passed": True}, {"family": "evit", "passed": True}, {"family": "tome", "passed": True}]
    merged = merge_rows(previous, [{"family": "tome", "passed": False}, {"family": "avit", "passed": True}],
                        ["ats", "avit", "evit", "tome"])
    assert merged == [{"family": "ats", "passed": True}, {"family": "avit", "passed": True},
                      {"family": "evit", "passed": True}, {"family": "tome", "passed": False}]


def test_a_family_outside_the_bundle_is_kept_after_the_bundled_ones():
    merged = merge_rows([{"family": "mine", "passed": True}], [{"family": "evit", "passed": True}], ["evit"])
    assert [row["family"] for row in merged] == ["evit", "mine"]


def test_no_previous_file_gives_the_new_rows():
    assert merge_rows([], [{"family": "evit"}], ["deit", "evit"]) == [{"family": "evit"}]
