"""vitedge.validate: ORT vs the reference on real Fashion-MNIST images, thresholds, and provenance."""

from __future__ import annotations

import dataclasses
import math
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from support import REPO, copy_artifact, make_state_dict, official_dynamicvit_keys, official_vit_keys, read_json, run_cli

import vitedge
from vitedge.backbone import ARCHS
from vitedge.data import load_dataset
from vitedge.errors import ValidationFailed, VitedgeError
from vitedge.families import tome
from vitedge.families.dynamicvit import DynamicViTFamily
from vitedge.load import load_model
from vitedge.tokens import recording_margins
from vitedge.validate import NEAR_TIE_ULPS, SelectionMargins, Thresholds, compare, kept_agreement, verdict


@pytest.fixture
def art(artifact, tmp_path):
    """A writable copy of each family's artifact."""
    return copy_artifact(artifact, tmp_path / "art")


def test_agreement_is_perfect_on_fashion_mnist(art):
    section = vitedge.validate(art, "fashion-mnist", limit=96, batch_size=32)
    assert section["passed"] and section["failures"] == []
    assert section["images"] == 96 and section["data"] == "fashion-mnist"
    assert section["top1_agreement"] == 1.0
    assert section["kept_agreement"] == {"kept_tokens_3": 1.0, "kept_tokens_6": 1.0, "kept_tokens_9": 1.0}
    assert 0 < section["max_abs_logit_diff"] < 1e-3
    assert section["reference_accuracy"] == section["exported_accuracy"]
    stored = read_json(art / "report.json")["validate"]
    assert stored["passed"] is True and stored["images"] == 96


def test_impossible_logit_threshold_fails_with_the_report_written(art):
    with pytest.raises(ValidationFailed, match=r"max \|logit diff\| .* > 0") as info:
        vitedge.validate(art, limit=32, thresholds={"max_abs_logit_diff": 0.0})
    assert info.value.exit_code == 3
    stored = read_json(art / "report.json")["validate"]
    assert stored["passed"] is False
    assert stored["max_abs_logit_diff"] > 0 and stored["top1_agreement"] == 1.0
    assert stored["thresholds"]["max_abs_logit_diff"] == 0.0
    assert "- failure: max |logit diff|" in (art / "report.md").read_text()


def test_thresholds_come_from_vitedge_json(art):
    meta = read_json(art / "vitedge.json")
    meta["validation"]["min_top1_agreement"] = 1.01
    (art / "vitedge.json").write_text(json.dumps(meta))
    with pytest.raises(ValidationFailed, match="top-1 agreement 1.0000 < 1.01"):
        vitedge.validate(art, limit=16)


def test_tampered_graph_weights_are_caught(evit_artifact, tmp_path):
    """Corrupt the exported classifier bias: the graph no longer computes the reference model."""
    art = copy_artifact(evit_artifact, tmp_path / "art")
    proto = onnx.load(str(art / "model.onnx"))
    (bias,) = [init for init in proto.graph.initializer if list(init.dims) == [10]]
    values = numpy_helper.to_array(bias).copy()
    values[3] += 100.0  # every image now "is" class 3
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(art / "model.onnx"))
    with pytest.raises(ValidationFailed, match="top-1 agreement") as info:
        vitedge.validate(art, limit=32)
    assert "max |logit diff|" in str(info.value)
    assert read_json(art / "report.json")["validate"]["passed"] is False


def test_other_checkpoint_is_refused_by_sha256(art, tmp_path):
    """Same family, same layout, other weights: validating against it would compare the wrong model."""
    family = read_json(art / "vitedge.json")["family"]
    other = tmp_path / "other.pth"
    torch.save({"model": make_state_dict(family, seed=11)}, other)
    with pytest.raises(VitedgeError, match="is not the checkpoint this artifact was exported from .sha256 differs"):
        vitedge.validate(art, limit=8, checkpoint=other)
    assert "validate" in read_json(art / "report.json")  # the export's section, untouched
    assert read_json(art / "report.json")["validate"]["images"] == 128


def test_moved_checkpoint_is_accepted(evit_artifact, evit_ckpt, tmp_path):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    moved = tmp_path / "elsewhere" / "renamed.pth"
    moved.parent.mkdir()
    shutil.copy(evit_ckpt, moved)
    assert vitedge.validate(art, limit=8, checkpoint=moved)["passed"]


def test_image_folder_source(evit_artifact, tmp_path):
    """Real Fashion-MNIST images saved as PNG files in class folders validate like the IDX set; folders named by
    class index give accuracy, folders that are not the model's classes are refused in one line."""
    art = copy_artifact(evit_artifact, tmp_path / "art")
    dataset = load_dataset("fashion-mnist", limit=12)
    root, named = tmp_path / "images", tmp_path / "named"
    for i, (image, label) in enumerate(zip(dataset.images, dataset.labels)):
        for folder in (root / str(label), named / ("shoes" if label in (5, 7, 9) else "other")):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    section = vitedge.validate(art, str(root))
    assert section["passed"] and section["images"] == 12 and section["data"] == "images" and section["in_domain"]
    reference = vitedge.validate(copy_artifact(evit_artifact, tmp_path / "idx"), "fashion-mnist", limit=12)
    assert section["reference_accuracy"] == reference["reference_accuracy"]  # the folder labels are the IDX labels
    with pytest.raises(VitedgeError, match="has 2 class folders .* but this model has 10 classes"):
        vitedge.validate(art, str(named))


@pytest.mark.parametrize("kwargs, message", [
    ({"data": "imagenet"}, "neither 'fashion-mnist' nor an image folder"),
    ({"limit": 0}, "image limit must be positive"),
    ({"thresholds": {"min_top1": 0.9}}, "unknown validation threshold"),
    ({"batch_size": 0}, "batch size and threads must be >= 1"),
    ({"batch_size": -3}, "batch size and threads must be >= 1"),
])
def test_bad_arguments(evit_artifact, kwargs, message):
    with pytest.raises(VitedgeError, match=message):
        vitedge.validate(evit_artifact, **{"limit": 8, **kwargs})


def test_not_an_artifact(tmp_path):
    with pytest.raises(VitedgeError, match="not a vitedge artifact folder"):
        vitedge.validate(tmp_path)


def test_kept_agreement_compares_sets_not_order():
    ref = np.array([[3, 1, 2], [4, 5, 6]])
    assert kept_agreement(ref, np.array([[1, 2, 3], [4, 5, 7]])).tolist() == [True, False]


def test_thresholds_from_dict():
    assert Thresholds.from_dict(None) == Thresholds()
    assert Thresholds.from_dict({"max_abs_logit_diff": None}).max_abs_logit_diff is None


def test_logit_bound_is_taken_where_every_selection_agrees():
    """A near-tie that picks another token moves that image's logits; the kept-token threshold
    bounds how often, the logit bound holds on the rest (and the all-image maximum is kept)."""
    from vitedge.validate import compare

    reference = np.zeros((4, 3), np.float32)
    exported = reference + np.float32(1e-6)
    exported[2] += 0.5  # image 2 kept other tokens at the second selection
    kept_a = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    kept_b = kept_a.copy()
    kept_b[2] = [4, 9]
    metrics = compare(reference, exported, [kept_a, kept_a], [kept_a.copy(), kept_b], None, ["kept_tokens_3", "kept_tokens_6"])
    assert metrics["max_abs_logit_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert metrics["max_abs_logit_diff_all"] == pytest.approx(0.5, rel=1e-3)
    assert metrics["selections_identical"] == 0.75
    assert metrics["kept_agreement"] == {"kept_tokens_3": 1.0, "kept_tokens_6": 0.75}
    dense = compare(reference, exported, [], [], None, [])
    assert dense["max_abs_logit_diff"] == dense["max_abs_logit_diff_all"] == pytest.approx(0.5, rel=1e-3)


NAMES = ["kept_tokens_3", "kept_tokens_6"]


def _margins(gaps, tolerance=1e-6, swaps_only=True) -> SelectionMargins:
    return SelectionMargins(np.array(gaps, np.float64), np.full(len(gaps), tolerance), swaps_only)


def test_near_ties_are_counted_apart_and_real_disagreements_still_fail():
    """Image 1 parts ways at a near-tie (margin 1e-7 below the 1e-6 tolerance) and so differs at
    the next selection too; image 2 differs where the reference's margin was 0.5: a real
    disagreement, which the kept-token threshold must reject."""
    reference = np.zeros((4, 3), np.float32)
    exported = reference + np.float32(1e-6)
    exported[1:3] += 0.3  # the images that kept other tokens have other logits
    first = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    second = np.array([[0], [2], [4], [6]])
    first_exp, second_exp = first.copy(), second.copy()
    first_exp[1] = [2, 9]
    second_exp[1] = [9]
    second_exp[2] = [5]
    margins = [_margins([1.0, 1e-7, 1.0, 1.0]), _margins([1.0, 1.0, 0.5, 1.0])]
    metrics = compare(reference, exported, [first, second], [first_exp, second_exp], None, NAMES, margins=margins)
    assert metrics["kept_identical"] == {"kept_tokens_3": 0.75, "kept_tokens_6": 0.5}
    assert metrics["kept_agreement"] == {"kept_tokens_3": 1.0, "kept_tokens_6": 0.75}
    ties = metrics["near_ties"]
    assert ties["kept_tokens_3"] == {"count": 1, "from_earlier": 0, "largest_margin": pytest.approx(1e-7),
                                     "tolerance": 1e-6, "disagreements": 0}
    assert ties["kept_tokens_6"] == {"count": 1, "from_earlier": 1, "largest_margin": None,
                                     "tolerance": 1e-6, "disagreements": 1}
    assert metrics["near_tie_tolerance"]["ulps"] == NEAR_TIE_ULPS
    assert metrics["max_abs_logit_diff"] == pytest.approx(1e-6, rel=1e-3)  # images 0 and 3 only
    assert metrics["top1_agreement"] == 1.0
    assert verdict(metrics, Thresholds()) == ["kept_tokens_6 agreement 0.7500 < 0.999 (1 near-ties not counted)"]
    # the same differences with large margins everywhere: both selections fail
    wide = [_margins([1.0] * 4), _margins([1.0] * 4)]
    strict = compare(reference, exported, [first, second], [first_exp, second_exp], None, NAMES, margins=wide)
    assert strict["kept_agreement"] == {"kept_tokens_3": 0.75, "kept_tokens_6": 0.5}
    assert len(verdict(strict, Thresholds())) == 2


def test_a_near_tie_never_changes_how_many_tokens_a_top_k_keeps():
    """Swapping tied tokens keeps k of them; a graph that keeps one more or one fewer (an
    off-by-one K) disagrees on every image, however small the reference's margins."""
    reference = np.zeros((2, 3), np.float32)
    kept = np.array([[0, 1, 2], [3, 4, 5]])
    tiny = [_margins([0.0, 0.0])]
    for exported in (kept[:, :2], np.array([[0, 1, 2, 7], [3, 4, 5, 7]]), np.array([[0, 1, -1], [3, 4, -1]])):
        metrics = compare(reference, reference, [kept], [exported], None, NAMES[:1], margins=tiny)
        assert metrics["kept_agreement"] == {"kept_tokens_3": 0.0}, exported
        assert metrics["near_ties"]["kept_tokens_3"]["disagreements"] == 2
    # a halting threshold (swaps_only=False) can let one token more run: a near-tie there
    halting = compare(reference, reference, [kept], [np.array([[0, 1, 2], [3, 4, -1]])], None, NAMES[:1],
                      margins=[_margins([0.0, 0.0], swaps_only=False)])
    assert halting["kept_agreement"] == {"kept_tokens_3": 1.0} and halting["near_ties"]["kept_tokens_3"]["count"] == 1


def test_no_image_with_identical_selections_leaves_the_logit_bound_open():
    reference = np.zeros((2, 3), np.float32)
    kept = np.array([[0, 1], [2, 3]])
    metrics = compare(reference, reference + 0.5, [kept], [kept[:, ::-1] + 1], None, NAMES[:1], margins=[_margins([0.0, 0.0])])
    assert metrics["max_abs_logit_diff"] is None and metrics["max_abs_logit_diff_all"] == 0.5
    assert verdict(metrics, Thresholds()) == []


@pytest.mark.parametrize("family", ["evit", "dynamicvit", "evovit", "supervit", "tome", "avit", "ats", "castling"])
def test_every_reference_reports_one_margin_per_selection(family, fmnist_batch):
    """The bundled models' references under ``recording_margins``: one non-negative margin per
    image for each kept-token output, in output order (ATS: images run alone, then stacked)."""
    loaded = load_model(REPO / "models" / f"fmnist-{family}.safetensors")
    images = torch.from_numpy(fmnist_batch[0][:3])
    with torch.inference_mode(), recording_margins() as margins:
        _, kept = loaded.model.forward_tokens(images)
    assert len(margins) == len(kept) == len(loaded.plan.selections)
    for margin in margins:
        assert margin.gap.shape == margin.scale.shape == (3,)
        assert (margin.gap >= 0).all() and (margin.scale > 0).all()
        assert margin.swaps_only == (family not in ("avit", "ats"))


# --- acceptance: official-layout checkpoints with random weights at ImageNet shapes ---------------

ACCEPTANCE = {"dynamicvit": "deit_small", "tome": "deit_small", "evit": "deit_tiny"}
ACCEPTANCE_IMAGES = "8"  # 224 px models on two shared cores: a handful of images


def official_init_state(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official key layout, initialised the way the official constructors
    do (timm ``_init_weights``): weights ~ truncated N(0, 0.02), biases 0, LayerNorm gains 1.
    Such untrained models score most tokens alike, so near-ties are common."""
    cfg = ARCHS[ACCEPTANCE[family]]
    keys = official_dynamicvit_keys(cfg) if family == "dynamicvit" else official_vit_keys(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("bias"):
            state[key] = torch.zeros(shape)
        elif len(shape) == 1:  # LayerNorm gains (norm1/norm2/norm, the predictors' in_conv.0)
            state[key] = torch.ones(shape)
        else:
            state[key] = (0.02 * torch.randn(shape, generator=gen)).clamp(-0.04, 0.04)
    return state


@pytest.fixture(scope="module")
def official_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("official")
    paths = {}
    for family in ACCEPTANCE:
        paths[family] = root / f"{family}_{ACCEPTANCE[family]}.pth"
        torch.save({"model": official_init_state(family)}, paths[family])
    return paths


def _export(checkpoint, outdir, *args):
    return run_cli("export", checkpoint, "-o", outdir, "--family", Path(checkpoint).stem.split("_")[0],
                   "--validate-limit", ACCEPTANCE_IMAGES, *args)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ACCEPTANCE))
def test_official_layout_random_checkpoints_pass_the_default_validation(family, official_checkpoints, tmp_path):
    out = tmp_path / family
    result = _export(official_checkpoints[family], out)
    assert result.exit_code == 0, result.output
    meta = read_json(out / "vitedge.json")
    assert meta["validation"] == dataclasses.asdict(Thresholds())  # the defaults, nothing relaxed
    report = read_json(out / "report.json")["validate"]
    assert report["passed"] and report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] < 1e-4
    assert set(report["near_ties"]) == set(report["kept_agreement"]) == set(meta["outputs"][1:])
    assert all(t["disagreements"] == 0 for t in report["near_ties"].values())
    if family == "tome":
        # Fashion-MNIST's flat backgrounds make equal tokens: ToMe's matching meets exact ties,
        # which the old all-differences-fail rule counted as failures (the bug this fixes).
        again = vitedge.validate(out, "fashion-mnist", limit=8)
        assert again["passed"] and min(again["kept_identical"].values()) < 1.0
        assert sum(t["count"] - t["from_earlier"] for t in again["near_ties"].values()) >= 1
        assert max(t["largest_margin"] or 0.0 for t in again["near_ties"].values()) <= again["near_tie_tolerance"]["largest"]
        printed = json.loads(run_cli("validate", out, "--limit", "8").output.strip().splitlines()[-1])
        assert set(printed["near_ties"]) == set(again["near_ties"])  # the CLI's JSON line carries them too
        assert all(set(t) >= {"count", "from_earlier", "disagreements"} for t in printed["near_ties"].values())


@pytest.mark.slow
def test_an_off_by_one_k_fails_validation(official_checkpoints, tmp_path, monkeypatch):
    """The static graph keeps one token fewer at DynamicViT's last selection than the reference."""
    token_plan = DynamicViTFamily.token_plan

    def one_short(self, cfg, settings):
        plan = token_plan(self, cfg, settings)
        last = {**plan.selections[-1], "kept_patches": plan.selections[-1]["kept_patches"] - 1}
        return dataclasses.replace(plan, selections=plan.selections[:-1] + (last,))

    monkeypatch.setattr(DynamicViTFamily, "token_plan", one_short)
    result = _export(official_checkpoints["dynamicvit"], tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "kept_tokens_9 agreement 0.0000 < 0.999" in result.stderr
    assert not (tmp_path / "out").exists()  # a failed export leaves nothing in OUTDIR; the attempt is beside it
    report = read_json(tmp_path / "out.failed" / "report.json")["validate"]
    assert report["near_ties"]["kept_tokens_9"]["disagreements"] == int(ACCEPTANCE_IMAGES)


@pytest.mark.slow
def test_a_shuffled_gather_fails_validation(official_checkpoints, tmp_path, monkeypatch):
    """The static ToMe merge puts the unmerged tokens back in reversed order (the assignment map
    still says where they should be): from the next block on the model computes something else."""
    static_merge = tome.static_merge

    def shuffled(x, size, metric, r, merge_with="matmul", prefix=1):
        out, size, token_map = static_merge(x, size, metric, r, merge_with, prefix)
        unmerged = (x.shape[1] - 1) // 2 - r
        order = [0, *range(unmerged, 0, -1), *range(unmerged + 1, out.shape[1])]
        return out[:, order], size[:, order], token_map

    monkeypatch.setattr(tome, "static_merge", shuffled)
    result = _export(official_checkpoints["tome"], tmp_path / "out")
    assert result.exit_code == 3, result.output
    report = read_json(tmp_path / "out.failed" / "report.json")["validate"]
    assert report["kept_agreement"]["assignment_0"] == 1.0  # the first map is still right
    assert report["kept_agreement"]["assignment_1"] < 0.999
    assert sum(t["disagreements"] for t in report["near_ties"].values()) > 0


@pytest.mark.slow
def test_a_perturbed_head_bias_fails_validation(official_checkpoints, tmp_path):
    """One class's bias moved by 0.01 in the exported EViT: top-1 barely changes, the logit bound catches it."""
    out = tmp_path / "out"
    assert _export(official_checkpoints["evit"], out, "--no-validate").exit_code == 0
    proto = onnx.load(str(out / "model.onnx"))
    (head,) = [n for n in proto.graph.node if n.op_type == "Gemm" and n.input[1] == "model.head.weight"]
    assert len(head.input) == 2  # the official init's zero bias, dropped by the exporter: give it one
    values = np.zeros(1000, np.float32)
    values[7] = 0.01
    proto.graph.initializer.append(numpy_helper.from_array(values, "perturbed_head_bias"))
    head.input.append("perturbed_head_bias")
    onnx.save(proto, str(out / "model.onnx"))
    result = run_cli("validate", out, "--limit", ACCEPTANCE_IMAGES)
    assert result.exit_code == 3, result.output
    assert "max |logit diff| 1.00e-02 > 0.001" in result.stderr


def test_nan_logits_fail_validation():
    from vitedge.validate import compare, verdict

    reference = np.zeros((4, 10), np.float32)
    exported = reference.copy()
    exported[1, 3] = np.nan
    exported[2] = np.inf
    metrics = compare(reference, exported, [], [], None, [])
    assert metrics["non_finite_logits"] == 2
    failures = verdict(metrics, Thresholds())
    assert failures[0] == "2 image(s) give NaN or Inf logits"
    assert any(f.startswith("max |logit diff| nan") or f.startswith("max |logit diff| inf") for f in failures)
    assert verdict(compare(reference, reference.copy(), [], [], None, []), Thresholds()) == []


def test_per_batch_logit_stats_give_the_metrics_of_the_whole_arrays():
    """validate keeps per-image statistics batch by batch, not every logit: same metrics, NaN included."""
    from vitedge.validate import LogitStats, compare_stats

    rng = np.random.default_rng(3)
    reference = rng.standard_normal((10, 1000)).astype(np.float32)
    exported = reference + rng.standard_normal(reference.shape).astype(np.float32) * 1e-5
    exported[7, 5] = np.nan
    kept = rng.integers(0, 50, (10, 4))
    whole = compare(reference, exported, [kept], [kept.copy()], np.arange(10) % 3, ["kept_tokens_3"])
    parts = LogitStats.concatenate([LogitStats.of(reference[i:i + 4], exported[i:i + 4]) for i in range(0, 10, 4)])
    streamed = compare_stats(parts, [kept], [kept.copy()], np.arange(10) % 3, ["kept_tokens_3"])
    assert streamed.keys() == whole.keys()
    for key, value in whole.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(streamed[key]), key
        else:
            assert streamed[key] == pytest.approx(value, rel=1e-6), key
    assert whole["non_finite_logits"] == 1 and math.isnan(whole["max_abs_logit_diff_all"])
    exact = compare(reference, reference.copy(), [], [], None, [])
    assert exact["max_abs_logit_diff"] == 0.0 and exact["mean_abs_logit_diff"] == 0.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.9", True])
def test_thresholds_must_be_finite_numbers(value):
    with pytest.raises(VitedgeError, match="validation threshold min_top1_agreement must be a finite number"):
        Thresholds.from_dict({"min_top1_agreement": value})
