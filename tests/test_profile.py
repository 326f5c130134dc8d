"""vitedge.profile: latency percentiles into report.json for ONNX Runtime and eager PyTorch.

No assertion on wall time (shared machine): only on what is recorded and how.
"""

from __future__ import annotations

import pytest
from support import assert_clean_failure, copy_artifact, read_json, run_cli

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


# ---------------------------------------------------------------- devices, budgets, histogram


def test_budget_pass_records_verdict_histogram_and_markdown(art):
    result = vitedge.profile(art, "ort", iterations=8, warmup=1, threads=1, latency_budget_ms=10_000, budget_stat="p90")
    budget = result["budget"]
    assert budget == {"budget_ms": 10_000.0, "statistic": "p90", "measured_ms": result["p90_ms"],
                      "margin_ms": pytest.approx(10_000 - result["p90_ms"]), "passed": True}
    png = (art / "profile_ort.png").read_bytes()
    assert result["histogram"] == "profile_ort.png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(art / "profile_ort.png")).shape[:2] == (360, 640)
    assert read_json(art / "report.json")["profile"]["ort"]["budget"]["passed"] is True
    assert "- ort: **PASS**, p90" in (art / "report.md").read_text()


def test_budget_miss_exits_4_after_writing_the_report(art):
    result = run_cli("profile", art, "--iterations", "3", "--warmup", "0", "--threads", "1",
                     "--device", "x86-cpu", "--latency-budget-ms", "0.001")
    assert result.exit_code == 4
    assert result.stdout.startswith("ort batch 1 (1 threads): p50 ")
    assert "budget 0.001 ms (p99): FAIL" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("vitedge: error:")]
    assert errors == [result.stderr.splitlines()[-1]]
    assert "ort p99 latency" in errors[0] and "over the 0.001 ms budget of x86-cpu" in errors[0]
    section = read_json(art / "report.json")["profile"]["ort"]
    assert section["device"] == "x86-cpu" and section["budget"]["passed"] is False
    assert "- ort on x86-cpu: **FAIL**" in (art / "report.md").read_text()
    assert (art / "profile_ort.png").is_file()


def test_budget_defaults_from_the_device_profile(art, tmp_path):
    (tmp_path / "slow-cpu.yaml").write_text(
        "name: slow-cpu\ndescription: a CPU with a generous budget\nplatform: x86\nbackends: [ort, torch]\n"
        "precisions: [fp32]\nlatency_budget_ms: 60000\n")
    result = vitedge.profile(art, "ort", iterations=3, warmup=0, threads=1, device="slow-cpu", devices_dir=tmp_path)
    assert result["device"] == "slow-cpu" and result["budget"]["budget_ms"] == 60000.0 and result["budget"]["passed"]
    shipped = vitedge.profile(art, "torch", iterations=2, warmup=0, threads=1, device="x86-cpu", histogram=False)
    assert shipped["budget"]["budget_ms"] == 33.3 and "histogram" not in shipped


@pytest.mark.parametrize("args, message", [
    (["--latency-budget-ms", "0"], "the latency budget must be > 0 ms, got 0.0"),
    (["--latency-budget-ms", "-5"], "the latency budget must be > 0 ms, got -5.0"),
    (["--device", "orin-nano"], "unknown device 'orin-nano'; known devices: agx-orin-64gb, orin-nano-8gb,"),
    (["--device", "orin-nano-8gb"], "device 'orin-nano-8gb' runs trt, not ort: use --backend trt"),
    (["--backend", "trt"], "model.plan is missing; run 'vitedge build"),
    (["--budget-stat", "max"], "Invalid value for '--budget-stat'"),
])
def test_bad_profile_input_is_one_line(art, args, message):
    before = read_json(art / "report.json")
    result = run_cli("profile", art, "--iterations", "1", "--warmup", "0", *args)
    line = assert_clean_failure(result)
    assert result.exit_code == 2 and message in line
    assert read_json(art / "report.json") == before and not (art / "profile_ort.png").exists()


def test_check_budget():
    from vitedge.profile import check_budget

    stats = latency_stats([1.0, 2.0, 3.0, 4.0], batch=1)
    assert check_budget(stats, None) is None
    assert check_budget(stats, 3.0, "p50")["passed"] is True
    assert check_budget(stats, 3.0, "p99")["passed"] is False
    assert check_budget(stats, 2.5, "mean") == {"budget_ms": 2.5, "statistic": "mean", "measured_ms": 2.5,
                                                  "margin_ms": 0.0, "passed": True}


def test_trt_refuses_a_plan_from_an_older_export(art):
    """A re-export replaces vitedge.json (no engine section) but not model.plan: profiling must not time the old graph."""
    (art / "model.plan").write_bytes(b"an engine built before the last export")
    line = assert_clean_failure(run_cli("profile", art, "--backend", "trt", "--iterations", "1"))
    assert "model.plan was not built from this export (vitedge.json has no engine section)" in line
