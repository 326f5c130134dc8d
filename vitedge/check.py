"""Stage 4, check: is the exported graph static and buildable by TensorRT?

Rules (``../shared/DESIGN.md``): no NonZero/Loop/If/Unique/Scan; with the batch pinned every
tensor's shape is known after ONNX Runtime's symbolic shape inference; every op is one
TensorRT's ONNX parser supports; TopK's K is a constant ≤ 3840; no ScatterElements or
ScatterND with a reduction; INT64 tensors on the hot path are warnings. Linear-only families
add a rule against any tensor quadratic in the token count.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .families import get_family

FORBIDDEN_OPS = {
    "NonZero": "data-dependent output shape",
    "Loop": "control flow",
    "If": "control flow",
    "Scan": "control flow",
    "Unique": "data-dependent output shape",
    "Compress": "data-dependent output shape",
}

# Ops accepted by TensorRT's ONNX parser (onnx-tensorrt's operator support list, TensorRT 10).
TENSORRT_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization LpPool LRN MatMul Max
    MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg Not OneHot Or Pad Pow PRelu
    QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
    Upsample Where Xor""".split()
)
TOPK_MAX_K = 3840


@dataclass
class CheckResult:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    topk_k: list[int] = field(default_factory=list)
    opset: int = 0

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _pin_inputs(model: onnx.ModelProto, batch: int, size: int | None) -> onnx.ModelProto:
    """Symbolic input dims made concrete: the batch axis to ``batch``, image axes to ``size``."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for value in pinned.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.dim_param:
                dim.Clear()
                dim.dim_value = size if axis >= 2 and size is not None else batch
    return pinned


def infer_shapes(model: onnx.ModelProto, batch: int = 1, size: int | None = None) -> onnx.ModelProto:
    """Shapes of every tensor with symbolic inputs pinned, by ORT's symbolic shape inference.

    Run by ``shape_inference.ReductionShapeInference``, which also follows the axes input of
    opset-18 reductions (ReduceMax, ReduceL2, ...) that ORT's own class leaves shapeless.
    """
    from .shape_inference import infer_shapes as infer_symbolic

    return infer_symbolic(_pin_inputs(model, batch, size), auto_merge=True)


def check_model(model: onnx.ModelProto, quadratic_tokens: int | None = None, input_size: int | None = None) -> CheckResult:
    """Lint ``model``; ``quadratic_tokens`` (the token count N) forbids any [.., N, N] tensor.

    A dynamic-resolution graph is checked at one ``input_size`` per call (its profile's
    min, opt and max, see ``pipeline.check``): TensorRT builds it for each.
    """
    graph = model.graph
    result = CheckResult()
    result.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    result.ops = dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))
    constants = _constants(graph)

    for op, why in FORBIDDEN_OPS.items():
        if op in result.ops:
            result.errors.append(f"{result.ops[op]} {op} node(s): {why} is not allowed in a static graph")
    for op in sorted(set(result.ops) - TENSORRT_OPS - set(FORBIDDEN_OPS)):
        result.errors.append(f"op {op} is not supported by TensorRT's ONNX parser")
    for node in graph.node:
        domain_ok = node.domain in ("", "ai.onnx")
        if not domain_ok:
            result.errors.append(f"node {node.name} uses custom op {node.domain}::{node.op_type}")
        if node.op_type == "TopK":
            k = constants.get(node.input[1])
            if k is None:
                result.errors.append(f"TopK {node.name}: K is computed at run time, TensorRT needs a constant")
            else:
                k_value = int(np.asarray(k).reshape(-1)[0])
                result.topk_k.append(k_value)
                if k_value > TOPK_MAX_K:
                    result.errors.append(f"TopK {node.name}: K={k_value} exceeds TensorRT's limit {TOPK_MAX_K}")
        if node.op_type in ("ScatterElements", "ScatterND"):
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                result.errors.append(
                    f"{node.op_type} {node.name} reduces with '{reduction}': missing or wrong in TensorRT 8.x; "
                    "use gather, plain scatter or an assignment-matrix MatMul"
                )

    image_axes = [d for value in graph.input for d in value.type.tensor_type.shape.dim[2:] if d.dim_param]
    if image_axes and input_size is None:
        result.errors.append("the image axes are symbolic (dynamic resolution); check at a concrete input size")
        return result
    from .shape_inference import ReductionAxesError  # imports ONNX Runtime and sympy: only when checking

    try:
        inferred = infer_shapes(model, size=input_size)
    except ReductionAxesError as exc:
        result.errors.append(str(exc))
        return result
    except Exception as exc:  # symbolic inference raises bare Exceptions on graphs it cannot follow
        result.errors.append(f"shape inference failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
        return result
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    dynamic, int64_tensors, quadratic = [], 0, []
    for value in values:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            dynamic.append(value.name)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if any(d is None for d in dims):
            dynamic.append(value.name)
        if tensor_type.elem_type == onnx.TensorProto.INT64 and dims and np.prod([d or 1 for d in dims]) > 1:
            int64_tensors += 1
        if quadratic_tokens and len(dims) >= 2 and dims[-1] == dims[-2] == quadratic_tokens:
            quadratic.append(value.name)
    if dynamic:
        result.errors.append(
            f"{len(dynamic)} tensor(s) without a static shape after shape inference (e.g. {', '.join(dynamic[:3])})"
        )
    if quadratic:
        result.errors.append(
            f"{len(quadratic)} tensor(s) quadratic in the {quadratic_tokens} tokens (e.g. {', '.join(quadratic[:3])}): "
            "a linear-only graph must not build an N x N map"
        )
    if int64_tensors:
        result.warnings.append(
            f"{int64_tensors} INT64 tensor(s) with more than one element (index arithmetic); "
            "TensorRT runs them but they are slower than INT32"
        )
    return result


def profile_sizes(metadata: dict) -> list[int]:
    """The input sizes a graph is built and checked for: min, opt, max of a dynamic resolution, else one."""
    resolution = metadata["input"].get("resolution")
    if not resolution:
        return [metadata["arch"]["img_size"]]
    return sorted({resolution["min"], resolution["opt"], resolution["max"]})


def check_sizes(proto, metadata: dict) -> dict:
    """``check_model`` at every size of the artifact's resolution profile, merged into one section."""
    dynamic = bool(metadata["input"].get("resolution"))
    sizes = profile_sizes(metadata)
    merged = None
    for size in sizes:
        tokens = quadratic_tokens(metadata["family"], {**metadata["arch"], "img_size": size})
        section = _check_section(check_model(proto, quadratic_tokens=tokens, input_size=size if dynamic else None), tokens)
        if merged is None:
            merged = section
            continue
        prefix = f"at {size} px: "
        merged["errors"] += [prefix + e for e in section["errors"]]
        merged["warnings"] += [prefix + w for w in section["warnings"] if w not in merged["warnings"]]
        merged["passed"] = merged["passed"] and section["passed"]
    if dynamic:
        merged["sizes"] = sizes
    return merged


def quadratic_tokens(family_name: str, arch: dict) -> int | None:
    """The token count N whose N x N tensors the lint forbids, for linear-only families.

    A family declares itself linear-only with ``linear_attention = True``; for the
    others there is no such rule (None).
    """
    if not get_family(family_name).linear_attention:
        return None
    return (arch["img_size"] // arch["patch_size"]) ** 2 + 1


def _check_section(result, tokens: int | None) -> dict:
    section = result.to_dict()
    if tokens is not None:
        section["quadratic_tokens"] = tokens
    return section
