"""Variant bundles: export-bundle (every variant a normal, validated artifact), select, profile-bundle, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support import HEADS, REPO, assert_clean_failure, make_supervit_state, read_json, run_cli

import vitedge
from vitedge.bundle import BUNDLE_THRESHOLDS, local_device
from vitedge.errors import BudgetMissed, VitedgeError


@pytest.fixture(scope="module")
def supervit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle-ckpt") / "super_deit_fmnist.pth"
    torch.save({"model": make_supervit_state(seed=21)}, path)
    return path


@pytest.fixture(scope="module")
def bundle_export(tmp_path_factory, supervit_ckpt):
    """Two sizes x two keep rates of an official-layout checkpoint, through the CLI."""
    out = tmp_path_factory.mktemp("bundles") / "supervit"
    result = run_cli("export-bundle", supervit_ckpt, "-o", out, "--num-heads", HEADS, "--sizes", "16,28",
                     "--keep-rates", "0.5,1", "--validate-limit", "64", "--iterations", "3")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def bundle(bundle_export):
    return bundle_export[0]


def test_bundle_lists_every_variant_with_flops_latency_and_accuracy(bundle_export):
    out, result = bundle_export
    meta = read_json(out / "vitedge.json")
    assert meta["kind"] == "bundle" and meta["family"] == "supervit"
    assert meta["devices"] == [local_device()]
    names = [v["name"] for v in meta["variants"]]
    assert names == ["16px-keep0.5", "16px-keep1", "28px-keep0.5", "28px-keep1"]
    assert sorted(p.name for p in out.iterdir()) == [*names, "vitedge.json"]
    for v in meta["variants"]:
        assert v["latency_ms"][local_device()]["p50_ms"] > 0
        assert 0 <= v["accuracy"] <= 1
        assert v["validation"]["passed"] and v["validation"]["top1_agreement"] == 1.0
        assert v["validation"]["max_abs_logit_diff"] <= 1e-4 and v["validation"]["images"] == 64
        assert 0 < v["flops"]["ratio"] <= 1
    ratios = {v["name"]: v["flops"]["ratio"] for v in meta["variants"]}
    assert ratios["28px-keep1"] == 1.0 and ratios["16px-keep0.5"] < ratios["16px-keep1"] < ratios["28px-keep0.5"] < 1
    assert [v["tokens_after_selections"] for v in meta["variants"]] == [[10, 6, 4], [], [26, 14, 8], []]
    # The user feeds every variant the same full-size tensor; the graph resizes.
    assert meta["input"]["shape"] == [1, 1, 28, 28]
    assert "feed every variant the same tensor" in meta["preprocessing"]
    assert meta["validation"]["thresholds"] == vars(BUNDLE_THRESHOLDS)
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith("16px-keep0.5") and "accuracy" in lines[0]


def test_every_variant_is_a_normal_artifact(bundle):
    for name, size in [("16px-keep0.5", 16), ("28px-keep1", 28)]:
        variant = bundle / name
        meta = read_json(variant / "vitedge.json")
        assert meta["settings"]["resolution"] == size
        assert meta["input"]["shape"] == [1, 1, 28, 28]
        assert meta["input"]["resize"] == {"in_graph": size != 28, "to": size, "mode": "bilinear",
                                           "align_corners": True, "antialias": False}
        assert run_cli("check", variant).exit_code == 0
        assert read_json(variant / "report.json")["validate"]["passed"]
    result = run_cli("validate", bundle / "16px-keep0.5", "--limit", "16")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1_agreement"] == 1.0


def test_single_artifact_commands_point_at_the_variants(bundle):
    line = assert_clean_failure(run_cli("check", bundle))
    assert "is a variant bundle; pass one of its variant folders (16px-keep0.5" in line


def _with_numbers(bundle, tmp_path, numbers):
    """A copy of ``bundle`` whose recorded latencies / accuracies are set to ``numbers`` (name → (ms, acc))."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    meta = read_json(copy / "vitedge.json")
    for v in meta["variants"]:
        ms, acc = numbers[v["name"]]
        v["latency_ms"][local_device()]["p50_ms"] = ms
        v["accuracy"] = acc
    (copy / "vitedge.json").write_text(json.dumps(meta))
    return copy


NUMBERS = {"16px-keep0.5": (1.0, 0.70), "16px-keep1": (2.0, 0.75), "28px-keep0.5": (3.0, 0.80), "28px-keep1": (4.0, 0.79)}


@pytest.mark.parametrize("budget, expected", [(1.0, "16px-keep0.5"), (2.5, "16px-keep1"), (3.0, "28px-keep0.5"),
                                              (100, "28px-keep0.5")])
def test_select_picks_the_most_accurate_variant_within_budget(bundle, tmp_path, budget, expected):
    copy = _with_numbers(bundle, tmp_path, NUMBERS)
    chosen = vitedge.select(copy, latency_ms=budget)
    assert chosen["name"] == expected and chosen["path"] == str(copy / expected)
    assert chosen["ranked_by"] == "accuracy" and chosen["device"] == local_device()
    result = run_cli("select", copy, "--latency-ms", budget)
    assert result.exit_code == 0 and result.stdout.strip() == str(copy / expected)


def test_select_ties_go_to_the_faster_variant_and_missing_accuracy_ranks_by_flops(bundle, tmp_path):
    copy = _with_numbers(bundle, tmp_path, {**NUMBERS, "16px-keep1": (2.0, 0.80)})
    assert vitedge.select(copy, latency_ms=10)["name"] == "16px-keep1"
    copy2 = _with_numbers(bundle, tmp_path / "no-accuracy", {k: (v[0], None) for k, v in NUMBERS.items()})
    chosen = vitedge.select(copy2, latency_ms=3.5)
    assert chosen["name"] == "28px-keep0.5" and chosen["ranked_by"] == "flops"


def test_budget_nothing_meets_names_the_fastest_variant(bundle, tmp_path):
    copy = _with_numbers(bundle, tmp_path, NUMBERS)
    with pytest.raises(BudgetMissed, match=r"no variant meets 0.5 ms on .*; the fastest, 16px-keep0.5, takes 1.000 ms"):
        vitedge.select(copy, latency_ms=0.5)
    result = run_cli("select", copy, "--latency-ms", "0.5")
    assert result.exit_code == 4
    assert_clean_failure(result)


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_budget_must_be_positive(bundle, budget):
    line = assert_clean_failure(run_cli("select", bundle, "--latency-ms", budget))
    assert "latency budget must be > 0 ms" in line


def test_device_labels(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    line = assert_clean_failure(run_cli("select", copy, "--latency-ms", "5", "--device", "jetson-orin-nano"))
    assert "no latencies for device 'jetson-orin-nano'" in line and local_device() in line
    result = run_cli("profile-bundle", copy, "--device", "jetson-orin-nano", "--iterations", "2")
    assert result.exit_code == 0, result.output
    meta = read_json(copy / "vitedge.json")
    assert meta["devices"] == [local_device(), "jetson-orin-nano"]
    assert all("jetson-orin-nano" in v["latency_ms"] for v in meta["variants"])
    line = assert_clean_failure(run_cli("select", copy, "--latency-ms", "1000"))
    assert "several devices" in line
    assert vitedge.select(copy, latency_ms=1000, device="jetson-orin-nano")["device"] == "jetson-orin-nano"


def test_optimized_bundle_times_each_variant_on_the_graph_it_proved(supervit_ckpt, tmp_path):
    out = tmp_path / "optimized"
    result = run_cli("export-bundle", supervit_ckpt, "-o", out, "--num-heads", HEADS, "--sizes", "28",
                     "--keep-rates", "0.5,1", "--validate-limit", "32", "--iterations", "3", "--optimize")
    assert result.exit_code == 0, result.output
    meta = read_json(out / "vitedge.json")
    for variant in meta["variants"]:
        entry = read_json(out / variant["path"] / "vitedge.json")["optimized"]["ort"]
        assert entry["passes"]["attention"] > 0 and entry["fidelity"]["passed"]
        written = entry["written"] and (out / variant["path"] / "model.ort.onnx").is_file()
        # timed on model.ort.onnx exactly where optimize wrote it (proven and faster), else on model.onnx
        assert variant["latency_ms"][local_device()]["graph"] == ("optimized" if written else "portable")
    result = run_cli("profile-bundle", out, "--graph", "portable", "--iterations", "2", "--device", "portable-only")
    assert result.exit_code == 0, result.output
    assert {v["latency_ms"]["portable-only"]["graph"] for v in read_json(out / "vitedge.json")["variants"]} == {"portable"}


def test_profile_bundle_refuses_an_optimized_graph_nobody_wrote(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    line = assert_clean_failure(run_cli("profile-bundle", copy, "--graph", "optimized", "--iterations", "2"))
    assert "has no model.ort.onnx" in line and "run 'vitedge optimize" in line
    assert read_json(copy / "vitedge.json") == read_json(bundle / "vitedge.json")  # nothing recorded


def test_select_on_a_single_artifact_is_refused(bundle):
    line = assert_clean_failure(run_cli("select", bundle / "16px-keep1", "--latency-ms", "5"))
    assert "is a single artifact, not a variant bundle" in line


# ---------------------------------------------------------------- bad input to export-bundle


@pytest.mark.parametrize("args, message", [
    (["--sizes", "16,18"], "input size 18 has no position embedding in this model; use one of 16, 20, 24, 28 px"),
    (["--keep-rates", "0.5,0.6"], "keep rate 0.6 is not one this model was trained for; use one of (0.5, 0.7, 1.0)"),
    (["--sizes", "16,16"], "listed twice"),
    (["--sizes", "16,x"], "expected comma-separated numbers"),
    (["--sizes", ","], "a bundle needs at least one value of resolution"),
    (["--device", "a/b"], "device name must be"),
])
def test_bad_variant_grid_writes_nothing(supervit_ckpt, tmp_path, args, message):
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export-bundle", supervit_ckpt, "-o", out, "--num-heads", HEADS, *args), out)
    assert message in line
    assert not out.exists()


def test_existing_bundle_is_not_overwritten(bundle, supervit_ckpt):
    before = (bundle / "vitedge.json").read_bytes()
    line = assert_clean_failure(run_cli("export-bundle", supervit_ckpt, "-o", bundle, "--num-heads", HEADS,
                                        "--sizes", "16", "--keep-rates", "1"))
    assert "already holds 16px-keep1; remove them or write the bundle to another folder" in line
    assert (bundle / "vitedge.json").read_bytes() == before


def test_checkpoint_of_another_family_is_refused(evit_ckpt, tmp_path):
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export-bundle", evit_ckpt, "-o", out, "--num-heads", HEADS), out)
    assert "is not a 'supervit' checkpoint" in line and "pos_embed_list.0" in line
    evit_model = REPO / "models" / "fmnist-evit.safetensors"
    line = assert_clean_failure(run_cli("export-bundle", evit_model, "-o", out), out)
    assert "is a 'evit' checkpoint; variant bundles are for supervit checkpoints" in line


def test_failed_variant_leaves_no_bundle(supervit_ckpt, tmp_path):
    """A threshold no graph can meet (0 logit error is not reachable in float32) fails the whole bundle."""
    out = tmp_path / "out"
    with pytest.raises(VitedgeError, match="variant 16px-keep0.5: validation failed"):
        vitedge.export_bundle(supervit_ckpt, out, values={"resolution": [16], "keep_rate": [0.5]}, num_heads=HEADS, validate_limit=8,
                              iterations=1, thresholds={"max_abs_logit_diff": 0.0}, log=lambda m: None)
    assert not out.exists()


# ---------------------------------------------------------------- the bundled Fashion-MNIST model


def test_bundled_fmnist_supervit(tmp_path):
    path = REPO / "models" / "fmnist-supervit.safetensors"
    if not path.is_file():
        pytest.skip(f"{path.relative_to(REPO)} is missing; train it with 'python scripts/train_fmnist.py supervit'")
    meta = vitedge.export_bundle(path, tmp_path / "b", values={"resolution": [16, 28], "keep_rate": [0.5, 1.0]},
                                 validate_limit=512, iterations=2, log=lambda m: None)
    accuracy = {v["name"]: v["accuracy"] for v in meta["variants"]}
    assert all(v["validation"]["top1_agreement"] >= 0.998 for v in meta["variants"])
    assert all(v["validation"]["max_abs_logit_diff"] <= 1e-4 for v in meta["variants"])
    assert accuracy["28px-keep1"] > 0.8 and accuracy["16px-keep0.5"] > 0.6  # trained for every variant
