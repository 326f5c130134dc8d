"""vitedge.check: the static-shape / TensorRT lint, on hand-built bad graphs and on real exports."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from support import copy_artifact, read_json, run_cli

import vitedge
from vitedge.check import check_model
from vitedge.errors import VitedgeError

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def make_model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def topk_model(k_source: str = "initializer", k: int = 2):
    """x [1, 8] -> TopK(K) -> values/indices [1, k]; K from an initializer, a Constant node or Shape."""
    nodes, inits = [], []
    if k_source == "initializer":
        inits.append(const("k", [k]))
    elif k_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["k"], value=const("kv", [k])))
    elif k_source == "shape":  # K = x.shape[0] + 1: computed at run time
        inits += [const("start", [0]), const("end", [1]), const("one", [1])]
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Slice", ["shape", "start", "end"], ["batch"]),
            helper.make_node("Add", ["batch", "one"], ["k"]),
        ]
    nodes.append(helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1))
    out_k = k if k_source != "shape" else 2
    return make_model(nodes, [tensor("x", FLOAT, [1, 8])],
                      [tensor("values", FLOAT, [1, out_k]), tensor("indices", INT64, [1, out_k])], inits)


def test_constant_topk_passes():
    result = check_model(topk_model("initializer", 3))
    assert result.passed, result.errors
    assert result.topk_k == [3]
    assert result.ops == {"TopK": 1}
    assert result.opset == 18
    assert check_model(topk_model("constant", 5)).topk_k == [5]


def test_topk_with_k_from_shape_fails():
    result = check_model(topk_model("shape"))
    assert not result.passed
    assert any("K is computed at run time" in e for e in result.errors), result.errors
    assert result.topk_k == []


def test_topk_k_above_tensorrt_limit_fails():
    model = make_model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)],
                       [tensor("x", FLOAT, [1, 5000])], [tensor("v", FLOAT, [1, 3841]), tensor("i", INT64, [1, 3841])],
                       [const("k", [3841])])
    result = check_model(model)
    assert any("exceeds TensorRT's limit 3840" in e for e in result.errors)


def scatter_model(op: str, reduction: str | None):
    attrs = {"reduction": reduction} if reduction else {}
    if op == "ScatterElements":
        node = helper.make_node(op, ["data", "idx", "upd"], ["out"], axis=1, **attrs)
        inits = [const("idx", [[0, 2]]), const("upd", [[1.0, 2.0]], np.float32)]
    else:
        node = helper.make_node(op, ["data", "idx", "upd"], ["out"], **attrs)
        inits = [const("idx", [[0, 2]]), const("upd", [3.0], np.float32)]
    return make_model([node], [tensor("data", FLOAT, [1, 4])], [tensor("out", FLOAT, [1, 4])], inits)


@pytest.mark.parametrize("op, reduction", [("ScatterElements", "add"), ("ScatterElements", "mul"), ("ScatterND", "add")])
def test_scatter_with_reduction_fails(op, reduction):
    result = check_model(scatter_model(op, reduction))
    assert any(f"reduces with '{reduction}'" in e for e in result.errors), result.errors


@pytest.mark.parametrize("reduction", [None, "none"])
def test_plain_scatter_passes(reduction):
    result = check_model(scatter_model("ScatterElements", reduction))
    assert result.passed, result.errors


def test_nonzero_fails():
    model = make_model([helper.make_node("NonZero", ["x"], ["nz"])], [tensor("x", FLOAT, [1, 4])],
                       [tensor("nz", INT64, [2, None])])
    result = check_model(model)
    assert any("NonZero" in e and "data-dependent" in e for e in result.errors), result.errors


def test_if_fails():
    then_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_then"])], "then", [],
                                   [tensor("y_then", FLOAT, [1, 4])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y_else"])], "else", [],
                                   [tensor("y_else", FLOAT, [1, 4])])
    model = make_model(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["cond"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [tensor("x", FLOAT, [1, 4])], [tensor("y", FLOAT, [1, 4])], [const("zero", 0.0, np.float32)])
    result = check_model(model)
    assert any("If node(s): control flow" in e for e in result.errors), result.errors


def test_op_tensorrt_does_not_support_fails():
    model = make_model([helper.make_node("Det", ["x"], ["d"])], [tensor("x", FLOAT, [2, 3, 3])], [tensor("d", FLOAT, [2])])
    result = check_model(model)
    assert result.errors == ["op Det is not supported by TensorRT's ONNX parser"]


def _custom_op():
    node = helper.make_node("FancyAttention", ["x"], ["y"], domain="com.example")
    model = make_model([node], [tensor("x", FLOAT, [1, 4])], [tensor("y", FLOAT, [1, 4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def test_custom_domain_op_fails():
    result = check_model(_custom_op())
    assert any("custom op com.example::FancyAttention" in e for e in result.errors), result.errors


def attention_like(tokens: int = 6, dim: int = 4):
    """q [1, N, d] @ k^T -> [1, N, N] -> @ v: the quadratic map linear attention must not build."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["out"]),
    ]
    inputs = [tensor(n, FLOAT, [1, tokens, dim]) for n in ("q", "k", "v")]
    return make_model(nodes, inputs, [tensor("out", FLOAT, [1, tokens, dim])])


def test_quadratic_tensor_fails_only_when_asked():
    model = attention_like(tokens=6)
    assert check_model(model).passed
    result = check_model(model, quadratic_tokens=6)
    assert any("quadratic in the 6 tokens" in e for e in result.errors), result.errors
    assert check_model(model, quadratic_tokens=7).passed


def test_data_dependent_shape_fails():
    """Range(0, max(x)) has a length known only at run time: no NonZero needed to go dynamic."""
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["mi"], to=INT64),
        helper.make_node("Range", ["zero", "mi", "one"], ["r"]),
    ]
    model = make_model(nodes, [tensor("x", FLOAT, [4])], [tensor("r", INT64, [None])],
                       [const("zero", 0), const("one", 1)])
    result = check_model(model)
    assert any("without a static shape" in e for e in result.errors), result.errors


def test_symbolic_batch_is_pinned_and_int64_warns():
    model = make_model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)],
                       [tensor("x", FLOAT, ["batch", 8])], [tensor("v", FLOAT, ["batch", 2]), tensor("i", INT64, ["batch", 2])],
                       [const("k", [2])])
    result = check_model(model)
    assert result.passed, result.errors
    assert any("INT64" in w for w in result.warnings)


def test_real_exports_pass(artifact):
    result = check_model(onnx.load(str(artifact / "model.onnx")))
    assert result.passed, result.errors
    assert result.topk_k == [s["kept_patches"] for s in read_json(artifact / "vitedge.json")["token_budgets"]["selections"]]
    for op in ("NonZero", "If", "Loop", "Unique"):
        assert op not in result.ops


def test_check_stage_rewrites_the_report(evit_artifact, tmp_path):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    report = read_json(art / "report.json")
    report["check"] = {"passed": False}
    (art / "report.json").write_text(json.dumps(report))
    result = vitedge.check(art)
    assert result["passed"] and result["topk_k"] == [35, 26, 19]
    assert read_json(art / "report.json")["check"]["passed"] is True
    assert "TopK K (constants): [35, 26, 19]" in (art / "report.md").read_text()


def test_check_cli_fails_on_a_bad_graph(evit_artifact, tmp_path):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    model = onnx.load(str(art / "model.onnx"))
    # the artifact's own interface (vitedge.json still describes it), with a reducing scatter before "logits"
    for node in model.graph.node:
        node.output[:] = ["logits_pre" if name == "logits" else name for name in node.output]
    model.graph.initializer.extend([const("idx", [[0, 2]]), const("upd", [[1.0, 2.0]], np.float32)])
    model.graph.node.append(helper.make_node("ScatterElements", ["logits_pre", "idx", "upd"], ["logits"], axis=1, reduction="add"))
    onnx.save(model, str(art / "model.onnx"))
    result = run_cli("check", art)
    assert result.exit_code == 3
    assert "error: ScatterElements" in result.stdout and "check FAILED" in result.stdout
    assert read_json(art / "report.json")["check"]["passed"] is False
    good = run_cli("check", copy_artifact(evit_artifact, tmp_path / "good"))
    assert good.exit_code == 0 and "check passed" in good.stdout


def test_check_damaged_model_file(evit_artifact, tmp_path):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    (art / "model.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(VitedgeError, match="cannot read"):
        vitedge.check(art)
    (art / "model.onnx").unlink()
    with pytest.raises(VitedgeError, match="model.onnx is missing"):
        vitedge.check(art)


def _nonzero():
    return make_model([helper.make_node("NonZero", ["x"], ["nz"])], [tensor("x", FLOAT, [1, 4])], [tensor("nz", INT64, [2, None])])


@pytest.mark.parametrize("build", [_custom_op, _nonzero, lambda: topk_model("shape")])
def test_check_leaves_nothing_in_the_working_directory(build, tmp_path, monkeypatch):
    """ORT's symbolic inference saves sym_shape_infer_temp.onnx to the cwd when it gives up (the custom op)."""
    monkeypatch.chdir(tmp_path)
    assert not check_model(build()).passed
    assert os.listdir(tmp_path) == []
    assert os.getcwd() == str(tmp_path)


class _ArgsortSelection(torch.nn.Module):
    """Token selection written the way the official DynamicViT code does it (argsort, then slice)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        score = tokens.mean(dim=-1)
        index = torch.argsort(score, dim=1, descending=True)[:, :5]
        return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def test_plain_dynamic_batch_export_of_argsort_selection_fails_the_lint():
    example = torch.randn(2, 12, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _ArgsortSelection(), (example,), dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        )
    result = check_model(program.model_proto)
    assert not result.passed
    assert any("K is computed at run time" in error for error in result.errors)


# Opset-18 reductions take their axes as an input; ORT's own symbolic inference left all but
# ReduceSum/ReduceMean shapeless, so ``x.norm(dim=-1)`` or ``x.amax(dim=-1)`` failed the check.
REDUCTIONS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


def reduction_model(op: str, axes, keepdims: int, axes_source: str = "initializer", noop_with_empty_axes: int = 0):
    """x [2, 3, 4] -> op(axes) -> y, y's shape left for inference; axes from an initializer, a
    Constant node, the graph's input (run time) or absent (None)."""
    nodes, inits, inputs = [], [], [tensor("x", FLOAT, [2, 3, 4])]
    if axes_source == "initializer":
        inits.append(const("axes", axes))
    elif axes_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["axes"], value=const("axes_value", axes)))
    elif axes_source == "input":
        inputs.append(tensor("axes", INT64, [len(axes)]))
    reduce_inputs = ["x", "axes"] if axes_source != "absent" else ["x"]
    attributes = {"keepdims": keepdims, **({"noop_with_empty_axes": 1} if noop_with_empty_axes else {})}
    nodes.append(helper.make_node(op, reduce_inputs, ["y"], name="reduce", **attributes))
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", FLOAT, None)], inits)


def _inferred_and_actual_shapes(model, feeds):
    """Output shapes from vitedge's shape inference and from running the graph in ONNX Runtime."""
    import onnxruntime as ort

    from vitedge.check import infer_shapes

    inferred = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in infer_shapes(model).graph.output]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    actual = [list(np.asarray(out).shape) for out in session.run(None, feeds)]
    return inferred, actual


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes, axes_source", [([-1], "initializer"), ([0, -2], "constant"), ([1], "initializer")])
def test_reduction_with_constant_axes_passes_with_the_runtime_shape(op, keepdims, axes, axes_source):
    model = reduction_model(op, axes, keepdims, axes_source)
    result = check_model(model)
    assert result.passed, result.errors
    x = np.random.default_rng(0).uniform(0.5, 1.5, size=(2, 3, 4)).astype(np.float32)
    inferred, actual = _inferred_and_actual_shapes(model, {"x": x})
    assert inferred == actual


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceL2", "ReduceSum"])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes_source, noop", [("absent", 0), ("empty", 0), ("empty", 1)])
def test_reduction_with_empty_axes_reduces_all_or_nothing(op, keepdims, axes_source, noop):
    source = "initializer" if axes_source == "empty" else "absent"
    model = reduction_model(op, np.zeros(0, np.int64), keepdims, source, noop_with_empty_axes=noop)
    result = check_model(model)
    assert result.passed, result.errors
    x = np.random.default_rng(0).uniform(0.5, 1.5, size=(2, 3, 4)).astype(np.float32)
    inferred, actual = _inferred_and_actual_shapes(model, {"x": x})
    assert inferred == actual


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceL2", "ReduceSum", "ReduceMean"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduction_with_axes_computed_at_run_time_fails(op, keepdims):
    result = check_model(reduction_model(op, [-1], keepdims, axes_source="input"))
    assert not result.passed
    assert result.errors == [
        f"{op} reduce: its axes are computed at run time, so its output shape is unknown; "
        "reduce over constant axes (a Python int or tuple as dim)"
    ]


def test_reduction_with_out_of_range_axes_fails_in_one_line():
    result = check_model(reduction_model("ReduceMax", [3], 1))
    assert result.errors == ["ReduceMax reduce: axes [3] out of range for rank 3"]


class _Reduce(torch.nn.Module):
    def __init__(self, reduce):
        super().__init__()
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(x) * 2.0


TORCH_REDUCTIONS = {
    "ReduceL2": lambda x: x.norm(dim=-1, keepdim=True),
    "ReduceL1": lambda x: x.norm(p=1, dim=1),
    "ReduceMax": lambda x: x.amax(dim=-1),
    "ReduceMin": lambda x: x.amin(dim=(0, 2), keepdim=True),
    "ReduceMean": lambda x: x.mean(dim=-2),
    "ReduceLogSumExp": lambda x: torch.logsumexp(x, dim=-1, keepdim=True),
    "ReduceProd": lambda x: x.prod(dim=-1),
}


@pytest.mark.parametrize("op", sorted(TORCH_REDUCTIONS))
def test_exported_torch_reductions_pass(op):
    """Exported the way vitedge exports (dynamo, opset 18, optimised), with a symbolic batch."""
    from vitedge.export import DEFAULT_OPSET, _quiet

    with _quiet():
        program = torch.onnx.export(
            _Reduce(TORCH_REDUCTIONS[op]), (torch.randn(2, 5, 7),), dynamo=True, opset_version=DEFAULT_OPSET,
            optimize=True, external_data=False, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        )
    model = program.model_proto
    assert op in {node.op_type for node in model.graph.node}
    result = check_model(model)
    assert result.passed, result.errors
    inferred, actual = _inferred_and_actual_shapes(model, {model.graph.input[0].name: np.random.randn(1, 5, 7).astype(np.float32)})
    assert inferred == actual


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_prod_of_a_shape_is_folded_into_a_static_reshape(keepdims):
    """Reshape(x, ReduceProd(Shape(x))): the element count is known while inferring (batch pinned to 1: y is [12])."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("ReduceProd", ["shape", "axes"], ["count"], keepdims=keepdims)]
    if not keepdims:
        nodes.append(helper.make_node("Unsqueeze", ["count", "axes"], ["target"]))
    nodes.append(helper.make_node("Reshape", ["x", "count" if keepdims else "target"], ["y"]))
    model = make_model(nodes, [tensor("x", FLOAT, ["batch", 3, 4])], [helper.make_tensor_value_info("y", FLOAT, None)],
                       [const("axes", [0])])
    result = check_model(model)
    assert result.passed, result.errors
    inferred, actual = _inferred_and_actual_shapes(model, {"x": np.zeros((1, 3, 4), np.float32)})
    assert inferred == actual == [[12]]


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceL2", "ReduceMean"])
def test_reduction_with_axes_attribute_before_opset_18_passes(op):
    node = helper.make_node(op, ["x"], ["y"], axes=[-1], keepdims=0)
    model = make_model([node], [tensor("x", FLOAT, [2, 3, 4])], [helper.make_tensor_value_info("y", FLOAT, None)], opset=17)
    result = check_model(model)
    assert result.passed, result.errors
    inferred, actual = _inferred_and_actual_shapes(model, {"x": np.ones((2, 3, 4), np.float32)})
    assert inferred == actual == [[2, 3]]
