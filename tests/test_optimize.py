"""vitedge.optimize: each pass on a small graph (real ONNX Runtime sessions, fused vs unfused), the
patterns it must leave alone, the command end to end on a bundled model, re-validation that
rejects a broken optimised graph, and bad input."""

from __future__ import annotations

import collections
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import vitedge
from vitedge.artifact import LOCK, OPTIMIZED_ORT
from vitedge.optimize import (PASSES, fuse_attention, fuse_attention_key_mask, fuse_conv_add, fuse_head_mean_key_attention,
                              fuse_l2_normalization, fuse_regularised_softmax, fuse_shared_qkv_attention, optimize,
                              optimize_graph)
from vitedge.runtime import ort_session

from support import assert_clean_failure, folder_listing, quiet, read_json, run_cli

REPO = Path(__file__).resolve().parents[1]
TOKENS, HEADS, HEAD_DIM = 6, 2, 4
WIDTH = HEADS * HEAD_DIM


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def attention_model(scale_on="q", unpack="slice", key_bias=False, read_probs=False, read_keys=False,
                    qkv_bias=True) -> onnx.ModelProto:
    """One timm-style attention block as vitedge's exports spell it, with the variants the matcher handles
    (scale on q or on the logits, Slice+Squeeze or Gather, a [B, 1, 1, N] key bias) or must refuse
    (the attention map or the keys read by another node, as a token selection would)."""
    rng = np.random.default_rng(0)
    inits = [_const("w_qkv", rng.standard_normal((WIDTH, 3 * WIDTH)).astype(np.float32) * 0.5),
             _const("qkv_shape", np.array([1, TOKENS, 3, HEADS, HEAD_DIM], np.int64)),
             _const("flat_shape", np.array([1, TOKENS, WIDTH], np.int64)),
             _const("scale", np.array(HEAD_DIM ** -0.5, np.float32)),
             _const("zero", np.array([0], np.int64)), _const("one", np.array([1], np.int64)),
             _const("two", np.array([2], np.int64)), _const("three", np.array([3], np.int64))]
    nodes = [helper.make_node("MatMul", ["x", "w_qkv"], ["qkv_mm"])]
    packed = "qkv_mm"
    if qkv_bias:
        inits.append(_const("b_qkv", rng.standard_normal(3 * WIDTH).astype(np.float32) * 0.1))
        nodes.append(helper.make_node("Add", ["qkv_mm", "b_qkv"], ["qkv"]))
        packed = "qkv"
    nodes += [helper.make_node("Reshape", [packed, "qkv_shape"], ["qkv5"]),
              helper.make_node("Transpose", ["qkv5"], ["qkvT"], perm=[2, 0, 3, 1, 4])]
    for i, name in enumerate("qkv"):
        if unpack == "gather":
            inits.append(_const(f"i{i}", np.array(i, np.int64)))
            nodes.append(helper.make_node("Gather", ["qkvT", f"i{i}"], [name], axis=0))
        else:
            bounds = ["zero", "one", "two", "three"]
            nodes += [helper.make_node("Slice", ["qkvT", bounds[i], bounds[i + 1], "zero"], [f"{name}_s"]),
                      helper.make_node("Squeeze", [f"{name}_s", "zero"], [name])]
    query = "q"
    if scale_on == "q":
        nodes.append(helper.make_node("Mul", ["q", "scale"], ["q_scaled"]))
        query = "q_scaled"
    nodes += [helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", [query, "kT"], ["scores"])]
    logits = "scores"
    if scale_on == "logits":
        nodes.append(helper.make_node("Mul", ["scores", "scale"], ["scores_scaled"]))
        logits = "scores_scaled"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])]
    if key_bias:
        inputs.append(helper.make_tensor_value_info("key_bias", TensorProto.FLOAT, [1, 1, 1, TOKENS]))
        nodes.append(helper.make_node("Add", [logits, "key_bias"], ["biased"]))
        logits = "biased"
    nodes += [helper.make_node("Softmax", [logits], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["context"]),
              helper.make_node("Transpose", ["context"], ["contextT"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["contextT", "flat_shape"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, TOKENS, WIDTH])]
    if read_probs:  # a selection reading the class-token row of the map
        nodes.append(helper.make_node("ReduceMean", ["probs", "one"], ["head_mean"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("head_mean", TensorProto.FLOAT, None))
    if read_keys:  # ToMe-style: the keys feed a similarity
        nodes.append(helper.make_node("ReduceMean", ["k", "one"], ["key_mean"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("key_mean", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, tmp_path: Path, name: str, feeds: dict) -> list[np.ndarray]:
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return ort_session(path, 1).run(None, feeds)


def feeds_for(model: onnx.ModelProto) -> dict:
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, TOKENS, WIDTH)).astype(np.float32)}
    if any(i.name == "key_bias" for i in model.graph.input):
        bias = np.zeros((1, 1, 1, TOKENS), np.float32)
        bias[..., 2] = -1000.0  # a halted token, invisible as a key
        feeds["key_bias"] = bias
    return feeds


@pytest.mark.parametrize("scale_on, unpack, key_bias, qkv_bias", [
    ("q", "slice", False, True), ("logits", "gather", False, True), ("q", "slice", True, True),
    ("logits", "slice", False, False)])
def test_attention_fuses_and_matches_the_unfused_graph(tmp_path, scale_on, unpack, key_bias, qkv_bias):
    model = attention_model(scale_on, unpack, key_bias, qkv_bias=qkv_bias)
    feeds = feeds_for(model)
    expected = run(model, tmp_path, "plain", feeds)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_attention(fused) == 1
    onnx.checker.check_model(fused)
    assert [n.op_type for n in fused.graph.node if n.domain == "com.microsoft"] == ["Attention"]
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    got = run(fused, tmp_path, "fused", feeds)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)


def key_mask_model(condition_rank=2, live_value=0.0, masked_value=-1000.0, masked_input=False) -> onnx.ModelProto:
    """``attention_model`` with its key bias computed as the static forms write it: ``Where(live, 0, c)``
    over a [1, N] condition then unsqueezed (A-ViT), or over a [1, 1, 1, N] one (ATS); ``masked_input``
    makes c a graph input, whose value the pass cannot know."""
    model = attention_model(key_bias=True)
    graph = model.graph
    del graph.input[1]  # key_bias: computed below
    shape = [1, TOKENS] if condition_rank == 2 else [1, 1, 1, TOKENS]
    graph.input.append(helper.make_tensor_value_info("live", TensorProto.BOOL, shape))
    graph.initializer.extend([_const("live_value", np.array(live_value, np.float32)),
                              _const("bias_axes", np.array([1, 2], np.int64))])
    if masked_input:
        graph.input.append(helper.make_tensor_value_info("masked_value", TensorProto.FLOAT, []))
    else:
        graph.initializer.append(_const("masked_value", np.array(masked_value, np.float32)))
    where_out = "per_key" if condition_rank == 2 else "key_bias"
    nodes = [helper.make_node("Where", ["live", "live_value", "masked_value"], [where_out])]
    if condition_rank == 2:
        nodes.append(helper.make_node("Unsqueeze", ["per_key", "bias_axes"], ["key_bias"]))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return model


def key_mask_feeds(model: onnx.ModelProto) -> dict:
    feeds = {"x": np.random.default_rng(1).standard_normal((1, TOKENS, WIDTH)).astype(np.float32)}
    live = np.ones(TOKENS, bool)
    live[[2, 4]] = False  # two halted keys
    feeds["live"] = live.reshape([d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim])
    if any(i.name == "masked_value" for i in model.graph.input):
        feeds["masked_value"] = np.array(-1000.0, np.float32)
    return feeds


@pytest.mark.parametrize("condition_rank, masked_value", [(2, -1000.0), (4, -32.0), (2, -3.0)])
def test_a_per_key_where_bias_becomes_the_attention_key_mask_bit_identically(tmp_path, condition_rank, masked_value):
    model = key_mask_model(condition_rank, masked_value=masked_value)
    feeds = key_mask_feeds(model)
    unfused = run(model, tmp_path, "plain", feeds)[0]
    with_bias = onnx.ModelProto()
    with_bias.CopyFrom(model)
    assert fuse_attention(with_bias) == 1
    expected = run(with_bias, tmp_path, "bias", feeds)[0]
    counts = optimize_graph(model)
    assert counts["attention"] == 1 and counts["attention_key_mask"] == 1
    (attention,) = [n for n in model.graph.node if n.op_type == "Attention"]
    assert attention.input[3].endswith("_key_mask") and len(attention.input) == 4  # no [B, 1, N, N] bias input
    assert helper.get_attribute_value(next(a for a in attention.attribute if a.name == "mask_filter_value")) == masked_value
    assert not any(n.op_type in ("Expand", "Where") for n in model.graph.node)
    got = run(model, tmp_path, "mask", feeds)[0]
    np.testing.assert_array_equal(got, expected)  # the same logits plus the same c: the same floats
    np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [{"live_value": 0.5}, {"masked_input": True}, {"masked_value": 2.0}])
def test_a_bias_that_is_not_zero_or_a_known_negative_per_key_is_left_as_a_bias(variant):
    model = key_mask_model(**variant)
    assert fuse_attention(model) == 1
    before = model.SerializeToString()
    assert fuse_attention_key_mask(model) == 0
    assert model.SerializeToString() == before


@pytest.mark.parametrize("reader", ["read_probs", "read_keys"])
def test_attention_whose_map_or_keys_are_read_elsewhere_is_left_alone(reader):
    model = attention_model(**{reader: True})
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before


def test_a_bias_inside_the_scale_is_not_fused():
    """s * (q k^T + b) would scale the bias: Attention's attention_bias is added after the scale."""
    model = attention_model(scale_on="none", key_bias=True)
    graph = model.graph
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    graph.node.insert(list(graph.node).index(softmax), helper.make_node("Mul", ["biased", "scale"], ["biased_scaled"]))
    softmax.input[0] = "biased_scaled"
    assert fuse_attention(model) == 0


def softmax_model(c1, c2, share_mask: bool = False) -> onnx.ModelProto:
    """``(exp(x - max x) + c1) / (sum exp(x - max x) + c2)`` over the last axis; ``share_mask``: c1 is
    ATS's eps share ``Where(M, c1 / count(M), 0)`` over a [B, N] mask input."""
    inits = [_const("axes", np.array([-1], np.int64)), _const("c2", np.array(c2, np.float32))]
    nodes = [helper.make_node("ReduceMax", ["x", "axes"], ["row_max"], keepdims=1),
             helper.make_node("Sub", ["x", "row_max"], ["shifted"]),
             helper.make_node("Exp", ["shifted"], ["weights"]),
             helper.make_node("ReduceSum", ["weights", "axes"], ["total"], keepdims=1),
             helper.make_node("Add", ["total", "c2"], ["denominator"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3, 5])]
    if share_mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 5]))
        inits += [_const("c1", np.array(c1, np.float32)), _const("one", np.array([1], np.int64)),
                  _const("count_shape", np.array([-1, 1, 1, 1], np.int64)), _const("zero_share", np.zeros((1, 1, 1, 1), np.float32)),
                  _const("key_axes", np.array([1, 2], np.int64))]
        nodes += [helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceSum", ["mask_f", "one"], ["count"], keepdims=0),
                  helper.make_node("Reshape", ["count", "count_shape"], ["count4"]),
                  helper.make_node("Reciprocal", ["count4"], ["inverse"]),
                  helper.make_node("Mul", ["inverse", "c1"], ["share"]),
                  helper.make_node("Unsqueeze", ["mask", "key_axes"], ["keys"]),
                  helper.make_node("Where", ["keys", "share", "zero_share"], ["eps_share"]),
                  helper.make_node("Add", ["weights", "eps_share"], ["numerator"])]
    else:
        inits.append(_const("c1", np.array(c1, np.float32)))
        nodes.append(helper.make_node("Add", ["weights", "c1"], ["numerator"]))
    nodes.append(helper.make_node("Div", ["numerator", "denominator"], ["probs"]))
    graph = helper.make_graph(nodes, "softmax", inputs, [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 1, 3, 5])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("share_mask", [False, True])
def test_regularised_softmax_becomes_softmax_within_its_eps(tmp_path, share_mask):
    model = softmax_model(1e-6 / 5, 1e-6, share_mask)
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 1, 3, 5)).astype(np.float32) * 4}
    if share_mask:
        feeds["mask"] = np.array([[True] * 5, [True, True, False, True, False]])
    expected = run(model, tmp_path, "plain", feeds)[0]
    counts = optimize_graph(model)
    assert counts["regularised_softmax"] == 1
    assert [n.op_type for n in model.graph.node] == ["Softmax"]  # the eps share is dead and gone
    got = run(model, tmp_path, "fused", feeds)[0]
    assert np.abs(got - expected).max() <= 1e-6 / 5 + 1e-6 + 1e-7


def test_a_softmax_with_a_large_additive_term_is_not_rewritten():
    """c1 = 0.1 is a real change of the function, not a rounding-sized regulariser."""
    model = softmax_model(0.1, 1e-6)
    assert fuse_regularised_softmax(model) == 0
    assert any(n.op_type == "Div" for n in model.graph.node)


# --- shared-q/k/v attention and L2 normalisation ---------------------------------------------------

@pytest.mark.parametrize("unpack, key_bias", [("slice", False), ("gather", True)])
def test_attention_whose_keys_are_read_elsewhere_becomes_multiheadattention(tmp_path, unpack, key_bias):
    """ToMe-style: the keys feed a similarity too; they are rebuilt from the split projection."""
    model = attention_model(unpack=unpack, key_bias=key_bias, read_keys=True)
    feeds = feeds_for(model)
    expected = run(model, tmp_path, "plain", feeds)
    assert fuse_attention(model) == 0 and fuse_shared_qkv_attention(model) == 1
    assert [n.op_type for n in model.graph.node if n.domain == "com.microsoft"] == ["MultiHeadAttention"]
    assert not any(n.op_type in ("Softmax", "Slice", "Gather") for n in model.graph.node)
    got = run(model, tmp_path, "fused", feeds)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_private_block_is_left_to_the_attention_pass():
    counts = optimize_graph(attention_model())
    assert counts["attention"] == 1 and counts["shared_qkv_attention"] == 0


def test_attention_whose_map_or_scaled_query_is_read_elsewhere_is_not_multiheadattention():
    """MultiHeadAttention hands out neither the map nor the scaled q: such blocks stay as they are."""
    model = attention_model(read_probs=True, read_keys=True)
    before = model.SerializeToString()
    assert fuse_shared_qkv_attention(model) == 0 and model.SerializeToString() == before
    model = attention_model(read_keys=True)
    model.graph.node.append(helper.make_node("ReduceMean", ["q_scaled", "one"], ["query_mean"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("query_mean", TensorProto.FLOAT, None))
    before = model.SerializeToString()
    assert fuse_shared_qkv_attention(model) == 0 and model.SerializeToString() == before


@pytest.mark.parametrize("key_bias, keepdims", [(False, 0), (True, 1)])
def test_attention_whose_keys_are_read_as_a_head_mean_becomes_attention_and_a_folded_matmul(tmp_path, key_bias, keepdims):
    model = attention_model(key_bias=key_bias, read_keys=True)
    next(n for n in model.graph.node if n.output[0] == "key_mean").attribute[0].i = keepdims
    feeds = feeds_for(model)
    expected = run(model, tmp_path, "plain", feeds)
    assert fuse_head_mean_key_attention(model) == 1
    assert [n.op_type for n in model.graph.node if n.domain == "com.microsoft"] == ["Attention"]
    assert not any(n.op_type in ("Softmax", "ReduceMean", "Slice") for n in model.graph.node)
    got = run(model, tmp_path, "fused", feeds)
    assert got[1].shape == expected[1].shape
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_keys_read_other_than_as_a_head_mean_are_not_folded():
    """A mean over the tokens axis is no linear map of one token's x: the head-mean fold must refuse it."""
    model = attention_model(read_keys=True)
    reader = next(n for n in model.graph.node if n.output[0] == "key_mean")
    reader.input[1] = "two"
    before = model.SerializeToString()
    assert fuse_head_mean_key_attention(model) == 0 and model.SerializeToString() == before
    assert fuse_shared_qkv_attention(model) == 1  # MultiHeadAttention still serves it


def l2_model(axis: int = -1, read_norm: bool = False, norm_of: str = "x") -> onnx.ModelProto:
    """Castling-ViT's q / ||q||: ``x / ReduceL2(norm_of, axis, keepdims=1)``, ``norm_of`` x itself or x + 1."""
    nodes = [helper.make_node("ReduceL2", [norm_of, "axes"], ["norm"], keepdims=1),
             helper.make_node("Div", ["x", "norm"], ["unit"])]
    if norm_of == "shifted":
        nodes.insert(0, helper.make_node("Add", ["x", "one"], ["shifted"]))
    outputs = [helper.make_tensor_value_info("unit", TensorProto.FLOAT, [2, 3, 5, 4])]
    if read_norm:
        outputs.append(helper.make_tensor_value_info("norm", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "l2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 4])],
                              outputs, [_const("axes", np.array([axis], np.int64)), _const("one", np.ones(1, np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("axis", [-1, 3])
def test_l2_normalisation_becomes_lpnormalization(tmp_path, axis):
    model = l2_model(axis)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 5, 4)).astype(np.float32)}
    expected = run(model, tmp_path, "plain", feeds)[0]
    counts = optimize_graph(model)
    assert counts["l2_normalization"] == 1
    assert [n.op_type for n in model.graph.node] == ["LpNormalization"]
    np.testing.assert_allclose(run(model, tmp_path, "fused", feeds)[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis, read_norm, norm_of", [(2, False, "x"), (-1, True, "x"), (-1, False, "shifted")])
def test_l2_normalisation_over_another_axis_or_with_its_norm_read_or_of_another_tensor_is_left_alone(
        axis, read_norm, norm_of):
    model = l2_model(axis, read_norm, norm_of)
    before = model.SerializeToString()
    assert fuse_l2_normalization(model) == 0 and model.SerializeToString() == before


def conv_add_model(addend_shape=(2, 3, 7, 4), read_conv: bool = False, bias: bool = False) -> onnx.ModelProto:
    """Castling-ViT's ``y / ||y|| + dconv(v)``: a depthwise (9, 1) Conv along the tokens plus a tensor."""
    rng = np.random.default_rng(5)
    inits = [_const("w", rng.standard_normal((3, 1, 9, 1)).astype(np.float32))]
    if bias:
        inits.append(_const("b", rng.standard_normal(3).astype(np.float32)))
    nodes = [helper.make_node("Conv", ["v", "w"] + (["b"] if bias else []), ["conv"], group=3, pads=[4, 0, 4, 0],
                              kernel_shape=[9, 1]),
             helper.make_node("Add", ["unit", "conv"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 7, 4])]
    if read_conv:
        outputs.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "conv_add", [helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 3, 7, 4]),
                                                  helper.make_tensor_value_info("unit", TensorProto.FLOAT, list(addend_shape))],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias", [False, True])
def test_conv_plus_tensor_becomes_fused_conv_with_sum(tmp_path, bias):
    model = conv_add_model(bias=bias)
    rng = np.random.default_rng(6)
    feeds = {"v": rng.standard_normal((2, 3, 7, 4)).astype(np.float32),
             "unit": rng.standard_normal((2, 3, 7, 4)).astype(np.float32)}
    expected = run(model, tmp_path, "plain", feeds)[0]
    assert optimize_graph(model)["conv_add"] == 1
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("FusedConv", "com.microsoft")]
    np.testing.assert_allclose(run(model, tmp_path, "fused", feeds)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("addend_shape, read_conv", [((1, 3, 1, 1), False), ((2, 3, 7, 4), True)])
def test_conv_plus_broadcast_tensor_or_with_its_output_read_is_left_alone(addend_shape, read_conv):
    """FusedConv's sum input does not broadcast, and a convolution read elsewhere must stay."""
    model = conv_add_model(addend_shape, read_conv)
    before = model.SerializeToString()
    assert fuse_conv_add(model) == 0 and model.SerializeToString() == before


# --- the command on artifacts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def deit_artifact(tmp_path_factory) -> Path:
    """The bundled dense Fashion-MNIST model (12 blocks, 64-dim), exported without validation."""
    out = tmp_path_factory.mktemp("optimize") / "deit"
    vitedge.export(REPO / "models" / "fmnist-deit.safetensors", out, validate_data=None, log=quiet)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_optimize_end_to_end_on_a_bundled_model(deit_artifact, tmp_path):
    outdir = _copy(deit_artifact, tmp_path / "deit")
    result = run_cli("optimize", outdir, "--limit", "64", "--rounds", "3", "--force")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] and summary["passes"]["attention"] == 12 and summary["top1_agreement"] >= 0.999
    assert summary["passes"]["assignment_scatter_add"] == 0  # a dense ViT has no merge
    meta = read_json(outdir / "vitedge.json")["optimized"]["ort"]
    assert meta["written"] and meta["fidelity"]["passed"] and meta["timing"]["rounds"] == 3
    report = read_json(outdir / "report.json")
    assert report["validate_ort"]["model"] == OPTIMIZED_ORT and report["validate_ort"]["passed"]
    model = onnx.load(str(outdir / OPTIMIZED_ORT))
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 12
    # profile and predict take it on ORT and say so; --graph portable overrides
    result = run_cli("profile", outdir, "--iterations", "3", "--warmup", "1")
    assert result.exit_code == 0 and f"timing {OPTIMIZED_ORT} (optimized graph" in result.stderr
    assert read_json(outdir / "report.json")["profile"]["ort"]["graph"] == "optimized"
    result = run_cli("profile", outdir, "--iterations", "3", "--warmup", "1", "--graph", "portable")
    assert result.exit_code == 0 and "timing model.onnx (portable graph)" in result.stderr
    images = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    result = run_cli("predict", outdir, tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert result.exit_code == 0 and f"running {OPTIMIZED_ORT}" in result.stderr
    optimized = np.load(tmp_path / "y.npy")
    portable = vitedge.predict(outdir, images, graph="portable")
    np.testing.assert_allclose(optimized, portable, atol=1e-4)
    # a re-exported model.onnx makes model.ort.onnx stale: auto falls back to model.onnx
    vitedge.export(REPO / "models" / "fmnist-evit.safetensors", outdir, validate_data=None, log=quiet)
    assert vitedge.Artifact(outdir).ort_model("auto")[1] == "portable"


def test_a_graph_that_is_not_faster_is_not_written(deit_artifact, tmp_path, monkeypatch):
    """With the timing replaced by a ratio above 1 the decision must be 'not written', and recorded."""
    module = importlib.import_module("vitedge.optimize")  # the module; vitedge.optimize is the function

    outdir = _copy(deit_artifact, tmp_path / "deit")
    (outdir / OPTIMIZED_ORT).write_bytes(b"an older optimised graph")
    real = module.interleaved_timing

    def slower(*args, **kwargs):  # the real timing, read as a slower candidate
        return {**real(*args, **kwargs), "ratio": 1.2}
    monkeypatch.setattr(module, "interleaved_timing", slower)
    entry = optimize(outdir, data=None, rounds=2, log=quiet)
    assert not entry["written"] and entry["reason"] == "not faster than model.onnx"
    assert not (outdir / OPTIMIZED_ORT).exists()  # the stale one is gone too
    assert read_json(outdir / "vitedge.json")["optimized"]["ort"]["written"] is False
    assert vitedge.Artifact(outdir).ort_model("auto")[1] == "portable"
    result = run_cli("profile", outdir, "--graph", "optimized", "--iterations", "2")
    assert "has no model.ort.onnx (not faster than model.onnx)" in assert_clean_failure(result)


def _break_scale(model: onnx.ModelProto) -> int:
    """A defective pass: fuses attention, then doubles every Attention's scale."""
    count = fuse_attention(model)
    for node in model.graph.node:
        if node.op_type == "Attention":
            for attribute in node.attribute:
                if attribute.name == "scale":
                    attribute.f *= 2
    return count


def test_revalidation_rejects_a_broken_optimised_graph(deit_artifact, tmp_path, monkeypatch):
    module = importlib.import_module("vitedge.optimize")  # the module; vitedge.optimize is the function

    outdir = _copy(deit_artifact, tmp_path / "deit")
    before = folder_listing(outdir)
    monkeypatch.setattr(module, "PASSES", (("attention", _break_scale),))
    result = run_cli("optimize", outdir, "--limit", "32", "--rounds", "2")
    assert result.exit_code == 3
    line = assert_clean_failure(result)
    assert "validation of model.ort.onnx failed" in line and f"{outdir} is unchanged" in line
    assert folder_listing(outdir) == before
    failed = outdir.with_name(outdir.name + ".failed")
    assert (failed / OPTIMIZED_ORT).is_file() and not read_json(failed / "report.json")["validate_ort"]["passed"]
    # the same check passes the real passes' graph: the rejection is the defect's
    monkeypatch.setattr(module, "PASSES", PASSES)
    assert optimize(outdir, limit=32, rounds=2, force=True, log=quiet)["fidelity"]["passed"]


def test_bad_input_is_one_line_and_writes_nothing(deit_artifact, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a vitedge artifact folder" in assert_clean_failure(run_cli("optimize", empty), empty)
    corrupted = _copy(deit_artifact, tmp_path / "corrupted")
    (corrupted / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    before = folder_listing(corrupted)
    result = run_cli("optimize", corrupted, "--limit", "8")
    assert result.exit_code == 2 and "cannot read" in assert_clean_failure(result)
    assert folder_listing(corrupted) == before
    result = run_cli("optimize", deit_artifact, "--rounds", "0")
    assert "rounds and threads must be >= 1" in assert_clean_failure(result)


def test_a_locked_folder_is_refused(deit_artifact, tmp_path):
    outdir = _copy(deit_artifact, tmp_path / "locked")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(outdir / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = folder_listing(outdir)
        result = run_cli("optimize", outdir, "--limit", "8")
        assert result.exit_code == 7
        assert "is being written by another vitedge process" in assert_clean_failure(result)
        assert folder_listing(outdir) == before
    finally:
        holder.kill()
        holder.wait()


def test_export_with_optimize_records_the_decision(tmp_path):
    outdir = tmp_path / "deit"
    result = run_cli("export", REPO / "models" / "fmnist-deit.safetensors", "-o", outdir, "--limit", "16", "--optimize")
    assert result.exit_code == 0, result.output
    entry = read_json(outdir / "vitedge.json")["optimized"]["ort"]
    assert json.loads(result.stdout)["ort_optimized"] == entry["written"]
    assert entry["passes"]["attention"] == 12 and entry["fidelity"]["passed"] and entry["fidelity"]["images"] == 16
    assert (outdir / OPTIMIZED_ORT).is_file() == entry["written"]  # written exactly when it was faster
    assert entry["written"] == (entry["timing"]["ratio"] < 1.0)


def test_an_unproven_graph_is_run_only_when_asked_for(deit_artifact, tmp_path):
    outdir = _copy(deit_artifact, tmp_path / "deit")
    entry = optimize(outdir, data=None, rounds=2, force=True, log=quiet)
    assert entry["written"] and entry["fidelity"] is None
    artifact = vitedge.Artifact(outdir)
    assert artifact.ort_model("auto")[1] == "portable"
    assert artifact.ort_model("optimized") == (outdir / OPTIMIZED_ORT, "optimized")


@pytest.mark.parametrize("bundled, passes", [
    ("tome", {"head_mean_key_attention": 12, "assignment_scatter_add": 12, "sum_of_squares_l2_normalization": 12}),
    ("castling", {"l2_normalization": 36, "conv_add": 12})])
def test_optimize_end_to_end_on_bundled_tome_and_castling(tmp_path, bundled, passes):
    """The keys-shared attention, L2-normalisation and conv-with-sum passes on the real exports, fidelity-checked."""
    outdir = tmp_path / bundled
    vitedge.export(REPO / "models" / f"fmnist-{bundled}.safetensors", outdir, validate_data=None, log=quiet)
    result = run_cli("optimize", outdir, "--limit", "64", "--rounds", "3", "--force")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] and summary["top1_agreement"] >= 0.999
    assert {name: count for name, count in summary["passes"].items() if count} == passes
    meta = read_json(outdir / "vitedge.json")["optimized"]["ort"]
    assert meta["fidelity"]["passed"]
    if bundled == "tome":  # every merge a reducing ScatterND, no assignment matrix left
        ops = collections.Counter(n.op_type for n in onnx.load(str(outdir / OPTIMIZED_ORT)).graph.node)
        assert ops["ScatterND"] == 12 and ops["Equal"] == 0
    images = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(vitedge.predict(outdir, images, graph="optimized"),
                               vitedge.predict(outdir, images, graph="portable"), atol=1e-4)
# --- attention with recomputed rows (blocks whose map feeds a token selection) -----------------

from vitedge.optimize import fuse_attention_with_rows  # noqa: E402


def row_read_model(reader: str = "gather", key_bias: bool = False, value_norm: bool = False,
                   fold_batch: bool = False) -> onnx.ModelProto:
    """The attention block above with a token selection reading its map, as vitedge's exports spell it:
    ``attn[:, :, 0]`` (Gather, EViT/Evo-ViT/ATS) or ``attn[:, :, 0:1]`` (Slice), then the mean over heads;
    ``value_norm``: the value norms read too (ATS); ``fold_batch``: the output flattened to [B·N, C]
    (ATS's gathers); ``reader="full"``: the whole map read (must be refused)."""
    model = attention_model(scale_on="q", key_bias=key_bias)
    graph = model.graph
    if fold_batch:
        next(i for i in graph.initializer if i.name == "flat_shape").CopyFrom(_const("flat_shape", np.array([-1, WIDTH], np.int64)))
        graph.output[0].CopyFrom(helper.make_tensor_value_info("out", TensorProto.FLOAT, [TOKENS, WIDTH]))
    graph.initializer.extend([_const("row0", np.array(0, np.int64)), _const("row_end", np.array([1], np.int64)),
                              _const("query_axis", np.array([2], np.int64)), _const("last", np.array([-1], np.int64))])
    if reader == "gather":
        graph.node.append(helper.make_node("Gather", ["probs", "row0"], ["cls_row"], axis=2))
    elif reader == "slice":
        graph.node.append(helper.make_node("Slice", ["probs", "zero", "row_end", "query_axis"], ["cls_row"]))
    else:
        graph.node.append(helper.make_node("Identity", ["probs"], ["cls_row"]))
    graph.node.append(helper.make_node("ReduceMean", ["cls_row", "one"], ["row_score"], keepdims=0))
    score_shape = {"gather": [1, TOKENS], "slice": [1, 1, TOKENS]}.get(reader, [1, TOKENS, TOKENS])
    graph.output.append(helper.make_tensor_value_info("row_score", TensorProto.FLOAT, score_shape))
    if value_norm:
        graph.node.extend([helper.make_node("Mul", ["v", "v"], ["v_sq"]),
                           helper.make_node("ReduceSum", ["v_sq", "last"], ["v_norm"], keepdims=0)])
        graph.output.append(helper.make_tensor_value_info("v_norm", TensorProto.FLOAT, [1, HEADS, TOKENS]))
    return model


@pytest.mark.parametrize("reader, key_bias, value_norm, fold_batch", [
    ("gather", False, False, False), ("slice", False, False, False), ("gather", True, True, False),
    ("gather", False, True, True)])
def test_attention_with_rows_fuses_and_matches_the_unfused_graph(tmp_path, reader, key_bias, value_norm, fold_batch):
    model = row_read_model(reader, key_bias, value_norm, fold_batch)
    feeds = feeds_for(model)
    expected = run(model, tmp_path, "plain", feeds)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_attention(fused) == 0  # the map is read elsewhere: the plain pass refuses it
    assert fuse_attention_with_rows(fused) == 1
    onnx.checker.check_model(fused)
    assert [n.op_type for n in fused.graph.node if n.domain == "com.microsoft"] == ["Attention"]
    # the only softmax left is the recomputed row: [B, H, 1, N], not the [B, H, N, N] map
    softmax = [n for n in fused.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1
    got = run(fused, tmp_path, "fused", feeds)
    assert len(got) == len(expected)
    for value, reference in zip(got, expected):  # block output, the selection's row score, the value norms
        np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-5)
    fused.graph.output.append(helper.make_tensor_value_info(softmax[0].output[0], TensorProto.FLOAT, [1, HEADS, 1, TOKENS]))
    row = run(fused, tmp_path, "row", feeds)[-1]
    assert row.shape == (1, HEADS, 1, TOKENS)


@pytest.mark.parametrize("reader", ["full", "keys_only"])
def test_attention_with_rows_refuses_a_map_read_in_full_or_not_read(reader):
    """A full-map read (here an Identity of the whole map) is no row read: the block keeps its map.
    A block whose map nobody else reads belongs to the plain attention pass, not this one."""
    model = row_read_model("full") if reader == "full" else attention_model(read_keys=True)
    before = model.SerializeToString()
    assert fuse_attention_with_rows(model) == 0
    assert model.SerializeToString() == before


def test_attention_with_rows_refuses_too_many_rows():
    model = row_read_model("slice")
    row_end = next(i for i in model.graph.initializer if i.name == "row_end")
    row_end.CopyFrom(_const("row_end", np.array([TOKENS], np.int64)))  # every row: the map itself
    assert fuse_attention_with_rows(model) == 0


def test_optimize_fuses_every_selection_block_of_the_bundled_evit(tmp_path):
    outdir = tmp_path / "evit"
    vitedge.export(REPO / "models" / "fmnist-evit.safetensors", outdir, validate_data=None, log=quiet)
    result = run_cli("optimize", outdir, "--limit", "64", "--rounds", "2", "--force")
    assert result.exit_code == 0, result.output
    meta = read_json(outdir / "vitedge.json")["optimized"]["ort"]
    assert meta["passes"]["attention"] == 9 and meta["passes"]["attention_with_rows"] == 3
    assert meta["written"] and meta["fidelity"]["passed"] and meta["fidelity"]["top1_agreement"] >= 0.999
    model = onnx.load(str(outdir / OPTIMIZED_ORT))
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 12


# --- a merge's assignment MatMul as a reducing ScatterND; the sum-of-squares L2 normalisation -----

from vitedge.optimize import fuse_assignment_scatter_add, fuse_sum_of_squares_l2_normalization  # noqa: E402

B_SIDE, MERGED, CHANNELS = 5, 3, 4


def assignment_model(batch=1, mutation: str | None = None) -> onnx.ModelProto:
    """A ToMe-style merge as vitedge's export spells it: each merged token's best b token (TopK 1 over
    its [MERGED, B_SIDE] scores), the 0/1 assignment ``Cast(Equal(arange(n) as [n, 1], D[:, None]))``
    and ``base + assignment @ rows``. ``mutation``: a graph where the pattern does not hold:
    "shifted" (D + 1, not provably below n), "reversed" (the column is no arange), "wider" (TopK over
    n + 1 tokens: D may be n), "read" (the assignment is read elsewhere)."""
    n = B_SIDE + (1 if mutation == "wider" else 0)
    column = np.arange(B_SIDE, dtype=np.int64)[::-1 if mutation == "reversed" else 1].reshape(B_SIDE, 1)
    inits = [_const("k1", np.array([1], np.int64)), _const("last", np.array([-1], np.int64)),
             _const("one", np.array([1], np.int64)), _const("column", column), _const("shift", np.array(1, np.int64))]
    nodes = [helper.make_node("TopK", ["scores", "k1"], ["best", "best_index"], axis=-1),
             helper.make_node("Squeeze", ["best_index", "last"], ["destination"])]
    destination = "destination"
    if mutation == "shifted":
        nodes.append(helper.make_node("Add", ["destination", "shift"], ["shifted"]))
        destination = "shifted"
    nodes += [helper.make_node("Unsqueeze", [destination, "one"], ["destination_row"]),
              helper.make_node("Equal", ["column", "destination_row"], ["hits"]),
              helper.make_node("Cast", ["hits"], ["assignment"], to=TensorProto.FLOAT),
              helper.make_node("MatMul", ["assignment", "rows"], ["added"]),
              helper.make_node("Add", ["base", "added"], ["merged"])]
    inputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, MERGED, n]),
              helper.make_tensor_value_info("rows", TensorProto.FLOAT, [batch, MERGED, CHANNELS]),
              helper.make_tensor_value_info("base", TensorProto.FLOAT, [batch, B_SIDE, CHANNELS])]
    outputs = [helper.make_tensor_value_info("merged", TensorProto.FLOAT, [batch, B_SIDE, CHANNELS])]
    if mutation == "read":
        outputs.append(helper.make_tensor_value_info("assignment", TensorProto.FLOAT, [batch, B_SIDE, MERGED]))
    graph = helper.make_graph(nodes, "merge", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def merge_feeds(batch: int) -> dict:
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((batch, MERGED, B_SIDE)).astype(np.float32)
    scores[0, :, 2] = 10.0  # every merged token of image 0 into one b token: the sums must accumulate
    return {"scores": scores, "rows": rng.standard_normal((batch, MERGED, CHANNELS)).astype(np.float32),
            "base": rng.standard_normal((batch, B_SIDE, CHANNELS)).astype(np.float32)}


@pytest.mark.parametrize("batch", [1, 3, "batch"])
def test_assignment_matmul_becomes_a_reducing_scatternd(tmp_path, batch):
    model = assignment_model(batch)
    feeds = merge_feeds(3 if batch == "batch" else batch)
    expected = run(model, tmp_path, "plain", feeds)[0]
    counts = optimize_graph(model)
    assert counts["assignment_scatter_add"] == 1
    ops = [n.op_type for n in model.graph.node]
    assert "ScatterND" in ops and not {"MatMul", "Equal", "Cast"} & set(ops)
    np.testing.assert_allclose(run(model, tmp_path, "scatter", feeds)[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mutation", ["shifted", "reversed", "wider", "read"])
def test_an_assignment_that_is_not_provably_one_hot_in_range_is_left_alone(mutation):
    model = assignment_model(mutation=mutation)
    before = model.SerializeToString()
    assert fuse_assignment_scatter_add(model) == 0 and model.SerializeToString() == before


def sum_of_squares_model(axis: int = -1, read_sum: bool = False) -> onnx.ModelProto:
    """ToMe's metric normalisation as exported: ``x / Sqrt(ReduceSum(x * x, axis, keepdims=1))``."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["square"]),
             helper.make_node("ReduceSum", ["square", "axes"], ["sum"], keepdims=1),
             helper.make_node("Sqrt", ["sum"], ["norm"]),
             helper.make_node("Div", ["x", "norm"], ["unit"])]
    outputs = [helper.make_tensor_value_info("unit", TensorProto.FLOAT, [2, 5, 4])]
    if read_sum:
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "l2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
                              outputs, [_const("axes", np.array([axis], np.int64))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_sum_of_squares_normalisation_becomes_lpnormalization(tmp_path):
    model = sum_of_squares_model()
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 5, 4)).astype(np.float32)}
    expected = run(model, tmp_path, "plain", feeds)[0]
    assert optimize_graph(model)["sum_of_squares_l2_normalization"] == 1
    assert [n.op_type for n in model.graph.node] == ["LpNormalization"]
    np.testing.assert_allclose(run(model, tmp_path, "fused", feeds)[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis, read_sum", [(1, False), (-1, True)])
def test_sum_of_squares_over_another_axis_or_with_its_sum_read_is_left_alone(axis, read_sum):
    model = sum_of_squares_model(axis, read_sum)
    before = model.SerializeToString()
    assert fuse_sum_of_squares_l2_normalization(model) == 0 and model.SerializeToString() == before
