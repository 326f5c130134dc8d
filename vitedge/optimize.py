"""Stage 5b, optimize: an ONNX Runtime form of model.onnx (``model.ort.onnx``), written only where it pays.

``model.onnx`` stays portable: standard ops only, TensorRT-legal, the exact twin of the static
PyTorch form. ONNX Runtime already fuses LayerNorm, GELU and the bias adds online on every
graph, so an offline copy of those gains nothing (measured, docs/optimize.md); what it does not
do on vitedge's graphs is fuse attention. The passes here rewrite patterns found in the graph
(never keyed on a family):

- ``regularised_softmax``: ``(exp(x - max x) + c1) / (sum exp(x - max x) + c2)`` with tiny
  non-negative constants c1, c2 (the eps-regularised softmax of DynamicViT/ATS-style code)
  → one ``Softmax``. Every probability moves by at most max(c1) + c2.
- ``attention``: the packed-QKV self-attention block (``x @ Wqkv + b`` → reshape to
  [B, N, 3, H, D] → q, k, v → ``softmax(q kᵀ · s) v`` → [B, N, H·D]) → one
  ``com.microsoft.Attention`` node, but only where no tensor inside is read elsewhere: a block
  whose attention map (or q/k/v) feeds a token selection keeps its map and stays as it is.
- ``head_mean_key_attention``: the same block where the keys are also read, only as their mean
  over the heads (ToMe's matching metric) → ``Attention`` + that mean folded into the weights
  (one [C, D] MatMul of the block's input).
- ``shared_qkv_attention``: the same block where q, k or v are read in another way → ``Split`` of
  the QKV projection + ``com.microsoft.MultiHeadAttention``, the shared tensor rebuilt beside it.
- ``l2_normalization``: ``x / ReduceL2(x)`` over the last axis (Castling-ViT's q/‖q‖, k/‖k‖) →
  ``LpNormalization(p=2)``.
- ``attention_with_rows``: a block whose map is read elsewhere only through a few query rows (a
  selection's class-token row) → ``com.microsoft.Attention`` plus those rows recomputed from its
  ``present`` keys: ``Softmax(q_rows kᵀ · s [+ bias])``.
- ``conv_add``: ``Conv(x, W) + z`` with z of the convolution's output shape (Castling-ViT's
  y/‖y‖ + dconv(v)) → ``com.microsoft.FusedConv`` with z as its sum input.
- ``assignment_scatter_add``: a merge's ``base + onehot(D) @ rows`` (the 0/1 assignment MatMul of
  ToMe's portable form, D provably in range) → one reducing ``ScatterND``.
- ``sum_of_squares_l2_normalization``: ``x / sqrt(sum(x * x))`` over the last axis → ``LpNormalization``.

They change the rounding, and a token selection can flip on a rounding change, so the
optimised graph is validated against the reference with the export's own fidelity check
(``validate.validate`` on the optimised graph), and it is timed against model.onnx in one
interleaved run: model.ort.onnx is written only when it passed and was faster.
"""

from __future__ import annotations

import collections
import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .artifact import METADATA, OPTIMIZED_ORT, Artifact, staged_copy, writer_lock, write_json_atomic
from .errors import VitedgeError
from .reading import file_sha256
from .runtime import graph_batch, ort_session

MS_DOMAIN = "com.microsoft"
# Largest additive regulariser a softmax may carry and still be fused into Softmax: with the
# row sum >= 1 (the max term is exp(0)), each probability moves by at most c1 + c2.
TINY = 1e-4


@dataclass
class GraphIndex:
    """Producers, consumers and constants of a graph, for pattern matching."""

    graph: onnx.GraphProto
    producer: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=lambda: collections.defaultdict(list))
    constants: dict = field(default_factory=dict)
    outputs: set = field(default_factory=set)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph)
        for init in graph.initializer:
            index.constants[init.name] = init
        for node in graph.node:
            for name in node.output:
                index.producer[name] = node
            for name in node.input:
                index.consumers[name].append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    index.constants[node.output[0]] = value
        index.outputs = {o.name for o in graph.output}
        return index

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def private(self, tensors, nodes) -> bool:
        """True when every tensor in ``tensors`` is read only by ``nodes`` and is no graph output."""
        ids = {id(n) for n in nodes}
        return all(t not in self.outputs and all(id(c) in ids for c in self.consumers[t]) for t in tensors)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _axes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """A reduction's axes (attribute before opset 18 for ReduceMax, input after)."""
    if len(node.input) > 1 and node.input[1]:
        value = index.value(node.input[1])
        return None if value is None else [int(v) for v in np.ravel(value)]
    axes = _attr(node, "axes")
    return None if axes is None else [int(v) for v in axes]


def _scalar(index: GraphIndex, name: str) -> float | None:
    value = index.value(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _replace(graph: onnx.GraphProto, removed: list[onnx.NodeProto], anchor: onnx.NodeProto, new) -> None:
    """Put ``new`` (a node or a list) where ``anchor`` was (its inputs exist before it, its readers come
    after) and drop ``removed``."""
    ids = {id(n) for n in removed}
    nodes = []
    for node in graph.node:
        if node is anchor:
            nodes.extend(new if isinstance(new, list) else [new])
        elif id(node) not in ids:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _last_axis(index: GraphIndex, ranks: dict, tensor: str, axes: list[int] | None) -> bool:
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or axes[0] == ranks.get(tensor, 0) - 1)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    return ranks


def fuse_regularised_softmax(model: onnx.ModelProto) -> int:
    """``(exp(x - max x) [+ c1]) / (sum exp(x - max x) [+ c2])`` over the last axis → ``Softmax(x)``; returns the count."""
    ranks = _ranks(model)

    def rewrite(index: GraphIndex, div: onnx.NodeProto) -> bool:
        match = _match_softmax(index, ranks, div)
        if not match:
            return False
        x, removed = match
        softmax = helper.make_node("Softmax", [x], [div.output[0]], name=f"{div.name or div.output[0]}_fused_softmax", axis=-1)
        _replace(index.graph, removed, div, softmax)
        return True

    return _rewrite_each(model, "Div", rewrite, GraphIndex, contrib=False)


def _tiny_term(index: GraphIndex, ranks: dict, node: onnx.NodeProto, base: str) -> tuple[str, float] | None:
    """``node`` = base + c with 0 <= c <= TINY provably (``_tiny_bound``): (base, bound)."""
    if node.op_type != "Add" or base not in node.input:
        return None
    bound = _tiny_bound(index, ranks, node.input[1] if node.input[0] == base else node.input[0])
    return None if bound is None else (base, bound)


def _tiny_bound(index: GraphIndex, ranks: dict, name: str) -> float | None:
    """An upper bound in [0, TINY] of tensor ``name`` that holds for every input, or None.

    Either a constant (or one expanded to a shape), or an eps share over the live entries of a mask M [B, N]:
    ``Where(M, k / count(M), z)`` with k, z constants and count(M) the number of true entries
    of M per image (>= 1 wherever M is true, so the share is <= k there).
    """
    value = index.value(name)
    if value is not None:
        return float(value.max()) if value.size and (value >= 0).all() and value.max() <= TINY else None
    expand = index.node(name, "Expand")
    if expand is not None:
        return _tiny_bound(index, ranks, expand.input[0])
    where = index.node(name, "Where")
    if where is None:
        return None
    mask = _base(index, where.input[0])
    otherwise = _tiny_bound(index, ranks, where.input[2])
    share = index.node(where.input[1], "Mul") or index.node(where.input[1], "Div")
    if otherwise is None or share is None:
        return None
    if share.op_type == "Div":
        k, count = share.input
    else:
        reciprocal = next((index.node(i, "Reciprocal") for i in share.input if index.node(i, "Reciprocal")), None)
        if reciprocal is None:
            return None
        k = share.input[1] if share.input[0] == reciprocal.output[0] else share.input[0]
        count = reciprocal.input[0]
    k_value = index.value(k)
    if k_value is None or not (k_value >= 0).all() or k_value.max() > TINY:
        return None
    reduce_sum = index.node(_base(index, count), "ReduceSum")
    cast = index.node(reduce_sum.input[0], "Cast") if reduce_sum is not None else None
    if cast is None or cast.input[0] != mask or ranks.get(mask) != 2 or _axes(index, reduce_sum) not in ([1], [-1]):
        return None
    return max(float(k_value.max()), otherwise)


def _base(index: GraphIndex, name: str) -> str:
    """``name`` before any Reshape/Unsqueeze (same elements, other axes)."""
    node = index.producer.get(name)
    while node is not None and node.op_type in ("Reshape", "Unsqueeze"):
        name = node.input[0]
        node = index.producer.get(name)
    return name


def _under_tiny_add(index: GraphIndex, ranks: dict, tensor: str, op_type: str):
    """(the ``op_type`` node making ``tensor``, None), or (it, the Add) when ``tensor`` is that node's
    output plus a provably tiny term (the eps of a regularised softmax); None otherwise."""
    node = index.node(tensor, op_type)
    if node is not None:
        return node, None
    add = index.node(tensor, "Add")
    if add is None:
        return None
    node = next((index.node(i, op_type) for i in add.input if index.node(i, op_type)), None)
    if node is None or not _tiny_term(index, ranks, add, node.output[0]):
        return None
    return node, add


def _match_softmax(index: GraphIndex, ranks: dict, div: onnx.NodeProto):
    numerator, denominator = div.input
    found_exp = _under_tiny_add(index, ranks, numerator, "Exp")
    found_sum = _under_tiny_add(index, ranks, denominator, "ReduceSum")
    if found_exp is None or found_sum is None:
        return None
    (exp_node, num_add), (reduce_sum, den_add) = found_exp, found_sum
    removed = [div] + [add for add in (num_add, den_add) if add is not None]
    if reduce_sum.input[0] != exp_node.output[0] or _attr(reduce_sum, "keepdims", 1) != 1:
        return None
    sub = index.node(exp_node.input[0], "Sub")
    if sub is None:
        return None
    x, shift = sub.input
    reduce_max = index.node(shift, "ReduceMax")
    if reduce_max is None or reduce_max.input[0] != x or _attr(reduce_max, "keepdims", 1) != 1:
        return None
    if not (_last_axis(index, ranks, x, _axes(index, reduce_max)) and _last_axis(index, ranks, x, _axes(index, reduce_sum))):
        return None
    removed += [reduce_sum, exp_node, sub, reduce_max]
    inner = [exp_node.output[0], sub.output[0], shift, reduce_sum.output[0]]
    inner += [n.output[0] for n in (num_add, den_add) if n is not None]
    if not index.private(inner, removed):
        return None
    return x, removed


def _unpacked(index: GraphIndex, name: str) -> tuple[str, int, list] | None:
    """``name`` = packed[i] along axis 0 (Gather with a scalar index, or Slice i:i+1 + Squeeze): (packed, i, nodes)."""
    gather = index.node(name, "Gather")
    if gather is not None:
        position = index.value(gather.input[1])
        if _attr(gather, "axis", 0) == 0 and position is not None and position.ndim == 0:
            return gather.input[0], int(position), [gather]
        return None
    squeeze = index.node(name, "Squeeze")
    if squeeze is None:
        return None
    squeeze_axes = _axes(index, squeeze)
    slice_node = index.node(squeeze.input[0], "Slice")
    if squeeze_axes != [0] or slice_node is None or len(slice_node.input) < 4:
        return None
    starts, ends, axes = (index.value(slice_node.input[i]) for i in (1, 2, 3))
    steps = index.value(slice_node.input[4]) if len(slice_node.input) > 4 and slice_node.input[4] else np.ones(1)
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes.ravel()[0]) != 0 or int(steps.ravel()[0]) != 1:
        return None
    start, end = int(starts.ravel()[0]), int(ends.ravel()[0])
    if end != start + 1:
        return None
    return slice_node.input[0], start, [squeeze, slice_node]


def _scores_side(index: GraphIndex, name: str) -> bool:
    """``name`` is q k^T (a MatMul with a transposed right side), maybe scaled by a scalar constant."""
    node = index.producer.get(name)
    while node is not None and node.op_type in ("Mul", "Div") and any(_scalar(index, i) is not None for i in node.input):
        node = index.producer.get(next(i for i in node.input if _scalar(index, i) is None))
    return node is not None and node.op_type == "MatMul" and index.node(node.input[1], "Transpose") is not None


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _rewrite_each(model: onnx.ModelProto, op_type: str, rewrite, index_type: type, contrib: bool = True,
                  domain: str = "") -> int:
    """Call ``rewrite(index, node)`` on the ``op_type`` nodes of ``domain`` (default ONNX's) until none
    changes the graph; the count.

    One rewrite at a time, with the index rebuilt after each: a rewrite rebuilds the node list.
    A rewrite into ONNX Runtime's contrib ops (``contrib``) has their domain declared."""
    graph, count = model.graph, 0
    domains = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
    while True:
        index = index_type.of(graph)
        if not any(rewrite(index, node) for node in [n for n in graph.node if n.op_type == op_type and n.domain in domains]):
            break
        count += 1
    if contrib and count and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return count


def fuse_attention(model: onnx.ModelProto) -> int:
    """Packed-QKV self-attention blocks whose inner tensors nobody else reads → ``com.microsoft.Attention``."""
    graph, shapes = model.graph, _shapes(model)

    def rewrite(index: GraphIndex, softmax: onnx.NodeProto) -> bool:
        match = _match_attention(index, softmax, shapes)
        if not match:
            return False
        inputs, heads, scale, output, removed, anchor, extra = match
        node = helper.make_node("Attention", inputs, [output], name=f"{softmax.name or output}_fused_attention",
                                domain=MS_DOMAIN, num_heads=heads, scale=scale)
        _replace(graph, removed, anchor, [*extra, node])
        return True

    return _rewrite_each(model, "Softmax", rewrite, GraphIndex)


def _match_attention(index: GraphIndex, softmax: onnx.NodeProto, shapes: dict):
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    probs = softmax.output[0]
    readers = index.consumers[probs]
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != probs:
        return None
    context = readers[0]
    merge = [index.consumers[context.output[0]][0]] if len(index.consumers[context.output[0]]) == 1 else []
    if not merge or merge[0].op_type != "Transpose" or list(_attr(merge[0], "perm", [])) != [0, 2, 1, 3]:
        return None
    flat = index.consumers[merge[0].output[0]]
    if len(flat) != 1 or flat[0].op_type != "Reshape":
        return None
    flatten = flat[0]
    removed = [softmax, context, merge[0], flatten]
    scale, key_bias = 1.0, None
    logits = index.producer.get(softmax.input[0])
    while logits is not None and logits.op_type in ("Mul", "Add", "Div") and logits.domain in ("", "ai.onnx"):
        constant = next((i for i in logits.input if index.value(i) is not None), None)
        value = index.value(constant) if constant is not None else None
        if logits.op_type == "Add" and (value is None or value.any()):
            # an additive bias on the logits (a key mask, a log token size): Attention's attention_bias,
            # only outside every scale (s * (q k^T + b) would scale it) and only one
            sides = [i for i in logits.input if _scores_side(index, i)]
            if key_bias is not None or scale != 1.0 or len(sides) != 1:
                return None
            other = sides[0]
            key_bias = logits.input[1] if logits.input[0] == other else logits.input[0]
        elif logits.op_type == "Add":
            other = logits.input[1] if logits.input[0] == constant else logits.input[0]
        elif value is None or value.size != 1 or (logits.op_type == "Div" and logits.input[1] != constant):
            return None
        else:
            other = logits.input[1] if logits.input[0] == constant else logits.input[0]
            scale = scale * float(value.ravel()[0]) if logits.op_type == "Mul" else scale / float(value.ravel()[0])
        removed.append(logits)
        logits = index.producer.get(other)
    if logits is None or logits.op_type != "MatMul":
        return None
    scores = logits
    removed.append(scores)
    query, key_t = scores.input
    q_scale = index.node(query, "Mul")
    if q_scale is not None:
        constant = next((i for i in q_scale.input if _scalar(index, i) is not None), None)
        if constant is None:
            return None
        scale *= _scalar(index, constant)
        removed.append(q_scale)
        query = q_scale.input[1] if q_scale.input[0] == constant else q_scale.input[0]
    transpose_k = index.node(key_t, "Transpose")
    if transpose_k is None or list(_attr(transpose_k, "perm", [])) != [0, 1, 3, 2]:
        return None
    removed.append(transpose_k)
    parts = [_unpacked(index, name) for name in (query, transpose_k.input[0], context.input[1])]
    if any(p is None for p in parts) or len({p[0] for p in parts}) != 1 or [p[1] for p in parts] != [0, 1, 2]:
        return None
    for part in parts:
        removed += part[2]
    packed = parts[0][0]
    split = index.node(packed, "Transpose")
    if split is None or list(_attr(split, "perm", [])) != [2, 0, 3, 1, 4]:
        return None
    heads_view = index.node(split.input[0], "Reshape")
    shape = index.value(heads_view.input[1]) if heads_view is not None else None
    if shape is None or shape.size != 5 or int(shape[2]) != 3 or int(shape[3]) < 1 or int(shape[4]) < 1:
        return None
    heads, head_dim = int(shape[3]), int(shape[4])
    flat_shape = index.value(flatten.input[1])
    if flat_shape is None or flat_shape.size != 3 or int(flat_shape[2]) not in (-1, heads * head_dim):
        return None
    removed += [split, heads_view]
    linear = index.producer.get(heads_view.input[0])
    bias = None
    if linear is not None and linear.op_type == "Add":
        bias = next((i for i in linear.input if index.value(i) is not None and index.value(i).ndim == 1), None)
        if bias is None:
            return None
        removed.append(linear)
        linear = index.producer.get(linear.input[1] if linear.input[0] == bias else linear.input[0])
    if linear is None or linear.op_type != "MatMul":
        return None
    x, weight = linear.input
    weights = index.value(weight)
    if weights is None or weights.ndim != 2 or weights.shape[1] != 3 * heads * head_dim or len(shapes.get(x) or []) != 3:
        return None  # Attention takes [B, N, C] tokens and a [C, 3 H D] weight
    removed.append(linear)
    inner = [t for n in removed if n is not flatten for t in n.output]
    if not index.private(inner, removed):
        return None
    extra, inputs = [], [x, weight, bias]
    if key_bias is not None:  # Attention takes a bias of shape [B or 1, H or 1, S, T]
        tokens = int(shape[1])
        dims = shapes.get(key_bias)
        if (tokens < 1 or dims is None or len(dims) != 4 or dims[1] not in (1, heads) or dims[2] not in (1, tokens)
                or dims[3] != tokens):
            return None
        attention_bias = key_bias
        if dims[2] == 1:
            rows = f"{key_bias}_rows_shape"
            if rows not in index.constants:
                index.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, tokens, 1], np.int64), rows))
                index.constants[rows] = index.graph.initializer[-1]
            attention_bias = f"{key_bias}_rows_{softmax.name or softmax.output[0]}"
            extra.append(helper.make_node("Expand", [key_bias, rows], [attention_bias], name=f"{attention_bias}_expand"))
        inputs = [x, weight, None, "", "", attention_bias]
    if bias is None:
        bias = f"{weight}_zero_bias"
        if bias not in index.constants:
            index.graph.initializer.append(numpy_helper.from_array(np.zeros(weights.shape[1], weights.dtype), bias))
    inputs[2] = bias
    return inputs, heads, scale, flatten.output[0], removed, flatten, extra


# ---- Passes for blocks whose q/k/v are read elsewhere, and for L2 normalisations ----


class _RecordingIndex(GraphIndex):
    """A GraphIndex whose privacy check always passes, so ``_match_attention`` returns a block whose
    q/k/v (or what they are unpacked from) other nodes read too; the caller decides what may be shared."""

    def private(self, tensors, nodes) -> bool:
        return True


def fuse_shared_qkv_attention(model: onnx.ModelProto) -> int:
    """Packed-QKV attention blocks whose q, k or v another node reads too (ToMe's keys feed its
    matching) → ``Split`` of the QKV projection + ``com.microsoft.MultiHeadAttention``.

    The QKV projection and the unpacking of whatever is read elsewhere stay for those readers; the
    attention map, the scores and the context must still be private (MultiHeadAttention cannot
    hand them out)."""
    graph, shapes = model.graph, _shapes(model)

    def rewrite(index: GraphIndex, softmax: onnx.NodeProto) -> bool:
        match = _match_attention(index, softmax, shapes)
        plan = _shared_qkv_plan(index, match) if match else None
        if not plan:
            return False
        inputs, heads, scale, output, _, anchor, extra = match
        removed, projection, view, rebuilt = plan
        widths, heads_shape = f"{projection}_qkv_widths", f"{projection}_heads_shape"
        if widths not in index.constants:
            graph.initializer.append(numpy_helper.from_array(np.array([view[3] * view[4]] * 3, np.int64), widths))
            graph.initializer.append(numpy_helper.from_array(np.array([view[0], view[1], view[3], view[4]], np.int64),
                                                             heads_shape))
        parts = [f"{projection}_{name}_{softmax.name or output}" for name in "qkv"]
        split = helper.make_node("Split", [projection, widths], parts, name=f"{parts[0]}_split", axis=-1)
        for tensor, position in rebuilt.items():  # [B, N, H*D] -> [B, H, N, D], as the reader had it
            extra.append(helper.make_node("Reshape", [parts[position], heads_shape], [f"{tensor}_heads"],
                                          name=f"{tensor}_heads_view"))
            extra.append(helper.make_node("Transpose", [f"{tensor}_heads"], [tensor], name=f"{tensor}_heads_first",
                                          perm=[0, 2, 1, 3]))
        node = helper.make_node("MultiHeadAttention", [*parts, "", "", inputs[5] if len(inputs) > 5 else ""],
                                [output], name=f"{softmax.name or output}_fused_mha", domain=MS_DOMAIN,
                                num_heads=heads, scale=scale)
        _replace(graph, removed, anchor, [split, *extra, node])
        return True

    return _rewrite_each(model, "Softmax", rewrite, _RecordingIndex)


# --- attention with recomputed rows: blocks whose map feeds a token selection through a few rows ---

# At most this share of the map's rows may be read outside the block: recomputing more would not pay.
ROW_SHARE = 0.25


def fuse_attention_with_rows(model: onnx.ModelProto) -> int:
    """Packed-QKV attention blocks whose map is read elsewhere only through a few rows (the class-token
    row of a token selection: ``attn[:, :, 0]`` by Gather/Slice on the query axis) → one
    ``com.microsoft.Attention`` plus those rows recomputed as ``Softmax(q_rows kᵀ · s [+ bias])``,
    a [B, H, rows, N] product; returns the count.

    The keys come from Attention's ``present`` output (K and V in [B, H, N, D], no second GEMM);
    only the q rows take a small GEMM of their own. A v (or k, q) read by other nodes, e.g. value
    norms, is taken from ``present`` too (q is recomputed). Measured faster than MultiHeadAttention
    on split q, k, v (ORT 1.32 CPU has no packed-QKV MultiHeadAttention; the split costs copies).
    Any other reader of the map, or a row read not recognised, leaves the block as it is.
    """
    graph, shapes = model.graph, _shapes(model)

    def rewrite(index: GraphIndex, softmax: onnx.NodeProto) -> bool:
        match = _match_attention_with_rows(index, softmax, shapes)
        if not match:
            return False
        new_nodes, removed, anchor, rewired = match
        placed = {id(anchor): new_nodes, **{id(old): [replacement] for old, replacement in rewired}}
        dropped = {id(n) for n in removed}
        nodes = [m for n in graph.node for m in placed.get(id(n), [] if id(n) in dropped else [n])]
        del graph.node[:]
        graph.node.extend(nodes)
        _sort_topologically(graph)
        return True

    return _rewrite_each(model, "Softmax", rewrite, GraphIndex)


def _shared_qkv_plan(index: GraphIndex, match) -> tuple[list, str, np.ndarray, dict] | None:
    """For a matched block: (nodes to remove, the QKV projection's output, its [B, N, 3, H, D] view,
    {unpacked q/k/v read elsewhere: 0/1/2}) when only the q/k/v unpacking path is read from outside, else None."""
    removed, anchor = match[4], match[5]
    block = [n for n in removed if n is not anchor]
    ids = {id(n) for n in removed}
    producer = {t: n for n in block for t in n.output}
    unpacks = [n for n in block if n.op_type in ("Squeeze", "Gather")]
    upstream, stack = set(), list(unpacks)
    while stack:  # the unpacked q/k/v and everything inside the block they come from
        node = stack.pop()
        if id(node) not in upstream:
            upstream.add(id(node))
            stack += [producer[i] for i in node.input if i in producer]
    shared = {t for n in block for t in n.output
              if t in index.outputs or any(id(c) not in ids for c in index.consumers[t])}
    if not shared or any(id(producer[t]) not in upstream for t in shared):
        return None
    heads_view = next(n for n in block if n.op_type == "Reshape" and id(n) in upstream)
    projection = heads_view.input[0]
    # an unpacked q/k/v read elsewhere is rebuilt from its Split part ([B, N, H*D] -> [B, H, N, D]), a
    # copy of one third of the packed tensor; anything else read elsewhere keeps its nodes
    rebuilt = {t: _unpacked(index, t)[1] for t in shared if producer[t] in unpacks}
    kept, stack = set(), [producer[t] for t in [*shared, projection] if t in producer and t not in rebuilt]
    while stack:  # what the outside readers and the Split still need
        node = stack.pop()
        if id(node) not in kept:
            kept.add(id(node))
            stack += [producer[i] for i in node.input if i in producer]
    return [n for n in removed if id(n) not in kept], projection, index.value(heads_view.input[1]), rebuilt


def fuse_head_mean_key_attention(model: onnx.ModelProto) -> int:
    """Packed-QKV attention blocks whose keys are read elsewhere only as their mean over the heads
    (ToMe's matching metric) → ``com.microsoft.Attention`` + that mean folded into the weights:
    mean_h(x Wk_h + bk_h) = x mean_h(Wk_h) + mean_h(bk_h), a [C, D] MatMul beside the fused block
    (1/(3H) of the QKV GEMM), so the block needs no unpacked keys at all."""
    graph, shapes = model.graph, _shapes(model)

    def rewrite(index: GraphIndex, softmax: onnx.NodeProto) -> bool:
        match = _match_attention(index, softmax, shapes)
        readers = _head_mean_readers(index, match) if match else None
        if not readers:
            return False
        inputs, heads, scale, output, removed, anchor, extra = match
        x, weight, bias = inputs[0], inputs[1], inputs[2]
        weights, bias_values = index.value(weight), index.value(bias)
        width = weights.shape[1] // 3
        folded_weight, folded_bias = f"{weight}_key_head_mean", f"{weight}_key_head_mean_bias"
        if folded_weight not in index.constants:
            key_weights = weights[:, width:2 * width].reshape(weights.shape[0], heads, width // heads)
            key_bias = bias_values[width:2 * width].reshape(heads, width // heads)
            graph.initializer.append(numpy_helper.from_array(key_weights.mean(axis=1), folded_weight))
            graph.initializer.append(numpy_helper.from_array(key_bias.mean(axis=0), folded_bias))
        node = helper.make_node("Attention", inputs, [output], name=f"{softmax.name or output}_fused_attention",
                                domain=MS_DOMAIN, num_heads=heads, scale=scale)
        replacements = {id(anchor): [*extra, node]}
        for reader in readers:  # each at its own place: its readers may come before the block's end
            mean = reader.output[0]
            projected = f"{mean}_projected"
            folded = [helper.make_node("MatMul", [x, folded_weight], [projected], name=f"{mean}_folded_matmul")]
            if _attr(reader, "keepdims", 1):
                folded.append(helper.make_node("Add", [projected, folded_bias], [f"{mean}_flat"], name=f"{mean}_folded_bias"))
                folded.append(helper.make_node("Unsqueeze", [f"{mean}_flat", "_head_axis"], [mean], name=f"{mean}_unsqueeze"))
                if "_head_axis" not in index.constants:
                    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "_head_axis"))
                    index.constants["_head_axis"] = graph.initializer[-1]
            else:
                folded.append(helper.make_node("Add", [projected, folded_bias], [mean], name=f"{mean}_folded_bias"))
            replacements[id(reader)] = folded
        _replace_each(graph, [*removed, *readers], replacements)
        return True

    return _rewrite_each(model, "Softmax", rewrite, _RecordingIndex)


def _head_mean_readers(index: GraphIndex, match) -> list[onnx.NodeProto] | None:
    """The outside readers of a matched block when they are only ReduceMean over the heads axis of its
    unpacked keys ([B, H, N, D], axis 1), else None."""
    inputs, _, _, _, removed, anchor, _ = match
    if not inputs[2] or index.value(inputs[2]) is None:
        return None
    ids = {id(n) for n in removed}
    block = [n for n in removed if n is not anchor]
    shared = {t for n in block for t in n.output
              if t in index.outputs or any(id(c) not in ids for c in index.consumers[t])}
    unpacked = {t: _unpacked(index, t) for t in shared}
    keys = [t for t, part in unpacked.items() if part is not None and part[1] == 1 and index.producer[t] in part[2]]
    if len(shared) != 1 or len(keys) != 1:
        return None
    readers = [c for c in index.consumers[keys[0]] if id(c) not in ids]
    if not all(r.op_type == "ReduceMean" and r.domain in ("", "ai.onnx") and _axes(index, r) in ([1], [-3]) for r in readers):
        return None
    return readers


def _replace_each(graph: onnx.GraphProto, removed: list[onnx.NodeProto], replacements: dict) -> None:
    """Drop ``removed`` and put each ``replacements[id(node)]`` list where that node was."""
    ids = {id(n) for n in removed}
    nodes = []
    for node in graph.node:
        if id(node) in replacements:
            nodes.extend(replacements[id(node)])
        elif id(node) not in ids:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _fuse_l2_normalization(model: onnx.ModelProto, norm_nodes) -> int:
    """``x / ‖x‖`` over x's last axis → ``LpNormalization(x, axis -1, p 2)``; returns the count.

    ``norm_nodes(index, div)`` gives the nodes that compute the Div's divisor as the norm of its
    numerator, read by nothing else, the reduction first (its axes and keepdims are checked here), or None."""
    ranks = _ranks(model)

    def rewrite(index: GraphIndex, div: onnx.NodeProto) -> bool:
        nodes = norm_nodes(index, div)
        if nodes is None or _attr(nodes[0], "keepdims", 1) != 1:
            return False
        if not _last_axis(index, ranks, div.input[0], _axes(index, nodes[0])):
            return False
        node = helper.make_node("LpNormalization", [div.input[0]], [div.output[0]],
                                name=f"{div.name or div.output[0]}_l2_normalization", axis=-1, p=2)
        _replace(index.graph, [div, *nodes], div, node)
        return True

    return _rewrite_each(model, "Div", rewrite, GraphIndex, contrib=False)


def _reduce_l2_norm(index: GraphIndex, div: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """[ReduceL2] when the Div's divisor is ReduceL2 of its numerator, read by nothing else."""
    reduce_l2 = index.node(div.input[1], "ReduceL2")
    if reduce_l2 is None or reduce_l2.input[0] != div.input[0] or not index.private([div.input[1]], [div]):
        return None
    return [reduce_l2]


def fuse_l2_normalization(model: onnx.ModelProto) -> int:
    """``x / ReduceL2(x, last axis, keepdims)`` → ``LpNormalization(x, p=2)`` (Castling-ViT's q/‖q‖, k/‖k‖),
    where nothing else reads the norm; returns the count."""
    return _fuse_l2_normalization(model, _reduce_l2_norm)


def _row_read(index: GraphIndex, node: onnx.NodeProto, probs: str, tokens: int) -> list[int] | None:
    """The query rows (0-based) that ``node`` reads from the [B, H, N, N] map ``probs``, or None when it
    is no constant Gather/Slice along the query axis."""
    if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] != probs:
        return None
    if node.op_type == "Gather":
        position = index.value(node.input[1])
        if _attr(node, "axis", 0) not in (2, -2) or position is None or position.ndim > 1:
            return None
        rows = [int(v) for v in np.ravel(position)]
        return rows if rows and all(-tokens <= r < tokens for r in rows) else None
    if node.op_type == "Slice" and len(node.input) >= 4:
        starts, ends, axes = (index.value(node.input[i]) for i in (1, 2, 3))
        steps = index.value(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1, np.int64)
        if (any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes.ravel()[0]) not in (2, -2)
                or int(steps.ravel()[0]) == 0):
            return None
        rows = list(range(tokens))[int(starts.ravel()[0]):int(ends.ravel()[0]):int(steps.ravel()[0])]
        return rows or None
    return None


def _match_attention_with_rows(index: GraphIndex, softmax: onnx.NodeProto, shapes: dict):
    probs = softmax.output[0]
    dims = shapes.get(probs)
    if probs in index.outputs or dims is None or len(dims) != 4 or not dims[2] or dims[2] != dims[3]:
        return None
    tokens = dims[2]
    readers = index.consumers[probs]
    contexts = [n for n in readers if n.op_type == "MatMul" and n.input[0] == probs]
    row_readers = [n for n in readers if n not in contexts]
    if len(contexts) != 1 or not row_readers:
        return None
    reads = [_row_read(index, n, probs, tokens) for n in row_readers]
    if any(r is None for r in reads):
        return None
    rows = sorted({r % tokens for read in reads for r in read})
    if len(rows) > max(1, int(ROW_SHARE * tokens)):
        return None
    # q, k, v as the block reads them: other readers are allowed, they get the tensors from present / rebuilt
    context = contexts[0]
    block = _block_tensors(index, softmax, context)
    if block is None:
        return None
    query, key, value, inside = block
    hidden = {id(n) for n in row_readers}
    outside = {}
    for name in (query, key, value):
        others = [n for n in index.consumers[name] if id(n) not in inside]
        if name in index.outputs:
            return None
        hidden.update(id(n) for n in others)
        outside[name] = bool(others)
    view = GraphIndex(index.graph, index.producer, collections.defaultdict(list), dict(index.constants), index.outputs)
    for name, nodes in index.consumers.items():
        view.consumers[name] = [n for n in nodes if id(n) not in hidden]
    flat_rows = _flat_tokens(index, context, shapes)
    if flat_rows is not None:  # [B·N, C] (batch folded into the tokens): matched as [B, N, C], reshaped after
        view.constants[flat_rows] = numpy_helper.from_array(np.array([0, 0, -1], np.int64), flat_rows)
    match = _match_attention(view, softmax, shapes)
    if match is None:
        return None
    inputs, heads, scale, output, removed, anchor, extra = match
    attended = output if flat_rows is None else f"{softmax.name or probs}_attended"
    split = next(n for n in removed if n.op_type == "Transpose" and list(_attr(n, "perm", [])) == [2, 0, 3, 1, 4])
    head_dim = int(index.value(index.producer[split.input[0]].input[1])[4])
    width = heads * head_dim
    x, weight, bias = inputs[:3]
    weights = index.value(weight)
    biases = index.value(bias) if index.value(bias) is not None else np.zeros(3 * width, weights.dtype)
    key_bias = (extra[0].input[0] if extra else inputs[5]) if len(inputs) > 3 else None
    tag = softmax.name or probs

    def const(name, array):
        full = f"{tag}_{name}"
        index.graph.initializer.append(numpy_helper.from_array(np.asarray(array), full))
        return full

    present = f"{tag}_present"
    heads_shape = const("heads_shape", np.array([0, -1, heads, head_dim], np.int64))
    new = [*extra, helper.make_node("Attention", inputs, [attended, present], name=f"{tag}_fused_attention",
                                    domain=MS_DOMAIN, num_heads=heads, scale=scale)]
    if flat_rows is not None:
        new.append(helper.make_node("Reshape", [attended, flat_rows], [output], name=f"{tag}_fold_batch"))
    k_heads = key if outside[key] else f"{tag}_k_heads"
    new.append(helper.make_node("Gather", [present, const("key_slot", np.array(0, np.int64))], [k_heads], axis=0))
    if outside[value]:
        new.append(helper.make_node("Gather", [present, const("value_slot", np.array(1, np.int64))], [value], axis=0))
    w_query, b_query = const("w_query", weights[:, :width]), const("b_query", biases[:width])
    q_rows = f"{tag}_q_rows"
    new += [helper.make_node("Gather", [x, const("rows", np.array(rows, np.int64))], [f"{q_rows}_x"], axis=1),
            helper.make_node("MatMul", [f"{q_rows}_x", w_query], [f"{q_rows}_mm"]),
            helper.make_node("Add", [f"{q_rows}_mm", b_query], [f"{q_rows}_tokens"]),
            helper.make_node("Reshape", [f"{q_rows}_tokens", heads_shape], [f"{q_rows}_heads"]),
            # k q_rowsᵀ, then the small [B, H, N, rows] product transposed: the keys are never copied
            helper.make_node("Transpose", [f"{q_rows}_heads"], [q_rows], perm=[0, 2, 3, 1]),
            helper.make_node("MatMul", [k_heads, q_rows], [f"{tag}_row_scores_t"]),
            helper.make_node("Transpose", [f"{tag}_row_scores_t"], [f"{tag}_row_scores"], perm=[0, 1, 3, 2]),
            helper.make_node("Mul", [f"{tag}_row_scores", const("scale", np.array(scale, np.float32))],
                             [f"{tag}_row_logits"])]
    if outside[query]:  # the full queries, for their other readers
        new += [helper.make_node("MatMul", [x, w_query], [f"{query}_rebuilt_mm"]),
                helper.make_node("Add", [f"{query}_rebuilt_mm", b_query], [f"{query}_rebuilt_tokens"]),
                helper.make_node("Reshape", [f"{query}_rebuilt_tokens", heads_shape], [f"{query}_rebuilt_heads"]),
                helper.make_node("Transpose", [f"{query}_rebuilt_heads"], [query], perm=[0, 2, 1, 3])]
    logits = f"{tag}_row_logits"
    if key_bias:
        bias_rows = key_bias
        if (shapes.get(key_bias) or [None] * 4)[2] != 1:
            bias_rows = f"{tag}_bias_rows"
            new.append(helper.make_node("Gather", [key_bias, const("bias_rows", np.array(rows, np.int64))],
                                        [bias_rows], axis=2))
        new.append(helper.make_node("Add", [logits, bias_rows], [f"{tag}_row_biased"]))
        logits = f"{tag}_row_biased"
    row_probs = f"{tag}_row_probs"
    new.append(helper.make_node("Softmax", [logits], [row_probs], axis=-1))
    rewired = []
    for reader, read in zip(row_readers, reads):
        positions = np.array([rows.index(r % tokens) for r in read], np.int64)
        if reader.op_type == "Gather":
            positions = positions.reshape(np.shape(index.value(reader.input[1])))
        rewired.append((reader, helper.make_node("Gather", [row_probs, const(f"{reader.output[0]}_rows", positions)],
                                                 [reader.output[0]], name=f"{reader.name or reader.output[0]}_rows",
                                                 axis=2)))
    return new, removed, anchor, rewired


def _flat_tokens(index: GraphIndex, context: onnx.NodeProto, shapes: dict) -> str | None:
    """The shape input of the block's final Reshape when it folds [B, N, H·D] into [B·N, H·D], else None."""
    dims = shapes.get(context.output[0])
    merge = index.consumers[context.output[0]]
    flatten = index.consumers[merge[0].output[0]] if len(merge) == 1 else []
    if dims is None or len(dims) != 4 or None in (dims[1], dims[3]) or len(flatten) != 1 or flatten[0].op_type != "Reshape":
        return None
    shape = index.value(flatten[0].input[1])
    if shape is None or shape.size != 2 or int(shape[1]) != dims[1] * dims[3]:
        return None
    if int(shape[0]) != -1 and (None in (dims[0], dims[2]) or int(shape[0]) != dims[0] * dims[2]):
        return None
    return flatten[0].input[1]


def _block_tensors(index: GraphIndex, softmax: onnx.NodeProto, context: onnx.NodeProto):
    """(q, k, v, ids of the block's own nodes that read them) of the attention around ``softmax``, or None."""
    node, inside = index.producer.get(softmax.input[0]), {id(context)}
    while node is not None and node.op_type in ("Mul", "Add", "Div"):
        node = index.producer.get(next((i for i in node.input if _scores_side(index, i)), node.input[0]))
    if node is None or node.op_type != "MatMul":
        return None
    transpose_k = index.node(node.input[1], "Transpose")
    if transpose_k is None:
        return None
    inside.update((id(node), id(transpose_k)))
    query = node.input[0]
    q_scale = index.node(query, "Mul")
    if q_scale is not None:
        inside.add(id(q_scale))
        query = next((i for i in q_scale.input if _scalar(index, i) is None), query)
    return query, transpose_k.input[0], context.input[1], inside


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its inputs' producers, keeping the present order where it holds."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        remaining = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({i for n in remaining for i in n.input if i not in known})[:5]
            raise ValueError(f"graph has a cycle or a missing input after a rewrite: {missing}")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


# --- conv_add ---
def _dims(model: onnx.ModelProto) -> dict[str, tuple]:
    """Each tensor's dims as inferred, a symbolic one by its name (a dynamic batch matches itself); a dim
    shape inference left unknown is None."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in info.type.tensor_type.shape.dim)
    return dims


def fuse_conv_add(model: onnx.ModelProto) -> int:
    """``Conv(x, W [, b]) + z`` with z of the convolution's output shape and the convolution read by
    nothing else → ``com.microsoft.FusedConv(x, W, b, z)``: the sum is accumulated by the convolution's
    GEMM, so the separate Add's pass over the tensor goes (Castling-ViT's y/‖y‖ + dconv(v)); returns the count."""
    dims = _dims(model)

    def rewrite(index: GraphIndex, add: onnx.NodeProto) -> bool:
        conv = next((index.node(i, "Conv") for i in add.input if index.node(i, "Conv")), None)
        if conv is None or add.input[0] == add.input[1] or not index.private([conv.output[0]], [add]):
            return False
        addend = add.input[1] if add.input[0] == conv.output[0] else add.input[0]
        shape = dims.get(conv.output[0])
        if not shape or None in shape or dims.get(addend) != shape:  # FusedConv's sum input does not broadcast
            return False
        bias = conv.input[2] if len(conv.input) > 2 else ""
        attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        node = helper.make_node("FusedConv", [conv.input[0], conv.input[1], bias, addend], [add.output[0]],
                                name=f"{conv.name or conv.output[0]}_with_sum", domain=MS_DOMAIN, **attributes)
        _replace(index.graph, [conv, add], add, node)
        return True

    return _rewrite_each(model, "Add", rewrite, GraphIndex)


# --- assignment_scatter_add, sum_of_squares_l2_normalization ---
# ToMe-style merges, written TensorRT-legal in model.onnx: ``base + onehot(D) @ rows`` with the 0/1
# assignment ``onehot(D)[b, j, m] = (j == D[b, m])`` built by Equal + Cast, and the metric normalised as
# ``m / sqrt(sum(m * m))``. ONNX Runtime runs both as several small kernels (Equal, Cast, a batched
# [n, r] x [r, C] product, the Add; Mul, ReduceSum, Sqrt, Div); one reducing scatter and one
# LpNormalization do the same work.

INDEX_CARRIERS = ("Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity")


def _index_bound(index: GraphIndex, shapes: dict, name: str) -> int | None:
    """An n with 0 <= every value of ``name`` < n for every input, or None: TopK indices along an axis of
    length n, maybe reshaped or picked from (Gather/GatherElements take values from their data)."""
    node = index.producer.get(name)
    while node is not None and node.domain in ("", "ai.onnx") and (
            node.op_type in INDEX_CARRIERS or (node.op_type in ("Gather", "GatherElements") and name == node.output[0])):
        name = node.input[0]
        node = index.producer.get(name)
    if node is None or node.op_type != "TopK" or node.domain not in ("", "ai.onnx") or len(node.output) < 2 or name != node.output[1]:
        return None
    dims = shapes.get(node.input[0])
    if not dims:
        return None
    length = dims[_attr(node, "axis", -1) % len(dims)]
    return length if isinstance(length, int) and length > 0 else None


def _assignment(index: GraphIndex, shapes: dict, name: str):
    """``name`` = Cast(Equal(arange(n) as [n, 1], Unsqueeze(D [B, r], axis 1))) to float with D provably in
    [0, n): (D, n, nodes), else None. Then ``name[b, j, m] = (j == D[b, m])``, D's scatter form."""
    cast = index.node(name, "Cast")
    equal = index.node(cast.input[0], "Equal") if cast is not None else None
    if equal is None or _attr(cast, "to") != onnx.TensorProto.FLOAT:
        return None
    for position, other in ((equal.input[0], equal.input[1]), (equal.input[1], equal.input[0])):
        column, unsqueeze = index.value(position), index.node(other, "Unsqueeze")
        if column is None or unsqueeze is None or column.ndim < 2 or column.shape[-1] != 1 or column.ndim > 3:
            continue
        n = column.shape[-2]
        if column.size != n or not np.array_equal(column.reshape(-1), np.arange(n)) or _axes(index, unsqueeze) != [1]:
            continue
        destination = unsqueeze.input[0]
        if len(shapes.get(destination) or []) != 2 or _index_bound(index, shapes, destination) != n:
            continue
        return destination, n, [cast, equal, unsqueeze]
    return None


def _scatter_indices(graph: onnx.GraphProto, shapes: dict, destination: str, tag: str) -> list:
    """Nodes making ``{tag}_scatter_index`` [B, r, 2] = (b, D[b, m]) from D [B, r]: ScatterND's row addresses.
    The batch ids are a constant when the batch is fixed, else a Range over D's batch."""
    batch, merged = shapes[destination]

    def const(name, array):
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), f"{tag}_{name}"))
        return f"{tag}_{name}"

    nodes = [helper.make_node("Unsqueeze", [destination, const("last_axis", np.array([-1], np.int64))], [f"{tag}_rows_at"], name=f"{tag}_rows_at")]
    if isinstance(batch, int):
        batch_ids = const("batch_ids", np.repeat(np.arange(batch, dtype=np.int64), merged).reshape(batch, merged, 1))
    else:
        batch_ids = f"{tag}_batch_ids"
        nodes += [helper.make_node("Shape", [destination], [f"{tag}_dest_shape"], name=f"{tag}_dest_shape"),
                  helper.make_node("Gather", [f"{tag}_dest_shape", const("zero", np.array(0, np.int64))], [f"{tag}_batch"], name=f"{tag}_batch", axis=0),
                  helper.make_node("Range", [const("start", np.array(0, np.int64)), f"{tag}_batch", const("step", np.array(1, np.int64))],
                                   [f"{tag}_batch_range"], name=f"{tag}_batch_range"),
                  helper.make_node("Reshape", [f"{tag}_batch_range", const("column", np.array([-1, 1, 1], np.int64))],
                                   [f"{tag}_batch_column"], name=f"{tag}_batch_column"),
                  helper.make_node("Expand", [f"{tag}_batch_column", const("per_row", np.array([1, merged, 1], np.int64))],
                                   [batch_ids], name=batch_ids)]
    nodes.append(helper.make_node("Concat", [batch_ids, f"{tag}_rows_at"], [f"{tag}_scatter_index"], name=f"{tag}_scatter_index", axis=-1))
    return nodes


def fuse_assignment_scatter_add(model: onnx.ModelProto) -> int:
    """``base + onehot(D) @ rows`` (the 0/1 assignment MatMul of a merge) → ScatterND(base, (b, D), rows,
    reduction add); returns the count. Exact up to the order of the sums into each row. ScatterND rather
    than ScatterElements: ORT's ScatterElements reduces element by element (slower than the MatMul it
    replaces, measured), ScatterND adds whole rows."""
    if max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0) < 16:
        return 0  # ScatterND's reduction attribute: opset 16 on
    shapes = _shapes(model)

    def rewrite(index: GraphIndex, add: onnx.NodeProto) -> bool:
        match = _assignment_add(index, shapes, add)
        if match is None:
            return False
        base, destination, rows, removed = match
        tag = add.name or add.output[0]
        new = _scatter_indices(index.graph, shapes, destination, tag)
        new.append(helper.make_node("ScatterND", [base, f"{tag}_scatter_index", rows], [add.output[0]],
                                    name=f"{tag}_scatter_add", reduction="add"))
        _replace(index.graph, removed, add, new)
        return True

    return _rewrite_each(model, "Add", rewrite, GraphIndex, contrib=False)


def _assignment_add(index: GraphIndex, shapes: dict, add: onnx.NodeProto):
    """(base, D, rows, nodes to remove) when ``add`` is base [B, n, C] + onehot(D) [B, n, r] @ rows [B, r, C]."""
    for base, product in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        matmul = index.node(product, "MatMul")
        found = _assignment(index, shapes, matmul.input[0]) if matmul is not None else None
        if found is None:
            continue
        destination, n, nodes = found
        rows = matmul.input[1]
        base_shape, rows_shape, dest_shape = shapes.get(base), shapes.get(rows), shapes.get(destination)
        if (not base_shape or not rows_shape or len(base_shape) != 3 or not isinstance(dest_shape[1], int) or len(rows_shape) != 3
                or base_shape[1] != n or None in (base_shape[2], rows_shape[1]) or base_shape[2] != rows_shape[2]
                or rows_shape[1] != dest_shape[1] or shapes.get(add.output[0]) != base_shape
                or not base_shape[0] == rows_shape[0] == dest_shape[0]):
            continue
        cast, equal, unsqueeze = nodes
        removed = [add, matmul, cast, equal]
        if not index.private([product, cast.output[0], equal.output[0]], removed):
            continue
        if index.private([unsqueeze.output[0]], [equal]):
            removed.append(unsqueeze)
        return base, destination, rows, removed
    return None


def _sum_of_squares_norm(index: GraphIndex, div: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """[ReduceSum, Sqrt, Mul] when the Div's divisor is Sqrt(ReduceSum(x · x)) of its numerator x,
    the intermediates read by nothing else."""
    x = div.input[0]
    sqrt = index.node(div.input[1], "Sqrt")
    reduce_sum = index.node(sqrt.input[0], "ReduceSum") if sqrt is not None else None
    square = index.node(reduce_sum.input[0], "Mul") if reduce_sum is not None else None
    if square is None or list(square.input) != [x, x]:
        return None
    if not index.private([div.input[1], sqrt.input[0], square.output[0]], [div, sqrt, reduce_sum]):
        return None
    return [reduce_sum, sqrt, square]


def fuse_sum_of_squares_l2_normalization(model: onnx.ModelProto) -> int:
    """``x / Sqrt(ReduceSum(x * x, last axis, keepdims))`` → ``LpNormalization(x, p=2)`` where nothing else
    reads the sum or the norm; returns the count (the form written where ReduceL2 would stop shape inference)."""
    return _fuse_l2_normalization(model, _sum_of_squares_norm)


def _key_mask(index: GraphIndex, dims: dict, bias: str, batch, tokens: int) -> tuple[str, float] | None:
    """(condition [B, N] or [B, 1, 1, N], value) when the attention bias ``bias`` is ``Where(condition, 0,
    value)`` over the keys, seen through the Expand over query rows and any Unsqueeze / Reshape."""
    expand = index.node(bias, "Expand")
    if expand is not None:
        bias = expand.input[0]
    while index.node(bias, "Unsqueeze") or index.node(bias, "Reshape"):
        bias = index.producer[bias].input[0]
    where = index.node(bias, "Where")
    if where is None or dims.get(where.output[0]) not in ((batch, tokens), (batch, 1, 1, tokens)):
        return None
    condition, zero, value = where.input
    zeros, filler = index.value(zero), index.value(value)
    if zeros is None or zeros.any() or filler is None or filler.size != 1 or not float(filler.ravel()[0]) < 0:
        return None
    if dims.get(condition) not in ((batch, tokens), (batch, 1, 1, tokens)):
        return None  # a condition that broadcasts over the batch is no per-image key mask
    return condition, float(filler.ravel()[0])


def fuse_attention_key_mask(model: onnx.ModelProto) -> int:
    """A fused Attention whose bias is a per-key ``Where(live, 0, c)`` (A-ViT's halted keys at -1000, ATS's
    masked slots at -32) → the same Attention with ``mask_index = live`` as int32 [B, N] and
    ``mask_filter_value = c``; returns the count. ONNX Runtime adds the same c to the same logits (the
    outputs are bit-identical), without the [B, 1, N, N] bias that each block expanded and read."""
    dims = _dims(model)

    def rewrite(index: GraphIndex, attention: onnx.NodeProto) -> bool:
        inputs = list(attention.input) + [""] * (6 - len(attention.input))
        x_dims = dims.get(inputs[0])
        if not inputs[5] or any(inputs[3:5]) or not x_dims or len(x_dims) != 3 or None in x_dims:
            return False
        batch, tokens = x_dims[0], x_dims[1]
        found = _key_mask(index, dims, inputs[5], batch, tokens)
        if found is None:
            return False
        condition, value = found
        mask = f"{condition}_key_mask"
        extra = []
        if mask not in index.producer:
            flat = condition
            if len(dims[condition]) == 4:
                flat, shape = f"{condition}_keys", f"{condition}_keys_shape"
                if shape not in index.constants:
                    index.graph.initializer.append(numpy_helper.from_array(np.array([-1, tokens], np.int64), shape))
                extra.append(helper.make_node("Reshape", [condition, shape], [flat], name=f"{flat}_view"))
            extra.append(helper.make_node("Cast", [flat], [mask], name=f"{mask}_cast", to=onnx.TensorProto.INT32))
        attributes = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
        node = helper.make_node("Attention", [*inputs[:3], mask], list(attention.output), name=attention.name,
                                domain=MS_DOMAIN, **{**attributes, "mask_filter_value": value})
        _replace(index.graph, [attention], attention, [*extra, node])
        return True

    return _rewrite_each(model, "Attention", rewrite, GraphIndex, contrib=False, domain=MS_DOMAIN)


# The passes in the order they run: the softmax fusion first, so the attention blocks it
# turns back into a plain softmax can be fused too.
PASSES = (("regularised_softmax", fuse_regularised_softmax), ("attention", fuse_attention))
PASSES += (("head_mean_key_attention", fuse_head_mean_key_attention),)
PASSES += (("shared_qkv_attention", fuse_shared_qkv_attention),)
PASSES += (("l2_normalization", fuse_l2_normalization),)
PASSES += (("attention_with_rows", fuse_attention_with_rows),)  # after attention: the blocks it refused
PASSES += (("attention_key_mask", fuse_attention_key_mask),)  # after every pass that writes an Attention
PASSES += (("conv_add", fuse_conv_add),)
PASSES += (("assignment_scatter_add", fuse_assignment_scatter_add),)
PASSES += (("sum_of_squares_l2_normalization", fuse_sum_of_squares_l2_normalization),)


def optimize_graph(model: onnx.ModelProto) -> dict[str, int]:
    """Run every pass on ``model`` in place; returns how often each one fired."""
    counts = {name: run(model) for name, run in PASSES}
    if any(counts.values()):
        drop_dead_nodes(model)
        onnx.checker.check_model(model)
    return counts


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes no output depends on any more (a fused softmax's eps share) and unused initializers."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)



def interleaved_timing(reference: Path, candidate: Path, batch: int, threads: int = 2, rounds: int = 30,
                       runs: int = 5, size: int | None = None) -> dict:
    """Time two graphs alternately (``rounds`` rounds of ``runs`` runs each, order flipped every round),
    so load on a shared machine hits both alike; the ratio is candidate / reference of the medians."""
    sessions = [ort_session(reference, threads), ort_session(candidate, threads)]
    inputs = sessions[0].get_inputs()[0]
    shape = [batch, *(d if isinstance(d, int) else size for d in inputs.shape[1:])]
    feed = {inputs.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    timing = interleaved_ratio([lambda s=s: s.run(None, feed) for s in sessions], rounds, runs)
    return {**timing, "batch": batch, "threads": threads}


def interleaved_ratio(runners: list, rounds: int = 30, runs: int = 5) -> dict:
    """``interleaved_timing`` for two callables (reference, candidate): any backend's runs."""
    samples: list[list[float]] = [[], []]
    for run in runners:  # warm-up
        for _ in range(3):
            run()
    for round_index in range(rounds):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            for _ in range(runs):
                runners[which]()
            samples[which].append((time.perf_counter() - start) * 1000.0 / runs)
    reference_ms, candidate_ms = (float(np.median(s)) for s in samples)
    # 95 % interval of the ratio of medians: rounds resampled with their pairs kept
    picks = np.random.default_rng(1).integers(0, rounds, (1000, rounds))
    boot = np.median(np.asarray(samples[1])[picks], axis=1) / np.median(np.asarray(samples[0])[picks], axis=1)
    return {"reference_ms": reference_ms, "optimized_ms": candidate_ms, "ratio": candidate_ms / reference_ms,
            "ratio_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "rounds": rounds, "runs_per_round": runs}


def optimize(outdir, data: str | None = "default", limit: int | None = 1000, rounds: int = 30, threads: int = 2,
             force: bool = False, log=None, shuffle_seed: int | None = None, skip_bad_images: bool = False) -> dict:
    """Write OUTDIR/model.ort.onnx from model.onnx when it passes the fidelity check and is faster on ORT.

    Works on a staged copy (``artifact.staged_copy``): a failed fidelity check raises
    ValidationFailed with OUTDIR as it was and the attempt in ``OUTDIR.failed/``. When no pass
    applies, or the optimised graph is not faster (``force`` writes it anyway), no
    model.ort.onnx is written (an older one is removed, it would be stale) and the decision,
    with its timing, is recorded in vitedge.json["optimized"]["ort"] and report.json["optimize"].
    """
    from .data import check_source, default_source
    from .validate import input_spec, validate

    log = log or (lambda message: None)
    if rounds < 1 or threads < 1:
        raise VitedgeError(f"rounds and threads must be >= 1, got {rounds} and {threads}")
    if data:
        check_source(data, limit)
    root = Artifact(outdir).root
    with writer_lock(root):
        with staged_copy(root) as stage:
            artifact = Artifact(stage)
            source = artifact.model_path
            if artifact.metadata.get("precision", "fp32") != "fp32":
                raise VitedgeError(f"{root} holds a quantized model.onnx; optimize the FP32 model of a fresh export")
            try:
                model = onnx.load(str(source))
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends on damaged files
                raise VitedgeError(f"cannot read {source}: {exc}; re-run 'vitedge export'") from None
            try:
                counts = optimize_graph(model)
            except Exception as exc:  # noqa: BLE001 - a pass produced an invalid graph: a bug, in one line
                raise VitedgeError(f"the optimised graph is not valid ONNX: {str(exc).splitlines()[0][:200]} "
                                   "(a bug in vitedge; please report it)") from None
            log(f"graph passes: {', '.join(f'{name} x{count}' for name, count in counts.items())}")
            entry = {"model": OPTIMIZED_ORT, "passes": counts, "source_sha256": file_sha256(source),
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            target = stage / OPTIMIZED_ORT
            if not any(counts.values()):
                entry.update({"written": False, "reason": "no pass applies to this graph"})
                log("no pass applies: model.onnx is the ORT graph as well")
            else:
                onnx.save_model(model, str(target))
                metadata = {**artifact.metadata, "optimized": {"ort": {**entry, "written": True}}}
                write_json_atomic(stage / METADATA, metadata)
                meta = Artifact(stage).metadata
                if data:
                    source_data = default_source(input_spec(meta).in_chans) if data == "default" else data
                    section = validate(stage, source_data, limit, threads=threads, log=log, graph="optimized",
                                       shuffle_seed=shuffle_seed, skip_bad_images=skip_bad_images)
                    entry["fidelity"] = {k: section[k] for k in ("data", "images", "top1_agreement", "kept_agreement",
                                                                 "max_abs_logit_diff", "passed") if k in section}
                else:
                    entry["fidelity"] = None
                batch = graph_batch(ort_session(source, 1)) or 1  # the graph's fixed batch, else 1
                log(f"timing model.onnx against {OPTIMIZED_ORT}: {rounds} interleaved rounds, batch {batch}, {threads} threads")
                timing = interleaved_timing(source, target, batch, threads, rounds, size=meta["input"]["shape"][2])
                entry["timing"] = timing
                pays = timing["ratio"] < 1.0
                entry["written"] = pays or force
                entry["reason"] = ("faster than model.onnx" if pays else
                                   ("not faster than model.onnx; written because forced" if force else "not faster than model.onnx"))
                log(f"{OPTIMIZED_ORT}: {timing['optimized_ms']:.3f} ms vs {timing['reference_ms']:.3f} ms "
                    f"(ratio {timing['ratio']:.3f}, 95% CI {timing['ratio_ci95'][0]:.3f}-{timing['ratio_ci95'][1]:.3f}): "
                    + ("written" if entry["written"] else "not written"))
                if not entry["written"]:
                    target.unlink()
            metadata = {**Artifact(stage).metadata, "optimized": {"ort": entry}}
            write_json_atomic(stage / METADATA, metadata)
            Artifact(stage).update_report("optimize", {"ort": entry, "passed": entry.get("fidelity") is None
                                                       or bool(entry["fidelity"].get("passed"))})
        stale = root / OPTIMIZED_ORT
        if not entry["written"] and stale.exists():
            os.unlink(stale)
    return entry
