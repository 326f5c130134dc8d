"""vitedge.profile: latency percentiles into report.json for ONNX Runtime and eager PyTorch.

No assertion on wall time (shared machine): only on what is recorded and how.
"""

from __future__ import annotations

import pytest
from support import copy_artifact, read_json, run_cli

import vitedge
from vitedge.errors import VitedgeError
from vitedge.profile import latency_stats


@pytest.fixture
def art(evit_artifact, tmp_path):
    return copy_artifact(evit_artifact, tmp_path / "art")


def _assert_stats(result, backend, iterations):
    assert result["backend"] == backend and result["batch"] == 1 and result["threads"] == 1
    assert result["iterations"] == iterations
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    assert result["throughput_img_s"] == pytest.approx(1000.0 / result["p50_ms"])


def test_ort_then_torch_both_land_in_the_report(art):
    ort = vitedge.profile(art, "ort", iterations=5, warmup=1, threads=1)
    _assert_stats(ort, "ort", 5)
    torch_result = vitedge.profile(art, "torch", iterations=4, warmup=1, threads=1)
    _assert_stats(torch_result, "torch", 4)
    report = read_json(art / "report.json")
    assert set(report["profile"]) == {"ort", "torch"}  # the second run keeps the first
    assert report["profile"]["ort"]["p99_ms"] == ort["p99_ms"]
    assert report["check"]["passed"] and report["validate"]["passed"]  # other sections kept
    assert "## Profile" in (art / "report.md").read_text()


def test_dynamic_batch_is_not_needed_for_torch_but_is_for_ort(art):
    with pytest.raises(VitedgeError, match="exported for batch 1; profile with --batch 1 or re-export with --dynamic-batch"):
        vitedge.profile(art, "ort", batch=4, iterations=1, warmup=0)
    assert vitedge.profile(art, "torch", batch=2, iterations=1, warmup=0, threads=1)["batch"] == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "tensorrt"}, "unknown backend 'tensorrt'"),
    ({"iterations": 0}, "iterations must be >= 1"),
    ({"warmup": -1}, "warmup >= 0"),
    ({"batch": -2}, "batch must be >= 1"),
    ({"batch": 0}, "batch must be >= 1"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"backend": "torch", "threads": 0}, "threads must be >= 1"),
])
def test_bad_arguments(evit_artifact, kwargs, message):
    with pytest.raises(VitedgeError, match=message):
        vitedge.profile(evit_artifact, **{"iterations": 1, "warmup": 0, **kwargs})


def test_cli_prints_percentiles(art):
    result = run_cli("profile", art, "--iterations", "3", "--warmup", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ort batch 1 (1 threads): p50 ") and "p99" in result.stdout
    assert read_json(art / "report.json")["profile"]["ort"]["iterations"] == 3


def test_latency_stats():
    stats = latency_stats([float(v) for v in range(1, 101)], batch=4)
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["min_ms"] == 1.0 and stats["mean_ms"] == 50.5
    assert stats["throughput_img_s"] == pytest.approx(4000.0 / 50.5)
    assert stats["cv"] == pytest.approx(28.866 / 50.5, rel=1e-3)
