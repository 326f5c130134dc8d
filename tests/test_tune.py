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
from vitedge.tune import Candidate, choose, pareto_front
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
    assert sorted(p.name for p in outdir.iterdir()) == sorted(
        ["model.onnx", "vitedge.json", "report.json", "report.md", "tune.json", "tune.md", "tune_pareto.png"])
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
