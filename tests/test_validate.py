"""vitedge.validate: ORT vs the reference on real Fashion-MNIST images, thresholds, and provenance."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from support import copy_artifact, make_state_dict, read_json

import vitedge
from vitedge.data import load_dataset
from vitedge.errors import ValidationFailed, VitedgeError
from vitedge.validate import Thresholds, kept_agreement


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
    """Real Fashion-MNIST images saved as PNG files in class folders validate like the IDX set."""
    art = copy_artifact(evit_artifact, tmp_path / "art")
    dataset = load_dataset("fashion-mnist", limit=12)
    root = tmp_path / "images"
    for i, (image, label) in enumerate(zip(dataset.images, dataset.labels)):
        folder = root / ("shoes" if label in (5, 7, 9) else "other")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    section = vitedge.validate(art, str(root))
    assert section["passed"] and section["images"] == 12 and section["data"] == "images"
    assert "reference_accuracy" not in section  # 2 folder classes are not the model's 10


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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.9", True])
def test_thresholds_must_be_finite_numbers(value):
    with pytest.raises(VitedgeError, match="validation threshold min_top1_agreement must be a finite number"):
        Thresholds.from_dict({"min_top1_agreement": value})
