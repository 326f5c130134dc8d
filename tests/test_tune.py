"""vitedge.tune: budget search over a family's token budgets, on the bundled trained EViT.

Wall time is never asserted (shared machine); the tests check that what is chosen follows
from what was measured, and that the measurement is real (the winner's accuracy is re-measured
with ``vitedge.predict`` on the same images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import assert_clean_failure, quiet, read_json, run_cli

import vitedge
from vitedge.data import load_dataset
from vitedge.errors import BudgetMissed, VitedgeError
from vitedge.staircase import snap_pairs
from vitedge.tune import Candidate, _verify_snaps, choose, pareto_front
from vitedge.validate import input_spec

EVIT = Path(__file__).resolve().parents[1] / "models" / "fmnist-evit.safetensors"
IMAGES = 300
FAST = {"limit": IMAGES, "iterations": 5, "warmup": 1, "threads": 1, "log": quiet}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("tune") / "evit"
    summary = vitedge.tune(EVIT, outdir, latency_budget_ms=1e6, candidates=[{"keep_rate": 1.0}, {"keep_rate": 0.4}], **FAST)
    return outdir, summary


def test_every_candidate_is_measured_and_the_most_accurate_wins(tuned):
    outdir, summary = tuned
    candidates = summary["candidates"]
    assert [c["settings"]["keep_rate"] for c in candidates] == [[1.0] * 3, [0.4] * 3]
    for c in candidates:
        assert c["error"] is None and c["meets_budget"] and c["top1_agreement"] == 1.0
        assert 0.5 < c["accuracy"] <= 1.0 and c["latency_ms"] == c["latency"]["p90"] > 0
    assert candidates[1]["flops_ratio"] < candidates[0]["flops_ratio"] == 1.0
    assert candidates[0]["accuracy"] != candidates[1]["accuracy"]  # the keep rate really changed the model
    best = max(candidates, key=lambda c: c["accuracy"])
    assert summary["chosen"]["settings"] == best["settings"]
    assert read_json(outdir / "vitedge.json")["settings"] == best["settings"]


def test_the_written_artifact_is_the_winner_with_the_measured_accuracy(tuned):
    outdir, summary = tuned
    optimized = ["model.ort.onnx"] if summary["chosen"]["graph"] == "optimized" else []  # graph auto: where it paid
    assert sorted(p.name for p in outdir.iterdir()) == sorted(
        ["model.onnx", "vitedge.json", "report.json", "report.md", "tune.json", "tune.md", "tune_pareto.png", *optimized])
    meta = read_json(outdir / "vitedge.json")
    dataset = load_dataset("fashion-mnist", IMAGES)
    images = np.concatenate([batch for batch, _ in dataset.batches(input_spec(meta), 100)])
    accuracy = float((vitedge.predict(outdir, images, threads=1).argmax(1) == dataset.labels).mean())
    assert accuracy == pytest.approx(summary["chosen"]["accuracy"])
    assert vitedge.check(outdir)["passed"]
    report = read_json(outdir / "report.json")
    assert report["tune"]["chosen"]["settings"] == meta["settings"] and report["validate"]["passed"]
    assert "## Budget search" in (outdir / "report.md").read_text()
    table = (outdir / "tune.md").read_text()
    assert "keep 1 " in table and "keep 0.4" in table and "**chosen**" in table
    assert (outdir / "tune_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_candidates_leaves_every_candidates_graph_beside_the_winner(tmp_path):
    outdir = tmp_path / "out"
    summary = vitedge.tune(EVIT, outdir, 1e6, candidates=[{"keep_rate": 0.4}, {"keep_rate": 1.0}], keep_candidates=True,
                           **FAST)
    graphs = [(outdir / "candidates" / str(i) / "model.onnx").read_bytes() for i in range(2)]
    assert graphs[0] != graphs[1]  # each folder holds its own candidate, in the summary's order
    chosen = [c["settings"] for c in summary["candidates"]].index(summary["chosen"]["settings"])
    assert (outdir / "model.onnx").read_bytes() == graphs[chosen]
    for i, candidate in enumerate(summary["candidates"]):
        meta = read_json(outdir / "candidates" / str(i) / "vitedge.json")
        assert meta["settings"] == candidate["settings"]


def test_candidates_with_the_same_graph_are_measured_once(tmp_path):
    messages = []
    summary = vitedge.tune(EVIT, tmp_path / "out", 1e6, candidates=[{"keep_rate": 0.7}, {"keep_rate": [0.7, 0.7, 0.7]}],
                           **{**FAST, "log": messages.append})
    assert [c["label"] for c in summary["candidates"]] == ["keep 0.7"]
    assert summary["same_graph_as"] == {"keep 0.7,0.7,0.7": "keep 0.7"}
    assert "keep 0.7,0.7,0.7 gives the same graph as keep 0.7: measured once" in messages
    assert "keep 0.7,0.7,0.7 = keep 0.7" in (tmp_path / "out" / "tune.md").read_text()


def test_no_candidate_meets_the_budget(tmp_path):
    outdir = tmp_path / "never"
    with pytest.raises(BudgetMissed, match=r"no candidate meets p50 <= 1e-06 ms on ort; the fastest, keep 0.5, takes"):
        vitedge.tune(EVIT, outdir, 1e-6, candidates=[{"keep_rate": 0.5}], statistic="p50", **FAST)
    assert not outdir.exists()


def _point(latency, accuracy, meets=True):
    return Candidate(settings={"keep_rate": latency}, latency_ms=latency, accuracy=accuracy, meets_budget=meets)


def test_choose_and_pareto_follow_the_measurements():
    slow_best, mid, fast_worst, dominated = _point(3.0, 0.9, meets=False), _point(2.0, 0.85), _point(1.0, 0.8), _point(2.5, 0.8)
    failed = Candidate(settings={}, error="validation failed")
    points = [slow_best, mid, fast_worst, dominated, failed]
    assert choose(points) is mid  # the most accurate among those meeting the budget
    assert pareto_front(points) == [fast_worst, mid, slow_best]
    tie = _point(1.5, 0.85)
    assert choose([mid, tie]) is tie  # equal accuracy: the faster
    assert choose([slow_best, failed]) is None
    reverted = _point(0.5, 0.95)
    reverted.reverted = "reverted, measurably slower: 1.050 x the original's latency"
    assert choose([mid, reverted]) is mid and pareto_front([mid, reverted]) == [mid]  # never chosen, not on the front


def test_a_snap_whose_graph_is_slower_than_its_originals_is_reverted(tmp_path):
    """Real exports: keep 1.0 posing as the "snapped" form of keep 0.4 is far slower and must be reverted;
    the other way round it is kept."""
    outdir = tmp_path / "out"
    summary = vitedge.tune(EVIT, outdir, 1e6, candidates=[{"keep_rate": 0.4}, {"keep_rate": 1.0}], keep_candidates=True,
                           **{**FAST, "batch": 16, "graph": "portable"})
    fields = ("settings", "label", "latency_ms", "accuracy", "meets_budget", "graph")
    results = [Candidate(**{k: c[k] for k in fields}) for c in summary["candidates"]]
    few, all_tokens = (c.settings for c in results)
    moves = [{"tokens_before": [23, 11, 6], "tokens_after": [50, 50, 50], "original": few, "settings": all_tokens}]
    timing = {"backend": "ort", "batch": 16, "threads": 1}
    _verify_snaps(results, moves, outdir / "candidates", timing, quiet)
    check = moves[0]["verification"]
    assert check["kept"] is False and check["ratio_ci95"][0] > 1 and check["candidates"] == [0, 1]
    assert results[1].reverted == check["reason"] and results[1].reverted.startswith("reverted, measurably slower")
    results[1].accuracy = 1.0  # even the most accurate candidate is not chosen once reverted
    assert choose(results) is results[0]
    results = [Candidate(**{k: c[k] for k in fields}) for c in summary["candidates"]]
    moves = [{"tokens_before": [50, 50, 50], "tokens_after": [23, 11, 6], "original": all_tokens, "settings": few}]
    _verify_snaps(results, moves, outdir / "candidates", timing, quiet)
    assert moves[0]["verification"]["kept"] is True and results[0].reverted is None
    assert snap_pairs([few, None], moves)[0][:2] == (None, 0)  # an original that failed validation: nothing to time


@pytest.mark.parametrize("graph", ["portable", "optimized"])
def test_graph_decides_which_ort_graph_is_timed_and_kept(tmp_path, graph):
    outdir = tmp_path / graph
    summary = vitedge.tune(EVIT, outdir, 1e6, candidates=[{"keep_rate": 0.5}], graph=graph, **FAST)
    assert summary["graph"] == graph and summary["chosen"]["graph"] == graph
    assert (outdir / "model.ort.onnx").is_file() == (graph == "optimized")  # the winner's artifact holds what was timed
    if graph == "optimized":
        assert "(model.ort.onnx)" in (outdir / "tune.md").read_text()
        assert read_json(outdir / "report.json")["optimize"]["ort"]["fidelity"]["passed"]


@pytest.mark.parametrize("kwargs, message", [
    ({"latency_budget_ms": 0}, "latency budget must be > 0 ms, got 0"),
    ({"latency_budget_ms": -5}, "latency budget must be > 0 ms"),
    ({"statistic": "p75"}, "unknown latency statistic 'p75'"),
    ({"backend": "trt"}, "unknown backend 'trt'"),
    ({"batch": 0}, "batch must be >= 1"),
    ({"limit": 0}, "image limit must be positive"),
    ({"candidates": [{"keep_rate": 1.5}]}, r"keep rate must be in \(0, 1\], got 1.5"),
    ({"candidates": [{"merge_count": 4}]}, "family 'evit' has no setting merge_count"),
    ({"candidates": []}, "no candidates to try"),
    ({"graph": "fast"}, "unknown graph 'fast'"),
    ({"graph": "optimized", "backend": "torch"}, "use --backend ort"),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, kwargs, message):
    outdir = tmp_path / "out"
    arguments = {"latency_budget_ms": 10.0, **FAST, **kwargs}
    with pytest.raises(VitedgeError, match=message):
        vitedge.tune(EVIT, outdir, **arguments)
    assert not outdir.exists()


def test_unlabelled_images_cannot_rank_accuracy(tmp_path):
    from PIL import Image

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "a.png")
    with pytest.raises(VitedgeError, match="needs labelled images"):
        vitedge.tune(EVIT, tmp_path / "out", 10.0, data=str(folder), **FAST)


def test_cli(tmp_path):
    outdir = tmp_path / "cli"
    result = run_cli("tune", EVIT, "-o", outdir, "--latency-budget-ms", "1000000", "--keep-rates", "0.7",
                     "--limit", "100", "--iterations", "3", "--warmup", "1", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    assert '"chosen": {"keep_rate": [0.7, 0.7, 0.7]' in result.stdout
    assert "[1/1] keep 0.7: FLOPs 0.683" in result.stderr
    missed = run_cli("tune", EVIT, "-o", tmp_path / "missed", "--latency-budget-ms", "0.000001", "--keep-rates", "0.7",
                     "--limit", "50", "--iterations", "2", "--warmup", "0", "--threads", "1")
    assert missed.exit_code == 4
    assert "no candidate meets p90" in assert_clean_failure(missed, tmp_path / "missed")
    bad = run_cli("tune", EVIT, "-o", tmp_path / "bad", "--latency-budget-ms", "5", "--keep-rates", "0.5,x")
    assert "expected comma-separated numbers" in assert_clean_failure(bad, tmp_path / "bad")
    for args, message in ((["--graph", "fast"], "Invalid value for '--graph'"),
                          (["--graph", "optimized", "--backend", "torch"], "use --backend ort")):
        bad = run_cli("tune", EVIT, "-o", tmp_path / "bad", "--latency-budget-ms", "5", *args)
        assert message in assert_clean_failure(bad, tmp_path / "bad")
    portable = run_cli("tune", EVIT, "-o", tmp_path / "portable", "--latency-budget-ms", "1000000", "--keep-rates", "0.7",
                       "--limit", "50", "--iterations", "2", "--warmup", "0", "--threads", "1", "--graph", "portable")
    assert portable.exit_code == 0, portable.stderr
    assert "(portable graph)" in portable.stderr and read_json(tmp_path / "portable" / "tune.json")["graph"] == "portable"


# --- A-ViT: candidates whose token budgets are calibrated on other images than the tuning ones ---

AVIT = Path(__file__).resolve().parents[1] / "models" / "fmnist-avit.safetensors"


def test_avit_grid_is_calibrated_into_shrinking_budgets():
    """The family's grid through its calibration hook, on the default calibration set (train images)."""
    from vitedge.data.calibration_sets import calibration_array, load_calibration_set
    from vitedge.data import InputSpec
    from vitedge.families.avit import TUNING_QUANTILES
    from vitedge.load import load_model

    loaded = load_model(AVIT)
    family, cfg = loaded.family, loaded.cfg
    grid = [family.resolve_settings(cfg, {**loaded.settings, **s}) for s in family.tuning_candidates(cfg, loaded.settings)]
    assert grid[0]["token_budgets"] is None and "budget_quantile" not in grid[0]  # the masked graph first
    spec = InputSpec(cfg.img_size, cfg.in_chans, tuple(loaded.mean), tuple(loaded.std))
    images = calibration_array(load_calibration_set(), spec)
    resolved = family.calibrate_candidates(loaded.model, cfg, grid, images)
    assert resolved[0] == grid[0]
    assert [s["budget_quantile"] for s in resolved[1:]] == list(TUNING_QUANTILES)
    budgets = [s["token_budgets"] for s in resolved[1:]]
    for higher, lower in zip(budgets, budgets[1:]):  # a lower quantile never needs more tokens in any block
        assert all(b <= a for a, b in zip(higher, lower))
    assert sum(budgets[-1]) < sum(budgets[0]) < cfg.depth * (cfg.num_patches + 1)


@pytest.fixture(scope="module")
def tuned_avit(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("tune") / "avit"
    quantiles = [{"budget_quantile": 1.0}, {"budget_quantile": 0.95}]
    summary = vitedge.tune(AVIT, outdir, latency_budget_ms=1e6, candidates=quantiles, **{**FAST, "limit": 200})
    return outdir, summary


def test_avit_candidates_record_their_quantile_and_calibrated_budgets(tuned_avit):
    outdir, summary = tuned_avit
    candidates = summary["candidates"]
    assert [c["label"] for c in candidates] == ["q 1", "q 0.95"]
    for c in candidates:
        assert c["error"] is None and c["top1_agreement"] >= 0.99
        assert c["calibrated"] == {"token_budgets": c["settings"]["token_budgets"]}
    high, low = (c["settings"]["token_budgets"] for c in candidates)
    assert all(b <= a for a, b in zip(high, low)) and sum(low) < sum(high)
    assert candidates[1]["flops_ratio"] < candidates[0]["flops_ratio"] < 1.0
    calibration = summary["calibration"]
    assert (calibration["name"], calibration["split"], calibration["images"]) == ("fmnist-train-512", "train", 512)
    assert read_json(outdir / "report.json")["tune"]["calibration"] == calibration
    table = (outdir / "tune.md").read_text()
    assert "Calibrated on fmnist-train-512 (512 fashion-mnist train images" in table
    assert f"- q 0.95: token_budgets {' '.join(map(str, low))}" in table


def test_avit_winner_is_a_valid_fixed_budget_export(tuned_avit):
    import onnx

    from vitedge.check import check_model

    outdir, summary = tuned_avit
    meta = read_json(outdir / "vitedge.json")
    chosen = summary["chosen"]
    assert meta["settings"] == chosen["settings"] and meta["settings"]["budget_quantile"] in (1.0, 0.95)
    budgets = meta["settings"]["token_budgets"]
    assert [b["attention"] for b in meta["token_budgets"]["tokens_per_block"]] == budgets
    assert vitedge.check(outdir)["passed"] and read_json(outdir / "report.json")["validate"]["passed"]
    tokens = (meta["arch"]["img_size"] // meta["arch"]["patch_size"]) ** 2 + 1
    shrinking = [b - 1 for previous, b in zip([tokens] + budgets, budgets) if b < previous]
    assert check_model(onnx.load(str(outdir / "model.onnx"))).topk_k == shrinking and shrinking  # constant K per cut
    dataset = load_dataset("fashion-mnist", 200)
    images = np.concatenate([batch for batch, _ in dataset.batches(input_spec(meta), 100)])
    accuracy = float((vitedge.predict(outdir, images, threads=1).argmax(1) == dataset.labels).mean())
    assert accuracy == pytest.approx(chosen["accuracy"])


@pytest.mark.parametrize("candidates, calib, message", [
    ([{"budget_quantile": 1.5}], None, r"quantile must be in \(0, 1\], got 1.5"),
    ([{"budget_quantile": "x"}], None, r"quantile must be a number in \(0, 1\], got 'x'"),
    ([{"budget_quantile": 0.9}], "no-such-set", "unknown calibration set 'no-such-set'"),
    ([{"budget_quantile": 0.9}], "TEST_SPLIT", "calibration set 'fmnist-test' holds the images accuracy is ranked on"),
])
def test_avit_bad_calibration_input_fails_before_anything_is_written(tmp_path, candidates, calib, message):
    if calib == "TEST_SPLIT":
        calib = tmp_path / "fmnist-test.yaml"
        calib.write_text("source: fashion-mnist\nsplit: test\ncount: 64\npreprocess: {size: 28, channels: 1}\n")
    outdir = tmp_path / "out"
    with pytest.raises(VitedgeError, match=message):
        vitedge.tune(AVIT, outdir, 10.0, candidates=candidates, **FAST, **({"calib": str(calib)} if calib else {}))
    assert not outdir.exists()


def test_budget_quantile_is_an_avit_setting_only(tmp_path):
    with pytest.raises(VitedgeError, match="family 'evit' has no setting budget_quantile"):
        vitedge.tune(EVIT, tmp_path / "out", 10.0, candidates=[{"budget_quantile": 0.9}], **FAST)
    assert not (tmp_path / "out").exists()


def test_cli_avit_quantiles(tmp_path):
    outdir = tmp_path / "cli-avit"
    result = run_cli("tune", AVIT, "-o", outdir, "--latency-budget-ms", "1000000", "--quantiles", "0.98",
                     "--limit", "100", "--iterations", "3", "--warmup", "1", "--threads", "1", "--batch", "4")
    assert result.exit_code == 0, result.stderr
    assert '"budget_quantile": 0.98' in result.stdout
    assert "calibrating avit candidates on fmnist-train-512 (512 images)" in result.stderr
    assert "[1/1] q 0.98: FLOPs" in result.stderr
    both = run_cli("tune", AVIT, "-o", tmp_path / "both", "--latency-budget-ms", "5", "--keep-rates", "0.5",
                   "--quantiles", "0.9")
    assert "family 'avit' has no setting keep_rate" in assert_clean_failure(both, tmp_path / "both")
    bad = run_cli("tune", AVIT, "-o", tmp_path / "bad", "--latency-budget-ms", "5", "--quantiles", "0.9,high")
    assert "'--quantiles': expected comma-separated numbers" in assert_clean_failure(bad, tmp_path / "bad")
    test_split = tmp_path / "fmnist-test.yaml"
    test_split.write_text("source: fashion-mnist\nsplit: test\npreprocess: {size: 28, channels: 1}\n")
    leak = run_cli("tune", AVIT, "-o", tmp_path / "leak", "--latency-budget-ms", "5", "--calib", test_split)
    assert "holds the images accuracy is ranked on" in assert_clean_failure(leak, tmp_path / "leak")
