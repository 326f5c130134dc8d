"""The schema layer: a broken field is one line naming the file, the field and what was expected."""

from __future__ import annotations

import json

import onnx
import pytest
from support import copy_artifact, read_json

from vitedge.artifact import Artifact
from vitedge.errors import VitedgeError
from vitedge.schema import ARTIFACT, SCHEMA_VERSION, check, check_version, field_name


def test_field_names():
    assert field_name(["input", "shape", 2]) == "input.shape[2]"
    assert field_name([]) == "(top level)"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("family"), r"field 'family' is missing"),
    (lambda m: m["input"].pop("shape"), r"field 'input.shape' is missing"),
    (lambda m: m.update(input=[]), r"field 'input': expected a mapping, got \[\]"),
    (lambda m: m["input"]["shape"].__setitem__(2, "abc"), r"field 'input.shape\[2\]'"),
    (lambda m: m["input"]["shape"].__setitem__(2, 0), r"field 'input.shape\[2\]'"),
    (lambda m: m["input"].update(std=[0.0]), r"field 'input.std\[0\]': expected a value > 0, got 0.0"),
    (lambda m: m["arch"].update(patch_size=0), r"field 'arch.patch_size': expected a value >= 1, got 0"),
    (lambda m: m["arch"].update(depth="12"), r"field 'arch.depth': expected an integer, got '12'"),
    (lambda m: m.update(outputs="logits"), r"field 'outputs': expected a list"),
    (lambda m: m.update(opset=True), r"field 'opset': expected an integer, got True"),
    (lambda m: m.update(model="../elsewhere.onnx"), r"field 'model': expected a plain file name"),
    (lambda m: m.update(validation={"min_top1_agreement": "high"}), r"field 'validation.min_top1_agreement'"),
])
def test_artifact_metadata_fields(evit_artifact, tmp_path, edit, message):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    metadata = read_json(art / "vitedge.json")
    edit(metadata)
    (art / "vitedge.json").write_text(json.dumps(metadata))
    with pytest.raises(VitedgeError, match=f"artifact metadata {art / 'vitedge.json'}: " + message):
        Artifact(art)


def test_unknown_extra_keys_are_kept(evit_artifact, tmp_path):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    metadata = read_json(art / "vitedge.json")
    metadata["input"]["transform"] = {"resize": 32, "crop": 28}
    metadata["made_by_a_later_tool"] = [1, 2]
    (art / "vitedge.json").write_text(json.dumps(metadata))
    assert Artifact(art).metadata["input"]["transform"] == {"resize": 32, "crop": 28}
    assert Artifact(art).model_path == art / "model.onnx"


def test_a_newer_schema_version_says_upgrade(evit_artifact, tmp_path):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    metadata = read_json(art / "vitedge.json")
    assert metadata["schema_version"] == SCHEMA_VERSION
    metadata["schema_version"] = SCHEMA_VERSION + 1
    metadata["input"] = "a layout this vitedge cannot know"
    (art / "vitedge.json").write_text(json.dumps(metadata))
    with pytest.raises(VitedgeError, match=r"written by a newer vitedge \(schema_version 2; this one reads up to 1\): upgrade"):
        Artifact(art)
    with pytest.raises(VitedgeError, match="field 'schema_version': expected a positive integer"):
        check_version({"schema_version": "1"}, "f.json", "artifact metadata")
    with pytest.raises(VitedgeError, match="expected a JSON object at the top level, got list"):
        check_version([], "f.json", "artifact metadata")


def _rewrite_model(art, change):
    model = onnx.load(str(art / "model.onnx"))
    change(model)
    onnx.save(model, str(art / "model.onnx"))


@pytest.mark.parametrize("metadata_edit, model_edit, message", [
    (lambda m: m["input"].update(name="pixels"), None, r"the graph's inputs are \['images'\], vitedge.json says 'pixels'"),
    (lambda m: m["input"].update(shape=[1, 1, 32, 32]), None, r"the graph.s input shape is \[1, 1, 28, 28\], vitedge.json says \[1, 1, 32, 32\]"),
    (lambda m: m.update(outputs=["logits"]), None, r"the graph's outputs are \['logits', 'kept_tokens_3'"),
    (lambda m: m.update(opset=17), None, "the graph has opset 18, vitedge.json says 17"),
    (None, lambda p: p.graph.output.pop(), "the graph's outputs are"),
    (None, lambda p: p.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_param", "N"), "the graph.s input shape is"),
])
def test_vitedge_json_is_cross_checked_against_model_onnx(evit_artifact, tmp_path, metadata_edit, model_edit, message):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    if metadata_edit:
        metadata = read_json(art / "vitedge.json")
        metadata_edit(metadata)
        (art / "vitedge.json").write_text(json.dumps(metadata))
    if model_edit:
        _rewrite_model(art, model_edit)
    with pytest.raises(VitedgeError, match=f"{art / 'vitedge.json'} does not describe .*model.onnx: {message}"):
        Artifact(art).model_path


def test_the_shared_artifact_matches_its_model(artifact):
    assert Artifact(artifact).model_path.name == "model.onnx"
    assert check(read_json(artifact / "vitedge.json"), ARTIFACT, "x", "y")["family"] in ("evit", "dynamicvit")
