"""vitedge.staircase: the step rule on synthetic latency curves, the families' budget hooks,
and a real (tiny) measurement through the API, the CLI and ``tune --snap-budgets``.

Wall time is never asserted: the real runs check shapes, files and that what was snapped
follows from what was measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import assert_clean_failure, quiet, read_json, run_cli

import vitedge
from vitedge.backbone import ARCHS
from vitedge.errors import VitedgeError
from vitedge.families import get_family
from vitedge.staircase import (Staircase, find_steps, measure, median_stderr, snap, snap_pairs, snap_settings, snap_verdict,
                               token_counts, verify_snap)

MODELS = Path(__file__).resolve().parents[1] / "models"
EVIT = MODELS / "fmnist-evit.safetensors"
CFG = ARCHS["vit_fmnist"]


def stairs(counts, width=8, rise=0.3, base=1.0, se=0.01):
    """Latency flat within each ``width``-aligned group of counts, ``rise`` ms per group."""
    median = [base + rise * ((c - 1) // width) for c in counts]
    return Staircase(list(counts), median, [se] * len(counts))


def test_a_flat_tread_snaps_to_its_top():
    curve = stairs(range(90, 120))  # steps 89..96, 97..104, 105..112, ...
    assert snap(curve, 97) == 104 and snap(curve, 100) == 104 and snap(curve, 104) == 104
    assert snap(curve, 105) == 112
    steps = [(s["first"], s["last"]) for s in curve.steps]
    assert steps == [(90, 96), (97, 104), (105, 112), (113, 119)]


def test_a_ramp_above_the_noise_is_not_snapped():
    counts = list(range(50, 80))
    ramp = Staircase(counts, [1.0 + 0.05 * (c - 50) for c in counts], [0.005] * len(counts))
    assert all(snap(ramp, c) == c for c in counts)
    assert all(s["first"] == s["last"] for s in ramp.steps)


def test_noise_decides_what_one_step_is():
    counts = list(range(50, 60))
    median = [1.0 + 0.01 * (c - 50) for c in counts]
    quiet_machine = Staircase(counts, median, [0.001] * len(counts))
    noisy_machine = Staircase(counts, median, [0.05] * len(counts))
    assert snap(quiet_machine, 50) == 50  # 0.01 ms per token is more than 2 s.e. of 0.001 ms
    assert snap(noisy_machine, 50) == 59  # and less than 2 s.e. of 0.05 ms


def test_snapping_never_crosses_an_unmeasured_count_and_cheaper_counts_are_on_the_step():
    counts = [96, 97, 98, 99, 100, 104, 105]
    flat = Staircase(counts, [1.0] * len(counts), [0.01] * len(counts))
    assert snap(flat, 97) == 100
    dip = Staircase(list(range(10, 24)), [1.0] * 4 + [0.8] * 4 + [1.0] * 3 + [1.5] * 3, [0.01] * 14)
    assert snap(dip, 10) == 20  # 14..17 are cheaper, 18..20 equal, 21.. a step up
    assert [(s["first"], s["last"]) for s in dip.steps] == [(10, 13), (14, 17), (18, 20), (21, 23)]
    with pytest.raises(VitedgeError, match="not measured"):
        snap(flat, 101)


def test_one_slow_count_neither_makes_a_step_nor_drags_a_snap():
    curve = stairs(range(90, 120))
    spiked = Staircase(curve.counts, [m * (3.0 if c in (99, 109) else 1.0) for c, m in zip(curve.counts, curve.median_ms)],
                       curve.stderr_ms)
    assert snap(spiked, 99) == 104 and snap(spiked, 97) == 104  # the spike at 99 is smoothed away
    assert [(s["first"], s["last"]) for s in spiked.steps] == [(s["first"], s["last"]) for s in curve.steps]


def test_a_curve_too_noisy_to_tell_is_not_snapped():
    counts = list(range(40, 60))
    noisy = Staircase(counts, [1.0] * len(counts), [0.06] * len(counts))  # noise 6 % of the latency
    assert all(snap(noisy, c) == c for c in counts)
    evit = get_family("evit")
    settings = evit.resolve_settings(CFG, {"keep_rate": 0.7})
    snapped, record = snap_settings(evit, CFG, settings, Staircase(list(range(1, 51)), [1.0] * 50, [0.06] * 50))
    assert record["too_noisy"] and record["tokens_after"] == record["tokens_before"] and snapped == settings


def test_median_stderr_follows_the_spread():
    rng = np.random.default_rng(0)
    tight = 1.0 + 0.001 * rng.standard_normal((40, 3))
    loose = 1.0 + 0.1 * rng.standard_normal((40, 3))
    assert (median_stderr(tight)[1] < median_stderr(loose)[1] / 20).all()
    assert median_stderr(np.ones((5, 2)))[1].tolist() == [0.0, 0.0]


def test_token_counts_cover_the_windows_and_reject_bad_ranges():
    counts = token_counts(197, [100], window=4, step=8)
    assert {100, 101, 102, 103, 104} <= set(counts) and {8, 96, 192, 1, 197} <= set(counts)
    assert counts == sorted(set(counts))
    for kwargs in ({"low": 30, "high": 20}, {"low": 1, "high": 300}, {"low": 0}):
        with pytest.raises(VitedgeError, match="empty or outside"):
            token_counts(197, **kwargs)
    with pytest.raises(VitedgeError, match="outside the range"):
        token_counts(50, [60])


@pytest.mark.parametrize("name, settings", [
    ("evit", {"keep_rate": 0.5}),
    ("dynamicvit", {"keep_rate": 0.5}),
    ("avit", {"token_budgets": [50] * 3 + [40] * 3 + [24] * 3 + [16] * 3}),
])
def test_family_budget_hooks_raise_counts_up_to_the_limits(name, settings):
    family = get_family(name)
    resolved = family.resolve_settings(CFG, settings)
    before = family.budget_tokens(CFG, resolved)
    same = family.with_budget_tokens(CFG, resolved, before)
    assert family.budget_tokens(CFG, same) == before
    limits = [min(50, t + 3) for t in before]
    raised = family.with_budget_tokens(CFG, resolved, limits)
    after = family.budget_tokens(CFG, raised)
    assert all(b <= a <= lim for b, a, lim in zip(before, after, limits)), (before, after, limits)
    assert after != before
    plan = family.token_plan(CFG, raised)  # the raised settings are a valid graph
    assert plan.flops(CFG) > family.token_plan(CFG, resolved).flops(CFG)


def test_families_without_a_token_budget_say_so():
    assert get_family("deit").budget_tokens(CFG, {}) is None
    avit = get_family("avit")
    assert avit.budget_tokens(CFG, avit.resolve_settings(CFG, {})) is None  # masked: nothing to snap


def test_snap_settings_uses_the_measured_steps():
    evit = get_family("evit")
    settings = evit.resolve_settings(CFG, {"keep_rate": 0.7})
    before = evit.budget_tokens(CFG, settings)  # 37, 28, 21
    curve = stairs(range(1, 51))  # treads 17..24, 25..32, 33..40
    snapped, record = snap_settings(evit, CFG, settings, curve)
    assert record["step_tops"] == [40, 32, 24] and record["tokens_before"] == before
    assert evit.budget_tokens(CFG, snapped) == record["tokens_after"] == [40, 32, 24]


def test_a_real_measurement_has_one_median_per_count():
    counts = [8, 16, 17, 18]
    curve = measure(CFG, counts, batch=1, threads=1, rounds=3, warmup=1, depth=2)
    assert curve.counts == counts and len(curve.median_ms) == len(curve.stderr_ms) == 4
    assert all(m > 0 for m in curve.median_ms) and all(s >= 0 for s in curve.stderr_ms)
    assert curve.steps[0]["first"] == 8 and curve.steps[-1]["last"] == 18
    with pytest.raises(VitedgeError, match="rounds >= 3"):
        measure(CFG, counts, rounds=2)


def test_profile_tokens_cli_writes_the_staircase(tmp_path):
    outdir = tmp_path / "stairs"
    result = run_cli("profile-tokens", EVIT, "-o", outdir, "--tokens", "20:40", "--step", "8", "--snap", "30",
                     "--window", "3", "--rounds", "3", "--warmup", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    data = read_json(outdir / "staircase.json")
    assert set(range(30, 34)) <= set(data["counts"]) and data["counts"][0] == 20 and data["counts"][-1] == 40
    assert 30 <= data["snapped"]["30"] <= 33
    assert (outdir / "staircase.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--tokens", "40:20"], "empty or outside"),
    (["--tokens", "1:400"], "empty or outside"),
    (["--tokens", "10:20", "--snap", "30"], "outside the range"),
    (["--tokens", "abc"], "LOW:HIGH"),
    (["--rounds", "1"], "rounds >= 3"),
])
def test_profile_tokens_bad_input_is_one_line(tmp_path, args, message):
    outdir = tmp_path / "bad"
    error = assert_clean_failure(run_cli("profile-tokens", EVIT, "-o", outdir, *args), outdir)
    assert message in error


def test_tune_snap_budgets_measures_the_snapped_candidate_beside_the_original(tmp_path):
    outdir = tmp_path / "tuned"
    summary = vitedge.tune(EVIT, outdir, latency_budget_ms=1e6, candidates=[{"keep_rate": 0.5}], limit=100,
                           iterations=5, warmup=1, threads=1, log=quiet, snap_budgets=True)
    snapping = summary["snapping"]
    move = snapping["moves"][0]
    labels = [c["label"] for c in summary["candidates"]]
    if move["tokens_after"] != move["tokens_before"]:
        assert len(labels) == 2 and summary["candidates"][1]["settings"] == move["settings"]
        check = move["verification"]  # the snapped graph timed against the original's, reverted when slower
        assert check["candidates"] == [0, 1] and check["kept"] == (check["ratio_ci95"][0] <= 1.0)
        assert summary["candidates"][1]["reverted"] == (None if check["kept"] else check["reason"])
    else:
        assert len(labels) == 1
    expected, previous = [], CFG.num_patches + 1
    for top in move["step_tops"]:  # EViT can hold any count: each step's top, unless the previous step holds fewer
        previous = min(top, previous)
        expected.append(previous)
    assert move["tokens_after"] == expected
    assert "## Latency staircase" in (outdir / "tune.md").read_text()
    assert (outdir / "staircase.png").is_file() and read_json(outdir / "tune.json")["snapping"]["plot"] == "staircase.png"


def _matmul_chain(path: Path, depth: int) -> Path:
    """A graph of ``depth`` [64, 256] x [256, 256] MatMuls: latency grows with depth."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(256, dtype=np.float32) * 0.5, "w")
    nodes, last = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"h{i}"]))
        last = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [64, 256])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_verification_reverts_a_snap_whose_own_graph_is_slower(tmp_path):
    from vitedge.profile import ort_runner

    light = ort_runner(_matmul_chain(tmp_path / "light.onnx", 1), 64, 1)
    heavy = ort_runner(_matmul_chain(tmp_path / "heavy.onnx", 16), 64, 1)
    slower = verify_snap(light, heavy, rounds=10)  # the snapped graph does 16 x the work
    assert slower["kept"] is False and slower["ratio"] > 2 and slower["ratio_ci95"][0] > 1
    assert slower["reason"].startswith("reverted, measurably slower:")
    faster = verify_snap(heavy, light, rounds=10)
    assert faster["kept"] is True and faster["reason"].startswith("within noise:")


def test_snap_verdict_keeps_what_is_within_noise_only():
    timing = {"reference_ms": 10.0, "optimized_ms": 10.2, "ratio": 1.02, "rounds": 30}
    assert snap_verdict({**timing, "ratio_ci95": [0.99, 1.05]})["kept"]
    assert snap_verdict({**timing, "ratio_ci95": [1.0, 1.04]})["kept"]  # reaching 1 is within noise
    slower = snap_verdict({**timing, "ratio": 1.05, "ratio_ci95": [1.03, 1.07]})
    assert not slower["kept"] and "1.050 x the original's latency [95 % CI 1.030, 1.070]" in slower["reason"]


def test_snap_pairs_find_both_candidates_and_mark_what_cannot_be_timed():
    a, b, c, d = ({"keep_rate": [k]} for k in (0.7, 0.72, 0.5, 0.52))
    moves = [{"tokens_before": [35], "tokens_after": [36], "original": a, "settings": b}, None,
             {"tokens_before": [25], "tokens_after": [26], "original": c, "settings": d},
             {"tokens_before": [20], "tokens_after": [20], "original": c, "settings": c}]
    found = snap_pairs([a, b, c, None], moves)  # d failed validation; the unmoved candidate has no pair
    assert [(first, second) for first, second, _ in found] == [(0, 1), (2, None)]


@pytest.mark.parametrize("graph", ["portable", "optimized"])
def test_the_stack_is_timed_in_the_form_asked_for(graph):
    curve = measure(CFG, [8, 16], batch=1, threads=1, rounds=3, warmup=0, depth=2, graph=graph)
    assert curve.graph == graph
    if graph == "optimized":
        assert curve.graph_choice["passes"]["attention"] == 2  # one fused attention per block
    assert all(m > 0 for m in curve.median_ms)
    auto = measure(CFG, [8, 16], batch=1, threads=1, rounds=3, warmup=0, depth=2, graph="auto")
    assert auto.graph in ("portable", "optimized") and "ratio" in auto.graph_choice  # decided by timing both
    with pytest.raises(VitedgeError, match="use --backend ort"):
        measure(CFG, [8, 16], backend="torch", rounds=3, graph="optimized")
    with pytest.raises(VitedgeError, match="unknown graph 'fast'"):
        measure(CFG, [8, 16], rounds=3, graph="fast")


def test_profile_tokens_cli_graph_flag(tmp_path):
    outdir = tmp_path / "stairs"
    result = run_cli("profile-tokens", EVIT, "-o", outdir, "--tokens", "20:24", "--step", "8", "--rounds", "3",
                     "--warmup", "0", "--threads", "1", "--graph", "portable")
    assert result.exit_code == 0, result.output
    assert read_json(outdir / "staircase.json")["graph"] == "portable" and '"graph": "portable"' in result.stdout
    for args, message in ((["--graph", "fast"], "Invalid value for '--graph'"),
                          (["--graph", "optimized", "--backend", "torch"], "use --backend ort")):
        bad = tmp_path / "bad"
        assert message in assert_clean_failure(run_cli("profile-tokens", EVIT, "-o", bad, *args), bad)
