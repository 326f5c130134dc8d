"""Stage 3, export: a static model → ONNX (opset ≥ 17, constant token counts).

The graph's outputs are ``logits`` [B, classes] and, per token selection, ``kept_tokens_<block>``
[B, k] (int32): the original patch index of every token that stays (−1 for a fused token), so
a deployment can show what the model looked at and ``validate`` can compare selections.
A family may name a selection's output itself (ToMe: ``assignment_<block>``, a per-patch map).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from pathlib import Path

import onnx
import onnx.version_converter
import torch
from torch import nn

from .backbone import ViTConfig
from .errors import VitedgeError
from .families import TokenPlan

MIN_OPSET = 17
DEFAULT_OPSET = 18  # what the dynamo exporter emits natively; 17 is reached by conversion
# The newest opset the installed onnx defines: above it the exporter would write another opset than recorded.
MAX_OPSET = onnx.defs.onnx_opset_version()
INPUT_NAME = "images"
SIZE_AXIS = "size"  # the symbolic height = width of a dynamic-resolution graph


def _gelu_fusable(self, approximate: str = "none"):
    """aten.gelu as ``(x * (1 + erf(x / sqrt 2))) * 0.5``, for opsets without the Gelu op (< 20).

    The exporter's own decomposition multiplies ``0.5 * (1 + erf)`` first, an order ONNX
    Runtime's Gelu fusion does not match, so every MLP ran as five elementwise passes; this
    order is the one it fuses into a single Gelu kernel (and the one TensorRT's pattern
    matcher knows). Scaling by 0.5 is exact, so the values are those of the default order.
    """
    from onnxscript import opset18 as op

    def constant(value: float):
        return op.CastLike(op.Constant(value_float=value), self)

    if approximate == "tanh":
        inner = op.Mul(
            op.Add(self, op.Mul(constant(0.044715), op.Mul(self, op.Mul(self, self)))),
            constant(math.sqrt(2.0 / math.pi)),
        )
        return op.Mul(op.Mul(self, op.Add(op.Tanh(inner), constant(1.0))), constant(0.5))
    return op.Mul(op.Mul(self, op.Add(op.Erf(op.Div(self, constant(math.sqrt(2.0)))), constant(1.0))), constant(0.5))


def _translations(opset: int) -> dict:
    """Custom ATen → ONNX translations: a runtime-fusable GELU where the opset has no Gelu op."""
    if opset >= 20:  # Gelu is an ONNX op from opset 20 on; the exporter emits it as is
        return {}
    return {torch.ops.aten.gelu.default: _gelu_fusable}


class ExportWrapper(nn.Module):
    """Flattens ``forward_tokens`` into the graph's outputs: logits, then kept indices as int32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        logits, kept = self.model.forward_tokens(images)
        return (logits, *[k.to(torch.int32) for k in kept])


def output_names(plan: TokenPlan) -> list[str]:
    return ["logits"] + [step.get("output", f"kept_tokens_{step['block']}") for step in plan.selections]


def export_onnx(
    static_model: nn.Module,
    cfg: ViTConfig,
    plan: TokenPlan,
    path: Path,
    opset: int = DEFAULT_OPSET,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    resolution: tuple[int, int] | None = None,
) -> onnx.ModelProto:
    """Export with the dynamo exporter (static shapes; optionally a symbolic batch dimension).

    ``resolution=(min, max)`` makes the (square) input size symbolic too, a multiple of the
    patch size in that range, for families whose graph has no token-count constants; the
    model must resample its position table in the graph (``resample_positions``).
    """
    if opset < MIN_OPSET:
        raise VitedgeError(f"opset {opset} is too old; vitedge needs opset >= {MIN_OPSET} (LayerNormalization)")
    if opset > MAX_OPSET:
        raise VitedgeError(f"opset {opset} is newer than this onnx ({onnx.__version__}) knows; use --opset "
                           f"{MIN_OPSET}..{MAX_OPSET}")
    if batch_size < 1:
        raise VitedgeError(f"batch size must be >= 1, got {batch_size}")
    wrapper = ExportWrapper(static_model).eval()
    example = torch.randn(max(batch_size, 2) if dynamic_batch else batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    axes = {0: torch.export.Dim("batch", min=1, max=4096)} if dynamic_batch else {}
    if resolution is not None:
        grid = torch.export.Dim("grid", min=resolution[0] // cfg.patch_size, max=resolution[1] // cfg.patch_size)
        axes.update({2: cfg.patch_size * grid, 3: cfg.patch_size * grid})
    dynamic_shapes = (axes,) if axes else None
    names = output_names(plan)
    with _quiet():
        try:
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                # Below its native opset the exporter's own conversion fails and silently keeps
                # the native one (logging a traceback): export natively, convert below.
                opset_version=max(opset, DEFAULT_OPSET),
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                optimize=True,
                custom_translation_table=_translations(opset),
            )
        except Exception as exc:  # the exporter raises many types; the first line says what failed
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VitedgeError(f"ONNX export failed: {first[:300]}") from None
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset >= DEFAULT_OPSET and written != opset:
        raise VitedgeError(f"the exporter wrote opset {written}, not the requested {opset}; use --opset {DEFAULT_OPSET}")
    if opset < DEFAULT_OPSET:
        proto = _convert_opset(proto, opset)
    if dynamic_batch:
        for value in list(proto.graph.input) + list(proto.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    if resolution is not None:
        for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_param = SIZE_AXIS
    onnx.save_model(proto, str(path))
    return proto


def export_token_stack(module: nn.Module, example: torch.Tensor, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Export a [B, N, C] -> [B, N, C] module (a stack of blocks) with a symbolic token axis N,
    with the exporter settings of ``export_onnx``, so that it is the graph a model's blocks become
    (the same ops, the same GELU form, the same patterns for the ONNX Runtime passes)."""
    tokens = torch.export.Dim("tokens", min=1, max=max(2, example.shape[1]))
    with _quiet():
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, opset_version=opset, input_names=["tokens"],
                                    output_names=["out"], dynamic_shapes=({1: tokens},), external_data=False,
                                    optimize=True, custom_translation_table=_translations(opset))
    onnx.save_model(program.model_proto, str(path))


def _convert_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Down-convert an (optimised) export with ONNX's version converter, or fail in one line."""
    converted = onnx.ModelProto()
    converted.CopyFrom(proto)
    for node in converted.graph.node:
        # Opset-18 Reduce* nodes may spell out the default noop_with_empty_axes=0, which the
        # converter rejects for the older versions that lack the attribute.
        keep = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
        del node.attribute[:]
        node.attribute.extend(keep)
    try:
        converted = onnx.version_converter.convert_version(converted, opset)
    except Exception as exc:  # the converter raises RuntimeError / ValidationError with long messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitedgeError(f"cannot convert the exported graph to opset {opset}: {first[:200]}; use --opset {DEFAULT_OPSET}") from None
    return converted


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings meant for its own developers; keep them off stdout."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, previous):
            logger.setLevel(level)
