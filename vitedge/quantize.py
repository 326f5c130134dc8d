"""Stage 6, quantize: model.onnx → model.fp16.onnx / model.int8.onnx, with the token-selection path kept in float.

Adaptive models are fragile under reduced precision: a token whose score moves a little is
dropped instead of kept, and everything after the selection sees other tokens. So the
*selection path* (the nodes that compute the scores TopK ranks, and the fused-token weights
derived from them) is found in the graph and kept in FP32 by default; ``include_selection``
quantizes it too, so the cost can be measured.

- FP16: onnxruntime's float16 converter (``keep_io_types``, op and node block lists).
  LayerNormalization, Softmax, LogSoftmax (known FP16 overflow / flip points) and the
  selection path stay FP32.
- INT8: onnxruntime's static QDQ quantizer and its calibrators (minmax, entropy, percentile):
  symmetric INT8, per-channel weights, Q/DQ on the inputs of MatMul/Gemm/Conv: the explicit
  quantization TensorRT >= 8 consumes and ONNX Runtime runs. The scales are also written as
  JSON and as a TensorRT calibration cache beside the model.

The selection path is detected from the graph alone (see ``selection_nodes``), so a new family
needs nothing here; a family may add parameter-name hints (``Family.selection_hint``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fnmatch
import io
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .artifact import METADATA, Artifact, staged_copy, write_json_atomic, write_text_atomic
from .data.calibration_sets import array_sha256, calibration_array, default_set, load_calibration_set, set_out_of_domain
from .errors import ValidationFailed, VitedgeError
from .families import get_family
from .reading import file_sha256
from .runtime import graph_batch, ort_session

PRECISIONS = ("fp16", "int8")
METHODS = ("minmax", "entropy", "percentile")
KEEP_FP32_OPS = ("LayerNormalization", "Softmax", "LogSoftmax")
INT8_OP_TYPES = ("MatMul", "Gemm", "Conv")
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger",
                 "ConvInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat"}
TRT_CACHE_HEADER = "TRT-8601-EntropyCalibration2"  # implicit-quantization cache format read by TensorRT 8.x-10.x


def model_file(precision: str) -> str:
    return f"model.{precision}.onnx"


def graph_precision(model: onnx.ModelProto) -> str:
    """fp32, fp16 or int8, from what the graph holds (Q/DQ or integer ops; FP16 tensors)."""
    if any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
        return "int8"
    tensors = list(model.graph.initializer) + [v.type.tensor_type for v in model.graph.input]
    if any(getattr(t, "data_type", getattr(t, "elem_type", 0)) == onnx.TensorProto.FLOAT16 for t in tensors):
        return "fp16"
    if any(node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute)
           for node in model.graph.node):
        return "fp16"
    return "fp32"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                consumers[name].append(node)
    return consumers


def _descendants(graph: onnx.GraphProto, roots: list[onnx.NodeProto], consumers) -> set[str]:
    seen, stack = set(), [out for node in roots for out in node.output]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                stack.extend(node.output)
    return seen


def selection_nodes(model: onnx.ModelProto, hints: tuple[str, ...] = ()) -> list[str]:
    """Names of the nodes that only serve token selection: TopK and the scoring subgraph feeding it.

    Seeds: every TopK, every node whose op type is a hint (A-ViT's halting Sigmoid) and every
    node reading a tensor whose name contains a hint. A
    producer joins the path when every consumer of its outputs is already on the path or lies
    after a TopK (the fused-token weights use the scores after the ranking); the walk stops at
    tensors the token path itself uses (attention probabilities, block outputs), so no main-path
    node is ever excluded.
    """
    graph = model.graph
    consumers = _consumers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {value.name for value in graph.output}
    seeds = [node for node in graph.node
             if node.op_type == "TopK" or node.op_type in hints or any(h in name for h in hints for name in node.input)]
    path: set[str] = set()
    for seed in seeds:  # each selection on its own: "after" means after this selection
        after = _descendants(graph, [seed], consumers)
        own = {seed.name}
        changed = True
        while changed:
            changed = False
            frontier = {producer[name].name: producer[name] for node in graph.node if node.name in own
                        for name in node.input if name in producer}
            for node in frontier.values():
                if node.name in own or node.op_type == "Constant" or any(out in graph_outputs for out in node.output):
                    continue
                users = [user for out in node.output for user in consumers.get(out, [])]
                if users and all(user.name in own or user.name in after for user in users):
                    own.add(node.name)
                    changed = True
        path |= own
    return [node.name for node in graph.node if node.name in path]


def matching_nodes(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """Nodes whose name, op type or any input/output tensor name matches a glob pattern."""
    if not patterns:
        return []
    found = []
    for node in model.graph.node:
        names = [node.name, node.op_type, *node.input, *node.output]
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names if name):
            found.append(node.name)
    return found


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the quantizer's exclusion lists address nodes by name)."""
    seen = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def convert_fp16(model: onnx.ModelProto, keep_ops: tuple[str, ...], keep_nodes: list[str]) -> onnx.ModelProto:
    """FP16 weights and activations; ``keep_ops`` / ``keep_nodes`` stay FP32 (Casts around them); FP32 I/O."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block, node_block_list=list(keep_nodes))
    # The converter appends its Casts after their consumers and leaves some value_info entries with
    # their old element type: restore topological order (the ONNX rule TensorRT's parser relies on)
    # and re-infer every declared type.
    topological_sort(converted.graph)
    drop_cast_round_trips(converted)
    del converted.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(converted, strict_mode=True)


def drop_cast_round_trips(model: onnx.ModelProto) -> None:
    """Remove FP32 → FP16 → FP32 Cast pairs, so that chains of blocked nodes really stay FP32.

    The converter types every tensor FP16 and puts Casts around each blocked node, so between two
    nodes kept in FP32 the tensor is still rounded to half precision (and so is the FP32 input of a
    graph whose first node is blocked): the selection path "kept in FP32" ranked FP16-rounded scores.
    Consumers of such a round trip read the original FP32 tensor instead; unused Casts are dropped.
    Needs the graph in topological order (element types come from ONNX shape inference).
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {value.name for value in graph.output}
    types = _element_types(model)

    def cast_to(node):
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    renamed = {}
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        half = producer.get(node.input[0])
        if cast_to(half) != onnx.TensorProto.FLOAT16 or types.get(half.input[0]) != onnx.TensorProto.FLOAT:
            continue  # not a round trip of an FP32 tensor (e.g. an integer index cast to float)
        if node.output[0] in graph_outputs:
            node.input[0] = half.input[0]
        else:
            renamed[node.output[0]] = half.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    _drop_dead_nodes(model)


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type, inferred afresh (the converter leaves stale value_info types)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    graph = onnx.shape_inference.infer_shapes(probe).graph
    types = {init.name: init.data_type for init in graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]})
    return types


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs (stable)."""
    available = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise VitedgeError(f"the graph has a cycle or a dangling input at node {pending[0].name}")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a calibration array."""

    def __init__(self, array: np.ndarray, input_name: str, batch: int):
        self.array, self.input_name, self.batch, self.position = array, input_name, batch, 0

    def get_next(self):
        if self.position >= len(self.array):
            return None
        chunk = self.array[self.position : self.position + self.batch]
        self.position += self.batch
        if len(chunk) < self.batch:  # a fixed-batch graph: pad the last chunk with copies
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - len(chunk), axis=0)])
        return {self.input_name: chunk}

    def __len__(self):
        return -(-len(self.array) // self.batch)


def restore_float_inputs(model: onnx.ModelProto, nodes: set[str]) -> int:
    """Let ``nodes`` read the float tensor again where the quantizer routed them through a shared Q/DQ pair.

    The QDQ quantizer rewires every consumer of a quantized activation, also the excluded ones
    (e.g. the class-attention row that EViT ranks, which shares the Softmax output with the
    attention MatMul). Returns how many inputs were restored; drops Q/DQ nodes left unused.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name for init in graph.initializer}
    restored = 0
    for node in graph.node:
        if node.name not in nodes:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in initializers:
                continue
            node.input[i] = q.input[0]
            restored += 1
    _drop_dead_nodes(model)
    return restored


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def tensor_scales(model: onnx.ModelProto) -> dict:
    """Per quantized tensor: scale(s), zero point(s), amax, axis, and whether it is a weight."""
    graph = model.graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    scales = {}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        source = node.input[0]
        if node.op_type == "DequantizeLinear":
            if source in values:  # a weight stored as INT8 (quantized offline)
                name, is_weight = source, True
            else:
                continue  # an activation: its QuantizeLinear is recorded
        else:
            name, is_weight = source, source in values
            if source in producer and producer[source].op_type == "DequantizeLinear":
                continue
        scale = values[node.input[1]].astype(np.float64)
        zero = values[node.input[2]] if len(node.input) > 2 and node.input[2] in values else np.zeros_like(scale)
        axis = next((a.i for a in node.attribute if a.name == "axis"), None) if scale.ndim else None
        scales[name] = {
            "kind": "weight" if is_weight else "activation",
            "scale": scale.tolist(),
            "zero_point": np.asarray(zero).astype(np.int64).tolist(),
            "amax": (scale * 127.0).tolist(),
            **({"axis": axis} if axis is not None else {}),
        }
    return scales


def trt_calibration_cache(scales: dict) -> str:
    """The activation scales as a TensorRT calibration cache (``name: big-endian float32 hex``).

    TensorRT builds explicit (Q/DQ) models from the scales in the graph; this cache serves an
    implicit INT8 build of the FP32 ``model.onnx`` (``trtexec --int8 --calib=...``, TensorRT <= 10)
    with the same activation scales. Tensor names are those of the FP32 graph.
    """
    lines = [TRT_CACHE_HEADER]
    for name, entry in scales.items():
        if entry["kind"] == "activation":
            lines.append(f"{name}: {struct.pack('>f', float(entry['scale'])).hex()}")
    return "\n".join(lines) + "\n"


# TensorRT's entropy calibrator (EntropyCalibration2) histograms 2048 bins into 128 levels; onnxruntime's
# default of 128 bins leaves its entropy search a single candidate (the full range, i.e. minmax).
CALIBRATOR_OPTIONS = {
    "minmax": {"symmetric": True},
    "entropy": {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
}


def calibrate(source: Path, array: np.ndarray, method: str, op_types: tuple[str, ...], batch: int, cache: Path) -> None:
    """Tensor ranges by onnxruntime's calibrator for ``method``, saved as its JSON calibration cache."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="vitedge-calib-") as scratch, contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(source, list(op_types), augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                                       calibrate_method=calib_method, extra_options=CALIBRATOR_OPTIONS[method])
        calibrator.collect_data(_Batches(array, input_name, batch))
        save_tensors_data(calibrator.compute_data(), cache)


def quantize_int8(source: Path, target: Path, array: np.ndarray, method: str, exclude: list[str],
                  op_types: tuple[str, ...], batch: int) -> onnx.ModelProto:
    """Static QDQ INT8 with onnxruntime.quantization (its calibrators; symmetric; per-channel weights)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    extra = {
        "ActivationSymmetric": True,  # TensorRT takes zero points of 0 only
        "WeightSymmetric": True,
        "QuantizeBias": False,  # biases stay float: TensorRT fuses them itself
        "DedicatedQDQPair": True,  # TensorRT wants one Q/DQ pair per consumer
        "OpTypesToExcludeOutputQuantization": list(op_types),  # Q/DQ on GEMM inputs, as TensorRT places them
    }
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs advice meant for its own examples on the root logger
    try:
        ranges = target.parent / "calibration-ranges.json"
        calibrate(source, array, method, op_types, batch, ranges)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(source), str(target), None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types), per_channel=True, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude), calibrate_method=calib_method,
                extra_options=extra, calibration_cache_path=str(ranges),
            )
        ranges.unlink()
    except Exception as exc:  # the quantizer raises bare exceptions on graphs it cannot handle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitedgeError(f"INT8 quantization failed: {first[:300]}") from None
    finally:
        quiet.setLevel(level)
    quantized = onnx.load(str(target))
    restore_float_inputs(quantized, set(exclude))
    onnx.save_model(quantized, str(target))
    return quantized



def quantize(
    outdir,
    precision: str,
    calib: str | None = None,
    method: str = "minmax",
    exclude: tuple[str, ...] = (),
    include_selection: bool = False,
    keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS,
    op_types: tuple[str, ...] = INT8_OP_TYPES,
    validate_data: str | None = "default",
    validate_limit: int | None = 1000,
    log=None,
    validate_seed: int | None = None,
    skip_bad_images: bool = False,
) -> dict:
    """Write OUTDIR/model.<precision>.onnx (+ scales for INT8) from OUTDIR/model.onnx; record it in vitedge.json.

    The work happens on a staged copy of the artifact (``artifact.staged_copy``): the new files
    land only when the quantized graph passed the check and a quick comparison with the FP32
    graph on ``validate_limit`` images of ``validate_data`` (None skips it). A missed threshold
    raises ValidationFailed, as export does, with OUTDIR as it was (a previous quantized model
    included) and the attempt, with its report, in ``OUTDIR.failed/``. Returns the report's
    "quantized" entry for ``precision``.
    """
    from .data import check_source, default_source
    from .validate import input_spec

    if precision not in PRECISIONS:
        raise VitedgeError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if method not in METHODS:
        raise VitedgeError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")
    if precision == "fp16" and calib is not None:
        raise VitedgeError("--calib applies to int8 only (fp16 needs no calibration)")
    if validate_data:
        check_source(validate_data, validate_limit)
    with staged_copy(Artifact(outdir).root) as outdir:  # a failed comparison leaves OUTDIR as it was
        artifact = Artifact(outdir)
        source = artifact.model_path
        try:
            model = onnx.load(str(source))
        except Exception as exc:  # onnx raises DecodeError and friends on damaged files
            raise VitedgeError(f"cannot read {source}: {exc}") from None
        current = graph_precision(model)
        if current != "fp32" or artifact.metadata.get("precision", "fp32") != "fp32":
            raise VitedgeError(f"{source} is already quantized ({current}); quantize the FP32 model.onnx of a fresh export")
        meta = artifact.metadata
        spec = input_spec(meta)
        log = log or (lambda message: None)
        if validate_data == "default":
            validate_data = default_source(spec.in_chans)

        cset = array = note = None
        if precision == "int8":  # the calibration data before anything else: a bad set fails in a second
            cset = load_calibration_set(calib or default_set(spec.in_chans))
            array = calibration_array(cset, spec)
            note = _calibration_note(cset, meta)
            if note:
                log(f"note: {note}")

        _name_nodes(model)
        hints = tuple(get_family(meta["family"]).selection_hint)
        selection = selection_nodes(model, hints)
        user_excluded = matching_nodes(model, tuple(exclude))
        if exclude and not user_excluded:
            raise VitedgeError(f"--exclude {', '.join(exclude)} matches no node (patterns match node names, op types and tensor names)")
        excluded = sorted(set(user_excluded) | (set() if include_selection else set(selection)))
        log(f"selection path: {len(selection)} node(s) ({'quantized too' if include_selection else 'kept in FP32'}); "
            f"{len(user_excluded)} node(s) excluded by pattern")

        stage = Path(tempfile.mkdtemp(prefix=".vitedge-quantize-", dir=artifact.root))
        try:
            target = stage / model_file(precision)
            entry = {
                "model": target.name,
                "precision": precision,
                "source_sha256": file_sha256(source),
                "selection_nodes": selection,
                "selection_quantized": include_selection,
                "excluded_nodes": excluded,
                "exclude_patterns": list(exclude),
            }
            if precision == "fp16":
                log(f"converting to FP16 (kept in FP32: {', '.join(keep_fp32_ops) or 'nothing by op type'})")
                converted = convert_fp16(model, tuple(keep_fp32_ops), excluded)
                onnx.save_model(converted, str(target))
                entry.update({"keep_fp32_ops": list(keep_fp32_ops), "converter": "onnxruntime.transformers.float16"})
                quantized = converted
            else:
                log(f"calibrating on {len(array)} images of '{cset.name}' ({method})")
                named = stage / "source.onnx"
                onnx.save_model(model, str(named))
                batch = graph_batch(ort_session(named, 1)) or 16
                quantized = quantize_int8(named, target, array, method, excluded, tuple(op_types), batch)
                named.unlink()
                scales = tensor_scales(quantized)
                scales_name, cache_name = f"model.{precision}.scales.json", f"model.{precision}.calib"
                write_json_atomic(stage / scales_name, {"format": "symmetric int8, amax = scale * 127", "tensors": scales})
                write_text_atomic(stage / cache_name, trt_calibration_cache(scales))
                entry.update({
                    "method": method, "op_types": list(op_types), "per_channel": True, "symmetric": True,
                    "calibration": {**cset.record(), "images": int(len(array)), "data_sha256": array_sha256(array),
                                    "in_domain": note is None, **({"domain_note": note} if note else {})},
                    "scales": scales_name, "calibration_cache": cache_name,
                    "quantized_tensors": sum(1 for s in scales.values() if s["kind"] == "activation"),
                    "quantized_weights": sum(1 for s in scales.values() if s["kind"] == "weight"),
                })
            from .check import check_sizes

            try:
                onnx.checker.check_model(quantized, full_check=True)
            except Exception as exc:  # ValidationError / InferenceError: a bug here, reported in one line
                raise VitedgeError(f"the {precision} graph is not valid ONNX: {str(exc).splitlines()[0][:200]}") from None
            result = check_sizes(quantized, meta)
            if not result["passed"]:
                raise VitedgeError(f"the {precision} graph fails the static/TensorRT check: {result['errors'][0]}")
            entry["sha256"] = file_sha256(target)
            entry["size_bytes"] = target.stat().st_size
            entry["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for item in stage.iterdir():
                os.replace(item, artifact.root / item.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

        metadata = dict(meta)
        metadata["quantized"] = {**meta.get("quantized", {}), precision: entry}
        write_json_atomic(artifact.root / METADATA, metadata)
        section = {"quantize": {k: v for k, v in entry.items() if k not in ("selection_nodes", "excluded_nodes")},
                   "check": result}
        _update_quantized_report(Artifact(outdir), precision, section, replace=True)
        log(f"wrote {artifact.root / entry['model']} ({entry['size_bytes'] / 1e6:.2f} MB)")
        if validate_data:
            validate_quantized(outdir, precision, validate_data, validate_limit, thresholds={}, log=log,
                               shuffle_seed=validate_seed, skip_bad_images=skip_bad_images)
        return Artifact(outdir).report()["quantized"][precision]


def _update_quantized_report(artifact: Artifact, precision: str, data: dict, replace: bool = False) -> None:
    sections = dict(artifact.report().get("quantized", {}))
    sections[precision] = data if replace else {**sections.get(precision, {}), **data}
    artifact.update_report("quantized", sections)


# --- validate a quantized model against the FP32 graph ---------------------------------------------

DEFAULT_THRESHOLDS = {
    "fp16": {"min_top1_agreement": 0.995, "max_accuracy_drop": 0.005},
    "int8": {"min_top1_agreement": 0.98, "max_accuracy_drop": 0.01},
}


def first_disagreement(agreements: list[np.ndarray], images: int) -> np.ndarray:
    """Per image: the index of the first selection whose kept tokens differ; -1 where none does."""
    first = np.full(images, -1)
    for index in reversed(range(len(agreements))):
        first[~agreements[index]] = index
    return first


def compare_precisions(fp32_outputs: list[np.ndarray], outputs: list[np.ndarray], labels, names: list[str],
                       ordered: bool = False) -> dict:
    """Agreement of a reduced-precision graph with the FP32 graph (logits first, then kept tokens).

    Kept tokens are compared as ``vitedge validate`` compares them (``validate.kept_agreement``):
    as sets, or element-wise where the family's outputs are per-patch maps (``ordered``).
    """
    from .validate import kept_agreement

    ref_top1, top1 = fp32_outputs[0].argmax(1), outputs[0].argmax(1)
    diff = np.abs(fp32_outputs[0].astype(np.float64) - outputs[0])
    flips = ref_top1 != top1
    agreements = [kept_agreement(a, b, ordered) for a, b in zip(fp32_outputs[1:], outputs[1:])]
    first = first_disagreement(agreements, len(top1))
    labels_of = ["none" if i < 0 else names[i] for i in first]
    metrics = {
        "images": int(len(top1)),
        "top1_agreement": float((~flips).mean()),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "kept_agreement": {name: float(agree.mean()) for name, agree in zip(names, agreements)},
        # Where the selections first part ways, over all images and over those whose class flipped.
        "first_disagreement": dict(collections.Counter(labels_of)),
        "first_disagreement_top1_flips": dict(collections.Counter(np.asarray(labels_of)[flips].tolist())),
    }
    if labels is not None:
        metrics["fp32_accuracy"] = float((ref_top1 == labels).mean())
        metrics["accuracy"] = float((top1 == labels).mean())
        metrics["accuracy_drop"] = metrics["fp32_accuracy"] - metrics["accuracy"]
    return metrics


def _calibration_note(cset, meta: dict) -> str | None:
    """A line when INT8 scales come from data that is not the model's domain (the bundled samples, or
    Fashion-MNIST for another model)."""
    what = set_out_of_domain(cset.source, meta["input"]["shape"][1], meta["arch"]["num_classes"])
    if what is None:
        return None
    return (f"INT8 scales calibrated on '{cset.name}', {what}: the graph runs, but in-domain calibration images "
            "(--calib FOLDER or a calibration YAML) are needed for accurate scales")


def validate_quantized(outdir, precision: str, data: str | None = "default", limit: int | None = None,
                       thresholds: dict | None = None, batch_size: int = 64, threads: int = 2, log=None,
                       shuffle_seed: int | None = None, skip_bad_images: bool = False) -> dict:
    """The quantized graph against the FP32 graph (both ONNX Runtime) on real images.

    Reports accuracy (labelled data), top-1 agreement, kept-token agreement per selection and
    where the first selection disagreement happens; writes report.json["quantized"][precision]
    ["validate"]; raises ValidationFailed when a threshold is missed.
    """
    from .data import domain_note, load_dataset
    from .errors import ValidationFailed
    from .runtime import run_batched
    from .validate import data_record, input_spec

    if precision not in PRECISIONS:
        raise VitedgeError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)} (fp32 is 'vitedge validate' without --precision)")
    limits = dict(DEFAULT_THRESHOLDS[precision])
    unknown = set(thresholds or {}) - set(limits)
    if unknown:
        raise VitedgeError(f"unknown threshold(s) {', '.join(sorted(unknown))} for a quantized model; known: {', '.join(limits)}")
    limits.update({k: v for k, v in (thresholds or {}).items() if v is not None})
    artifact = Artifact(outdir)
    quantized_path = artifact.model_for(precision)
    spec = input_spec(artifact.metadata)
    dataset = load_dataset(data, limit, shuffle_seed=shuffle_seed, skip_bad=skip_bad_images, in_chans=spec.in_chans)
    dataset = dataset.for_model(artifact.metadata["arch"]["num_classes"])
    note = domain_note(dataset, spec.in_chans, artifact.metadata["arch"]["num_classes"])
    names = artifact.metadata["outputs"][1:]
    if log:
        log(f"validating {precision} on {len(dataset)} {dataset.name} images against the FP32 graph")
        if note:
            log(f"note: {note}")
    fp32 = ort_session(artifact.model_path, threads)
    reduced = ort_session(quantized_path, threads)
    fp32_parts, parts, labels = [], [], []
    for images, batch_labels in dataset.batches(spec, batch_size, progress=log is not None):
        fp32_parts.append(run_batched(fp32, images, batch_size))
        parts.append(run_batched(reduced, images, batch_size))
        if batch_labels is not None:
            labels.append(batch_labels)
    fp32_outputs = [np.concatenate(p) for p in zip(*fp32_parts)]
    outputs = [np.concatenate(p) for p in zip(*parts)]
    usable = np.concatenate(labels) if labels else None
    ordered = get_family(artifact.metadata["family"]).kept_order_matters
    metrics = compare_precisions(fp32_outputs, outputs, usable, names, ordered)
    failures = []
    if metrics["top1_agreement"] < limits["min_top1_agreement"]:
        failures.append(f"top-1 agreement with FP32 {metrics['top1_agreement']:.4f} < {limits['min_top1_agreement']}")
    if "accuracy_drop" in metrics and metrics["accuracy_drop"] > limits["max_accuracy_drop"]:
        failures.append(f"accuracy drop {100 * metrics['accuracy_drop']:.2f} points > {100 * limits['max_accuracy_drop']:.2f}")
    section = {"data": dataset.name, **data_record(dataset, spec, note), **metrics, "thresholds": limits,
               "passed": not failures, "failures": failures}
    _update_quantized_report(artifact, precision, {"validate": section})
    if failures:
        raise ValidationFailed(f"{precision} validation failed on {dataset.name}: {'; '.join(failures)}")
    return section


def check_quantized(outdir, precision: str) -> dict:
    """The static/TensorRT lint on one quantized model; writes report.json["quantized"][precision]["check"]."""
    from .check import check_sizes

    artifact = Artifact(outdir)
    path = artifact.model_for(precision)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends on damaged files
        raise VitedgeError(f"cannot read {path}: {exc}") from None
    meta = artifact.metadata
    result = check_sizes(model, meta)
    result["model"] = path.name
    _update_quantized_report(artifact, precision, {"check": result})
    return result
