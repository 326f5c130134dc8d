"""ONNX Runtime's symbolic shape inference, taught to follow every reduction's axes input.

From opset 18 on, ReduceMax, ReduceMin, ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp,
ReduceProd and ReduceSumSquare take their axes as an input, as ReduceSum has since opset 13.
ORT's ``SymbolicShapeInference`` reads that input only for ReduceSum and ReduceMean; for the
others it asks ONNX's single-node inference, which never sees the axes' value and leaves the
output without a shape, so ``x.norm(dim=-1)`` or ``x.amax(dim=-1)`` failed the check stage.
Here every reduction's output shape comes from its axes when they are known while inferring
(an initializer, a Constant node or a value ORT folds from static shapes); axes computed at
run time raise ``ReductionAxesError``, since the output rank or size would then be unknown.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_attribute, get_opset, sympy_reduce_product

# The opset from which each reduction's axes are an input instead of an attribute.
AXES_INPUT_OPSET = {
    "ReduceSum": 13,
    "ReduceL1": 18,
    "ReduceL2": 18,
    "ReduceLogSum": 18,
    "ReduceLogSumExp": 18,
    "ReduceMax": 18,
    "ReduceMean": 18,
    "ReduceMin": 18,
    "ReduceProd": 18,
    "ReduceSumSquare": 18,
}


class ReductionAxesError(Exception):
    """A reduction whose axes give no static output shape: computed at run time, or out of range."""


def reduced_shape(shape: list, axes: list[int], keepdims: bool, noop_with_empty_axes: bool = False) -> list:
    """The output shape of an ONNX reduction of ``shape`` over ``axes`` (negative axes count from the end).

    Empty axes reduce every axis, or none with ``noop_with_empty_axes`` (the ONNX semantics).
    """
    rank = len(shape)
    if any(not -rank <= axis < rank for axis in axes):
        raise ValueError(f"axes {axes} out of range for rank {rank}")
    if not axes:
        axes = [] if noop_with_empty_axes else list(range(rank))
    reduced = {axis % rank for axis in axes}
    return [1 if axis in reduced else dim for axis, dim in enumerate(shape) if keepdims or axis not in reduced]


class ReductionShapeInference(SymbolicShapeInference):
    """``SymbolicShapeInference`` with every reduction's axes input followed (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for op in AXES_INPUT_OPSET:
            self.dispatcher_[op] = self._infer_reduction

    def _infer_reduction(self, node: onnx.NodeProto) -> None:
        if get_opset(self.out_mp_) < AXES_INPUT_OPSET[node.op_type]:
            # Axes as an attribute: ONNX's single-node inference, already run, has the shape;
            # ORT's own handler may add values it folds (ReduceProd of a shape).
            previous = SymbolicShapeInference.__dict__.get(f"_infer_{node.op_type}")
            if previous is not None:
                previous(self, node)
            return
        axes: list[int] = []
        if len(node.input) > 1 and node.input[1]:
            value = self._try_get_value(node, 1)
            if value is None:
                raise ReductionAxesError(
                    f"{node.op_type} {node.name}: its axes are computed at run time, so its output shape is unknown; "
                    "reduce over constant axes (a Python int or tuple as dim)"
                )
            axes = [int(axis) for axis in np.asarray(value).reshape(-1)]
        shape = self._get_shape(node, 0)
        try:
            output_shape = reduced_shape(
                shape,
                axes,
                keepdims=bool(get_attribute(node, "keepdims", 1)),
                noop_with_empty_axes=bool(get_attribute(node, "noop_with_empty_axes", 0)),
            )
        except ValueError as exc:
            raise ReductionAxesError(f"{node.op_type} {node.name}: {exc}") from None
        elem_type = self.known_vi_[node.input[0]].type.tensor_type.elem_type
        self.known_vi_[node.output[0]].CopyFrom(helper.make_tensor_value_info(node.output[0], elem_type, output_shape))
        shape_values = self.sympy_data_.get(node.input[0])
        if node.op_type == "ReduceProd" and isinstance(shape_values, list) and output_shape in ([], [1]):
            # The element count of a shape vector (ORT folds this for ReduceProd before opset 18 only).
            count = sympy_reduce_product(shape_values)
            self.sympy_data_[node.output[0]] = [count] if output_shape else count


def infer_shapes(model: onnx.ModelProto, auto_merge: bool = True) -> onnx.ModelProto:
    """``SymbolicShapeInference.infer_shapes`` run by ``ReductionShapeInference``.

    ORT's static method builds its own class, hence this copy of its few lines; like it, a graph
    it cannot fully infer raises, but nothing is saved (ORT writes sym_shape_infer_temp.onnx into
    the working folder).
    """
    inference = ReductionShapeInference(int_max=2**31 - 1, auto_merge=auto_merge, guess_output_rank=False, verbose=0)
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise Exception("Incomplete symbolic shape inference")
    return inference.out_mp_
