"""Quantization stage: FP16 / INT8 QDQ artifacts, the selection path kept in float, scales, validation, errors."""

from __future__ import annotations

import hashlib
import importlib
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from support import assert_clean_failure, copy_artifact, folder_listing, quiet, read_json, run_cli

import vitedge
from vitedge.data.calibration_sets import array_sha256, calibration_array, load_calibration_set
from vitedge.errors import ValidationFailed, VitedgeError
from vitedge.quantize import graph_precision, quantize, selection_nodes, validate_quantized
from vitedge.runtime import ort_session
from vitedge.validate import input_spec

SMALL_SET = "source: fashion-mnist\nsplit: train\ncount: 48\nseed: 0\npreprocess: {size: 28, channels: 1}\n"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "fmnist-train-48.yaml"
    path.write_text(SMALL_SET)
    return path


def _producers(model):
    return {out: node for node in model.graph.node for out in node.output}


def _reads_dq(model, node) -> bool:
    producers = _producers(model)
    return any(name in producers and producers[name].op_type == "DequantizeLinear" for name in node.input)


@pytest.fixture(scope="module")
def evit_int8(tmp_path_factory, evit_artifact, small_set):
    out = copy_artifact(evit_artifact, tmp_path_factory.mktemp("quant") / "evit")
    quantize(out, "int8", calib=str(small_set), validate_data=None, log=quiet)
    return out


@pytest.fixture(scope="module")
def evit_fp16(tmp_path_factory, evit_artifact):
    out = copy_artifact(evit_artifact, tmp_path_factory.mktemp("quant") / "evit16")
    quantize(out, "fp16", validate_data=None, log=quiet)
    return out


def test_selection_path_is_found_from_the_graph(evit_artifact, dynamicvit_artifact):
    evit = onnx.load(str(evit_artifact / "model.onnx"))
    names = selection_nodes(evit)
    ops = {node.name: node.op_type for node in evit.graph.node}
    # EViT ranks the head-averaged class-attention row: Gather (row 0), Slice (patches), ReduceMean, TopK.
    assert sorted(ops[n] for n in names) == sorted(["Gather", "Slice", "ReduceMean", "TopK"] * 3)
    dyn = onnx.load(str(dynamicvit_artifact / "model.onnx"))
    names = set(selection_nodes(dyn))
    predictor = {n.name for n in dyn.graph.node if any("score_predictor" in i for i in n.input)}
    assert predictor and predictor <= names  # every node reading predictor weights
    by_name = {n.name: n for n in dyn.graph.node}
    assert sum(by_name[n].op_type == "TopK" for n in names) == 3
    # Nothing of the token path: no block LayerNorm, no attention Softmax.
    blocks = {n.name for n in dyn.graph.node if any(i.startswith("model.blocks.") for i in n.input)}
    assert not names & blocks
    assert not any(by_name[n].op_type == "Softmax" for n in names)


def test_dense_graph_has_no_selection_path(tmp_path, evit_ckpt):
    out = tmp_path / "deit"
    from support import HEADS

    vitedge.export(evit_ckpt, out, family="deit", num_heads=HEADS, validate_data=None, log=quiet)
    assert selection_nodes(onnx.load(str(out / "model.onnx"))) == []


def test_int8_is_static_qdq_with_per_channel_weights(evit_int8):
    model = onnx.load(str(evit_int8 / "model.int8.onnx"))
    assert graph_precision(model) == "int8"
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: i for i in model.graph.initializer}
    per_channel, activations = 0, 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert inits[node.input[0]].data_type == onnx.TensorProto.INT8
            per_channel += numpy_helper.to_array(inits[node.input[1]]).size > 1
        if node.op_type == "QuantizeLinear":
            activations += 1
            zero = numpy_helper.to_array(inits[node.input[2]])
            assert zero.dtype == np.int8 and not zero.any()  # symmetric, as TensorRT needs
    assert per_channel > 0 and activations > 0
    # Every MatMul/Gemm/Conv off the selection path reads a dequantized input.
    excluded = set(vitedge.Artifact(evit_int8).metadata["quantized"]["int8"]["excluded_nodes"])
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and node.name not in excluded:
            assert _reads_dq(model, node), node.name


def test_selection_path_reads_float_by_default(evit_int8):
    model = onnx.load(str(evit_int8 / "model.int8.onnx"))
    selection = set(vitedge.Artifact(evit_int8).metadata["quantized"]["int8"]["selection_nodes"])
    nodes = [n for n in model.graph.node if n.name in selection]
    assert len(nodes) == 12
    # The ranked class-attention row shares the Softmax output with the attention MatMul, which is
    # quantized; the selection Gather must still read the float Softmax output.
    assert not any(_reads_dq(model, node) for node in nodes)
    producers = _producers(model)
    assert all(producers[n.input[0]].op_type == "Softmax" for n in nodes if n.op_type == "Gather")


def test_include_selection_quantizes_it(tmp_path, evit_artifact, dynamicvit_artifact, small_set):
    evit = copy_artifact(evit_artifact, tmp_path / "evit")
    quantize(evit, "int8", calib=str(small_set), include_selection=True, validate_data=None, log=quiet)
    model = onnx.load(str(evit / "model.int8.onnx"))
    entry = vitedge.Artifact(evit).metadata["quantized"]["int8"]
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.name in entry["selection_nodes"]]
    assert len(gathers) == 3 and all(_reads_dq(model, n) for n in gathers)
    assert entry["selection_quantized"] is True and entry["excluded_nodes"] == []
    dyn = copy_artifact(dynamicvit_artifact, tmp_path / "dyn")
    quantize(dyn, "int8", calib=str(small_set), include_selection=True, validate_data=None, log=quiet)
    model = onnx.load(str(dyn / "model.int8.onnx"))
    selection = set(vitedge.Artifact(dyn).metadata["quantized"]["int8"]["selection_nodes"])
    predictor_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.name in selection]
    assert predictor_matmuls and all(_reads_dq(model, n) for n in predictor_matmuls)


def test_scales_json_and_tensorrt_cache_match_the_graph(evit_int8):
    meta = vitedge.Artifact(evit_int8).metadata["quantized"]["int8"]
    scales = read_json(evit_int8 / meta["scales"])["tensors"]
    model = onnx.load(str(evit_int8 / "model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    graph_scales = {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    activations = {k: v for k, v in scales.items() if v["kind"] == "activation"}
    assert set(activations) == set(graph_scales)
    for name, entry in activations.items():
        assert entry["scale"] == pytest.approx(graph_scales[name], rel=1e-6)
        assert entry["amax"] == pytest.approx(127 * graph_scales[name], rel=1e-6)
    lines = (evit_int8 / meta["calibration_cache"]).read_text().splitlines()
    assert lines[0].startswith("TRT-") and lines[0].endswith("Calibration2")
    cache = {name: struct.unpack(">f", bytes.fromhex(value.strip()))[0] for name, value in (l.rsplit(":", 1) for l in lines[1:])}
    assert set(cache) == set(graph_scales)
    for name, scale in cache.items():
        assert scale == pytest.approx(graph_scales[name], rel=1e-6)
    # The cache names tensors of the FP32 graph, so an implicit INT8 TensorRT build of model.onnx finds them.
    fp32_tensors = {o for n in onnx.load(str(evit_int8 / "model.onnx")).graph.node for o in n.output}
    fp32_tensors |= {i.name for i in onnx.load(str(evit_int8 / "model.onnx")).graph.input}
    assert set(cache) <= fp32_tensors


def test_calibration_set_is_recorded_by_hash(evit_int8, small_set):
    meta = vitedge.Artifact(evit_int8).metadata
    record = meta["quantized"]["int8"]["calibration"]
    cset = load_calibration_set(small_set)
    assert record["yaml_sha256"] == cset.yaml_sha256
    assert record["images"] == 48
    assert record["data_sha256"] == array_sha256(calibration_array(cset, input_spec(meta)))
    assert meta["quantized"]["int8"]["source_sha256"] == hashlib.sha256((evit_int8 / "model.onnx").read_bytes()).hexdigest()
    assert meta["quantized"]["int8"]["sha256"] == hashlib.sha256((evit_int8 / "model.int8.onnx").read_bytes()).hexdigest()


def test_fp16_keeps_io_and_sensitive_ops_in_fp32(evit_fp16):
    model = onnx.load(str(evit_fp16 / "model.fp16.onnx"))
    assert graph_precision(model) == "fp16"
    assert all(v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32)
               for v in list(model.graph.input) + list(model.graph.output))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    matmul_weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert matmul_weights and all(t == onnx.TensorProto.FLOAT16 for t in matmul_weights)
    # LayerNorm and Softmax compute in FP32 (Casts around them), the token path between them in FP16.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(kept) == 25 + 12
    for node in kept:
        assert types[node.input[0]] == types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
    half = [n for n in model.graph.node if n.op_type == "MatMul" and types.get(n.output[0]) == onnx.TensorProto.FLOAT16]
    assert len(half) >= 12 * 4


def test_fp16_selection_path_has_no_half_precision_round_trip(evit_fp16):
    # The converter puts FP16 Casts between two blocked nodes; vitedge removes them, so TopK
    # ranks scores that were never rounded to half precision.
    model = onnx.load(str(evit_fp16 / "model.fp16.onnx"))
    producers = _producers(model)

    def cast_to(node):
        return next(a.i for a in node.attribute if a.name == "to") if node and node.op_type == "Cast" else None

    topks = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topks) == 3
    for topk in topks:
        chain, name = [], topk.input[0]
        while name in producers and producers[name].op_type != "Softmax":  # back to the attention probabilities
            chain.append(producers[name])
            name = chain[-1].input[0]
        assert chain and all(cast_to(node) is None for node in chain), [n.op_type for n in chain]
    round_trips = [n for n in model.graph.node if cast_to(n) == onnx.TensorProto.FLOAT
                   and cast_to(producers.get(n.input[0])) == onnx.TensorProto.FLOAT16
                   and producers[n.input[0]].input[0] not in {i.name for i in model.graph.initializer}]
    assert not round_trips


def test_round_trip_removal_keeps_casts_of_integer_tensors():
    from onnx import TensorProto, helper

    from vitedge.quantize import drop_cast_round_trips

    cast = lambda source, target, to: helper.make_node("Cast", [source], [target], to=to)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),  # int64: its float copy is a real conversion
        cast("shape", "shape16", TensorProto.FLOAT16), cast("shape16", "shape32", TensorProto.FLOAT),
        cast("x", "x16", TensorProto.FLOAT16), cast("x16", "x32", TensorProto.FLOAT),  # FP32 → FP16 → FP32
        helper.make_node("Add", ["shape32", "x32"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    drop_cast_round_trips(model)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert list(add.input) == ["shape32", "x"]
    assert [n.output[0] for n in model.graph.node if n.op_type == "Cast"] == ["shape16", "shape32"]
    onnx.checker.check_model(model, full_check=True)


def test_fp16_with_every_node_kept_is_the_fp32_graph(tmp_path, evit_artifact, fmnist_batch):
    from vitedge.quantize import convert_fp16

    model = onnx.load(str(evit_artifact / "model.onnx"))
    converted = convert_fp16(model, (), [n.name for n in model.graph.node])
    onnx.save_model(converted, str(tmp_path / "all-fp32.onnx"))
    images = fmnist_batch[0][:1]
    reference = ort_session(evit_artifact / "model.onnx", 1).run(None, {"images": images})
    blocked = ort_session(tmp_path / "all-fp32.onnx", 1).run(None, {"images": images})
    for expected, got in zip(reference, blocked):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_avit_halting_gate_is_a_selection_path(tmp_path):
    out = tmp_path / "avit"
    vitedge.export(Path(__file__).resolve().parents[1] / "models" / "fmnist-avit.safetensors", out,
                   validate_data=None, log=quiet)
    model = onnx.load(str(out / "model.onnx"))
    names = set(selection_nodes(model, vitedge.families.get_family("avit").selection_hint))
    sigmoids = {n.name for n in model.graph.node if n.op_type == "Sigmoid"}
    assert len(sigmoids) == 11 and sigmoids <= names  # every block but the last, which halts all tokens
    assert selection_nodes(model) == []  # without the hint: no TopK, nothing found


def test_fp16_agrees_with_fp32(evit_fp16):
    # Random weights leave near-tied logits and scores, so the bar here is loose; the trained
    # model's bar (99.5 %) is in test_bundled_evit_keeps_accuracy.
    validate = validate_quantized(evit_fp16, "fp16", "fashion-mnist", 200, thresholds={"min_top1_agreement": 0.95})
    section = vitedge.Artifact(evit_fp16).report()["quantized"]["fp16"]
    assert section["check"]["passed"] and section["validate"] == validate
    assert validate["images"] == 200 and validate["top1_agreement"] >= 0.95
    assert sum(validate["first_disagreement"].values()) == 200
    assert set(validate["kept_agreement"]) == {"kept_tokens_3", "kept_tokens_6", "kept_tokens_9"}


def test_quantized_models_run_and_differ_from_fp32(evit_int8, fmnist_batch):
    images = fmnist_batch[0][:8]
    outputs = {}
    for name in ("model.onnx", "model.int8.onnx"):
        session = ort_session(evit_int8 / name, 1)
        outputs[name] = np.concatenate([session.run(None, {"images": images[i : i + 1]})[0] for i in range(8)])
    diff = np.abs(outputs["model.onnx"] - outputs["model.int8.onnx"])
    assert 0 < diff.max() < 0.5 * np.abs(outputs["model.onnx"]).max()


def test_validate_quantized_reports_agreement_and_first_disagreement(evit_int8):
    result = validate_quantized(evit_int8, "int8", "fashion-mnist", 150, thresholds={"min_top1_agreement": 0.0,
                                "max_accuracy_drop": 1.0})
    assert result["images"] == 150
    assert {"fp32_accuracy", "accuracy", "accuracy_drop", "top1_agreement", "kept_agreement"} <= set(result)
    assert sum(result["first_disagreement"].values()) == 150
    flips = round((1 - result["top1_agreement"]) * 150)
    assert sum(result["first_disagreement_top1_flips"].values()) == flips
    # The first disagreement can only be where a kept set differs.
    for name, count in result["first_disagreement"].items():
        if name != "none":
            assert result["kept_agreement"][name] < 1.0
    report = read_json(evit_int8 / "report.json")
    assert report["quantized"]["int8"]["validate"]["images"] == 150
    assert "Quantized: int8" in (evit_int8 / "report.md").read_text()


def test_strict_threshold_fails_with_exit_3(evit_int8):
    result = run_cli("validate", evit_int8, "--precision", "int8", "--limit", "64", "--min-top1-agreement", "1.01")
    assert result.exit_code == 3
    assert "int8 validation failed" in result.stderr


def test_cli_quantize_check_profile(tmp_path, dynamicvit_artifact, small_set):
    out = copy_artifact(dynamicvit_artifact, tmp_path / "dyn")
    result = run_cli("quantize", out, "--precision", "int8", "--calib", small_set, "--method", "percentile",
                     "--exclude", "node_linear_1", "--no-validate")  # random weights: agreement may miss the bar
    assert result.exit_code == 0, result.stderr
    entry = vitedge.Artifact(out).metadata["quantized"]["int8"]
    assert entry["method"] == "percentile" and "node_linear_1" in entry["excluded_nodes"]
    result = run_cli("quantize", out, "--precision", "fp16", "--no-validate")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "model.fp16.onnx"
    result = run_cli("check", out)
    assert result.exit_code == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("check passed")]
    assert len(lines) == 3 and "(int8, model.int8.onnx)" in lines[1] + lines[2]
    result = run_cli("check", out, "--precision", "fp16")
    assert result.exit_code == 0 and "(fp16, model.fp16.onnx)" in result.stdout
    result = run_cli("profile", out, "--precision", "int8", "--iterations", "3", "--warmup", "1")
    assert result.exit_code == 0, result.stderr
    assert read_json(out / "report.json")["profile"]["ort-int8"]["precision"] == "int8"


def test_check_flags_a_broken_quantized_model(tmp_path, evit_int8):
    out = copy_artifact(evit_int8, tmp_path / "broken")
    model = onnx.load(str(out / "model.int8.onnx"))
    model.graph.node.append(onnx.helper.make_node("NonZero", ["images"], ["nz"], name="nz"))
    onnx.save(model, str(out / "model.int8.onnx"))
    result = run_cli("check", out)
    assert result.exit_code == 3
    assert "error (int8, model.int8.onnx): 1 NonZero" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--method", "kl"], "Invalid value for '--method'"),
    (["--precision", "int4"], "Invalid value for '--precision'"),
    (["--precision", "int8", "--calib", "no-such-set"], "unknown calibration set 'no-such-set'"),
    (["--precision", "int8", "--exclude", "nothing-matches-*"], "matches no node"),
    (["--precision", "fp16", "--calib", "fmnist-train-512"], "--calib applies to int8 only"),
])
def test_bad_arguments_leave_the_artifact_untouched(tmp_path, evit_artifact, args, message):
    out = copy_artifact(evit_artifact, tmp_path / "evit")
    before = folder_listing(out)
    error = assert_clean_failure(run_cli("quantize", out, *args, "--no-validate"))
    assert message in error
    assert folder_listing(out) == before


@pytest.mark.parametrize("yaml_text, message", [
    ("source: fashion-mnist\ncount: 8\npreprocess: {size: 32, channels: 1}\n", "yields 1x32x32 images"),
    ("source: fashion-mnist\ncount: 8\npreprocess: {size: 28, channels: 3}\n", "yields 3x28x28 images"),
    ("source: image-folder\npath: empty\npreprocess: {size: 28, channels: 1}\n", "no images"),
])
def test_bad_calibration_set_is_one_line_and_writes_nothing(tmp_path, evit_artifact, yaml_text, message):
    out = copy_artifact(evit_artifact, tmp_path / "evit")
    (tmp_path / "empty").mkdir()
    calib = tmp_path / "set.yaml"
    calib.write_text(yaml_text)
    before = folder_listing(out)
    error = assert_clean_failure(run_cli("quantize", out, "--precision", "int8", "--calib", calib, "--no-validate"))
    assert message in error
    assert folder_listing(out) == before


def test_already_quantized_model_is_refused(tmp_path, evit_int8):
    out = copy_artifact(evit_int8, tmp_path / "requant")
    (out / "model.onnx").write_bytes((out / "model.int8.onnx").read_bytes())
    before = folder_listing(out)
    error = assert_clean_failure(run_cli("quantize", out, "--precision", "int8", "--no-validate"))
    assert "already quantized (int8)" in error
    assert folder_listing(out) == before
    with pytest.raises(VitedgeError, match="already quantized"):
        quantize(out, "fp16", validate_data=None)


def test_missing_quantized_model_is_one_line(evit_artifact):
    assert "has no int8 model; run 'vitedge quantize" in assert_clean_failure(
        run_cli("validate", evit_artifact, "--precision", "int8", "--limit", "8"))
    assert "has no fp16 model" in assert_clean_failure(run_cli("profile", evit_artifact, "--precision", "fp16"))


def test_python_api_rejects_unknown_method_and_precision(evit_artifact):
    with pytest.raises(VitedgeError, match="unknown calibration method 'kl'"):
        vitedge.quantize(evit_artifact, "int8", method="kl")
    with pytest.raises(VitedgeError, match="unknown precision 'int4'"):
        vitedge.quantize(evit_artifact, "int4")


def test_bundled_evit_keeps_accuracy(tmp_path):
    """The trained EViT, default settings, 1,000 real test images: FP16 agrees, INT8 keeps accuracy."""
    from support import REPO

    out = tmp_path / "evit"
    vitedge.export(REPO / "models" / "fmnist-evit.safetensors", out, validate_data=None, log=quiet)
    fp16 = quantize(out, "fp16", validate_limit=1000, log=quiet)["validate"]
    assert fp16["passed"] and fp16["top1_agreement"] >= 0.995
    section = quantize(out, "int8", validate_limit=1000, log=quiet)
    int8 = section["validate"]
    assert int8["passed"] and section["check"]["passed"]
    assert int8["accuracy_drop"] <= 0.01 and int8["top1_agreement"] >= 0.98
    assert int8["fp32_accuracy"] == fp16["fp32_accuracy"] > 0.75


def _reverse_output(path: Path, name: str) -> None:
    """Rewrite the graph at ``path`` so that output ``name`` comes out reversed along axis 1:
    the same values per row, in the wrong places."""
    model = onnx.load(str(path))
    (output,) = [o for o in model.graph.output if o.name == name]
    width = output.type.tensor_type.shape.dim[1].dim_value
    for node in model.graph.node:
        node.output[:] = [f"{name}_in_order" if o == name else o for o in node.output]
    index = numpy_helper.from_array(np.arange(width - 1, -1, -1, dtype=np.int64), f"{name}_reversed")
    model.graph.initializer.append(index)
    model.graph.node.append(onnx.helper.make_node("Gather", [f"{name}_in_order", index.name], [name], axis=1))
    onnx.save(model, str(path))


def test_quantized_tome_assignments_are_compared_element_wise(tmp_path):
    """ToMe's assignment_<block> maps each patch to its token: a permuted map is a different
    model (same values, other places), which a set comparison would call identical."""
    out = tmp_path / "tome"
    vitedge.export(Path(__file__).resolve().parents[1] / "models" / "fmnist-tome.safetensors", out,
                   validate_data=None, log=quiet)
    quantize(out, "fp16", validate_data=None, log=quiet)
    intact = validate_quantized(out, "fp16", "fashion-mnist", 16)
    assert intact["first_disagreement"] == {"none": 16}
    _reverse_output(out / "model.fp16.onnx", "assignment_4")
    permuted = validate_quantized(out, "fp16", "fashion-mnist", 16)
    assert permuted["kept_agreement"]["assignment_4"] == 0.0
    assert all(v == 1.0 for k, v in permuted["kept_agreement"].items() if k != "assignment_4")
    assert permuted["first_disagreement"] == {"assignment_4": 16}
    assert permuted["top1_agreement"] == intact["top1_agreement"]  # the logits are untouched


def test_a_quantization_that_fails_its_comparison_keeps_the_previous_model(tmp_path, evit_artifact, monkeypatch):
    """The previous good model.fp16.onnx, vitedge.json and report survive; the failed attempt is in OUTDIR.failed/."""
    quantize_module = importlib.import_module("vitedge.quantize")

    artifact = copy_artifact(evit_artifact, tmp_path / "evit")
    first = vitedge.quantize(artifact, "fp16", validate_limit=64)
    assert first["validate"]["passed"]
    before = folder_listing(artifact)
    monkeypatch.setitem(quantize_module.DEFAULT_THRESHOLDS, "fp16", {"min_top1_agreement": 1.01, "max_accuracy_drop": 0.0})
    with pytest.raises(ValidationFailed, match=r"fp16 validation failed .* is unchanged, the failed attempt is in .*evit\.failed"):
        vitedge.quantize(artifact, "fp16", keep_fp32_ops=(), validate_limit=64)
    assert folder_listing(artifact) == before  # no stage left, nothing replaced
    failed = tmp_path / "evit.failed"
    assert (failed / "model.fp16.onnx").read_bytes() != (artifact / "model.fp16.onnx").read_bytes()
    assert read_json(failed / "report.json")["quantized"]["fp16"]["validate"]["passed"] is False
    assert (failed / "model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()


def test_a_first_quantization_that_fails_writes_nothing_into_the_artifact(tmp_path, evit_artifact, monkeypatch):
    quantize_module = importlib.import_module("vitedge.quantize")

    artifact = copy_artifact(evit_artifact, tmp_path / "evit")
    before = folder_listing(artifact)
    monkeypatch.setitem(quantize_module.DEFAULT_THRESHOLDS, "fp16", {"min_top1_agreement": 1.01, "max_accuracy_drop": 0.0})
    result = run_cli("quantize", artifact, "--precision", "fp16", "--limit", "32")
    assert result.exit_code == 3 and "the failed attempt is in" in result.stderr
    assert folder_listing(artifact) == before
    assert "quantized" not in read_json(artifact / "vitedge.json")
