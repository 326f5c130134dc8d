"""benchmarks/bench_gpu.py on the CPU: the record it writes and the arguments it refuses (the timed run needs a GPU)."""

from __future__ import annotations

import json
import sys

import pytest

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_gpu as bench  # noqa: E402


def test_cpu_smoke_run_records_latency_ratios_and_agreement_per_variant(tmp_path):
    output = tmp_path / "gpu.json"
    bench.main(["--device", "cpu", "--quick", "--arch", "vit_fmnist", "--families", "evit,tome", "--batches", "2",
                "--output", str(output)])
    record = json.loads(output.read_text())
    assert set(record["families"]) == {"evit", "tome"} and "failed" not in record
    for family in record["families"].values():
        run = family["runs"]["fp32/b2"]
        assert set(run["median_ms"]) == {"official", "static", "dense"}  # no CUDA graphs on the CPU
        assert all(ms > 0 for ms in run["median_ms"].values())
        assert run["ratios"]["official"]["vs_official"] == pytest.approx(1.0)
        low, high = run["ratios"]["static"]["vs_official_ci95"]
        assert low <= run["ratios"]["static"]["vs_official"] <= high
        # the static rewrite computes what the official model does on these images
        assert run["fidelity"]["static"]["top1_agreement"] == 1.0
        assert run["fidelity"]["static"]["max_abs_logit_diff"] < 1e-3
    assert "| EViT keep 0.7 | fp32 | 2 |" in bench.markdown(record)


@pytest.mark.parametrize("argv, message", [
    (["--families", "evit,nope"], "unknown families ['nope']"),
    (["--batches", "0"], "must be >= 1"),
    (["--batches", "16", "--agreement-images", "8"], "at least the largest batch"),
])
def test_refuses_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        bench.parse(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_render_only_without_a_record_says_so(tmp_path):
    with pytest.raises(SystemExit, match="does not exist; run the benchmark first"):
        bench.main(["--render-only", "--output", str(tmp_path / "missing.json")])
