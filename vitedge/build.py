"""Stage 7, build: the artifact's ONNX → a TensorRT engine (``model.plan``) + ``trtexec.sh``.

Settings are resolved and checked first (``resolve_build``, no TensorRT needed), then
``trtexec.sh`` is written (the same build as a trtexec command line, for boards that only have
trtexec), then TensorRT builds the engine. Where TensorRT is missing the build stops there with
BackendMissing (exit 6); a parser or builder failure is BuildFailed (exit 5).

Precision follows the TensorRT version the engine is for (the device profile's, else the one
installed here). FP16 is built strongly typed from ``model.fp16.onnx`` wherever TensorRT can
(10.x and 11.x): a weakly typed build with the FP16 flag would let TensorRT run the token scores
that TopK ranks in FP16, which ``vitedge quantize`` keeps in FP32 on purpose. INT8 is the QDQ
model (explicit quantization, symmetric scales in the graph) with the INT8 flag on TensorRT 10;
TensorRT 11 has no precision flags at all. TensorRT 8.5 (Xavier's JetPack 5) and DLA builds on
TensorRT 10 keep the weakly typed FP16 flag (no strong typing there / the DLA placement needs it).
"""

from __future__ import annotations

import collections
import datetime
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .artifact import Artifact, write_bytes_atomic, write_json_atomic, write_text_atomic
from .devices import Device, get_device
from .errors import BackendMissing, BuildFailed, VitedgeError
from .trt_runtime import INSTALL_HINT, parse_version, tensorrt_version

PRECISIONS = ("fp32", "fp16", "int8", "best")
PLAN = "model.plan"
TRTEXEC = "trtexec.sh"
LAYERS = "engine_layers.json"
FP16_MODEL = "model.fp16.onnx"
INT8_MODEL = "model.int8.onnx"
DEFAULT_TRT = (10, 3)  # JetPack 6's TensorRT: the target of trtexec.sh when nothing says otherwise
DEFAULT_DYNAMIC_BATCH = (1, 1, 8)
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
PYTHON_BUILDER_MIN = (10, 0)  # explicit batch only, builder_optimization_level, named I/O tensors
STRONGLY_TYPED_MIN = (10, 0)  # NetworkDefinitionCreationFlag.STRONGLY_TYPED / trtexec --stronglyTyped
VERSION_COMPATIBLE_MIN = (8, 6)  # BuilderFlag.VERSION_COMPATIBLE / trtexec --versionCompatible
OPTIMIZATION_LEVEL_MIN = (8, 6)  # builder_optimization_level / trtexec --builderOptimizationLevel


def dla_supported(version: tuple[int, int]) -> bool:
    """TensorRT 10.7 was the last 10.x with DLA; 11.0-11.3 have none; 11.4 brings it back (AGX Orin, JetPack 7.2+)."""
    return version <= (10, 7) or version >= (11, 4)


@dataclass
class BuildSettings:
    """Everything a build (Python API or trtexec) needs, checked against the artifact and device."""

    onnx: str
    precision: str
    input_name: str
    input_shape: list[int]  # [C, H, W]
    batch: tuple[int, int, int] | None  # (min, opt, max) for a dynamic batch, None when static
    static_batch: int | None
    workspace_mb: int
    optimization_level: int
    trt_version: tuple[int, int]
    strongly_typed: bool = False
    timing_cache: str | None = None
    dla_core: int | None = None
    version_compatible: bool = False
    device: Device | None = None
    calibration_cache: str | None = None
    notes: list[str] = field(default_factory=list)
    sizes: tuple[int, int, int] | None = None  # (min, opt, max) input size of a dynamic-resolution graph
    builder_blocked: str | None = None  # why the Python builder cannot make this engine here (trtexec.sh can)

    @property
    def precision_flags(self) -> tuple[str, ...]:
        """The weakly typed builder flags ("fp16", "int8"); none for a strongly typed network."""
        if self.strongly_typed:
            return ()
        return tuple(p for p in ("fp16", "int8") if self.precision in (p, "best"))

    def shape(self, batch: int, size: int | None = None) -> list[int]:
        channels, height, width = self.input_shape
        return [batch, channels, size or height, size or width]

    @property
    def dynamic(self) -> bool:
        """A symbolic batch or image size: TensorRT needs an optimisation profile."""
        return self.batch is not None or self.sizes is not None

    def profile_shapes(self) -> list[list[int]]:
        """Input shapes at the profile's min, opt and max (batch and image size together)."""
        batches = self.batch or (self.static_batch,) * 3
        return [self.shape(b, s) for b, s in zip(batches, self.sizes or (None,) * 3)]

    def to_dict(self) -> dict:
        return {
            "onnx": self.onnx, "precision": self.precision, "input": self.input_name,
            "profile": dict(zip(("min", "opt", "max"), self.profile_shapes())) if self.dynamic else None,
            "static_batch": self.static_batch, "workspace_mb": self.workspace_mb,
            "optimization_level": self.optimization_level, "timing_cache": self.timing_cache,
            "dla_core": self.dla_core, "gpu_fallback": self.dla_core is not None,
            "version_compatible": self.version_compatible, "strongly_typed": self.strongly_typed,
            "tensorrt_target": f"{self.trt_version[0]}.{self.trt_version[1]}",
            "calibration_cache": self.calibration_cache,
            "device": None if self.device is None else self.device.name,
        }


def parse_batch(text) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' or 'N' (= N:N:N), each >= 1 and MIN <= OPT <= MAX."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise VitedgeError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (or one number), got '{text}'")
    return values


def _quantized_model(artifact: Artifact) -> tuple[str, str | None]:
    """The QDQ INT8 model's file name and its calibration cache, from vitedge.json's "quantized" section."""
    section = artifact.metadata.get("quantized") or {}
    entry = section.get("int8") if isinstance(section.get("int8"), dict) else section
    model = entry.get("model") if isinstance(entry, dict) and str(entry.get("model", "")).endswith(".onnx") else INT8_MODEL
    cache = entry.get("calibration_cache") if isinstance(entry, dict) else None
    if cache is None:
        found = sorted(artifact.root.glob("*.cache")) + sorted(artifact.root.glob("*calib*"))
        cache = found[0].name if found else None
    return model, cache


def _check_qdq(path: Path) -> int:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends on damaged files
        raise VitedgeError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from None
    count = sum(node.op_type in QDQ_OPS for node in proto.graph.node)
    if count == 0:
        raise VitedgeError(f"{path.name} has no QuantizeLinear/DequantizeLinear nodes, so no INT8 calibration: "
                           "re-run 'vitedge quantize' (INT8) on this artifact")
    asymmetric = nonzero_zero_points(proto)
    if asymmetric:
        raise VitedgeError(f"{path.name} has {len(asymmetric)} of {count} Q/DQ nodes with a non-zero zero-point "
                           f"(first: '{asymmetric[0]}'); TensorRT's ONNX parser takes symmetric INT8 only: "
                           "re-quantize with 'vitedge quantize' (symmetric)")
    return count


def nonzero_zero_points(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes whose zero-point (an initializer or Constant) is not all zeros: TensorRT rejects them."""
    from onnx import numpy_helper

    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    bad = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS and len(node.input) > 2 and node.input[2]:
            zero = values.get(node.input[2])
            if zero is None or numpy_helper.to_array(zero).any():
                bad.append(node.name or node.output[0])
    return bad


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _target_version(profile: Device | None, installed: tuple[int, int] | None, notes: list[str]):
    """(the TensorRT the engine is for, why the Python builder here cannot build it or None).

    A plan loads only in the TensorRT that built it, so a device profile that names a TensorRT
    version wins over whatever is installed on the machine writing the script.
    """
    wanted = profile.tensorrt if profile is not None and profile.tensorrt else None
    if wanted is not None:
        target = parse_version(wanted)
        any_minor = not re.fullmatch(r"\d+\.\d+(\.\d+)*", wanted.strip())  # "10.x": any 10 minor
        if installed is not None and (installed[0] == target[0] if any_minor else installed == target):
            target = installed
        elif installed is not None:
            return target, (f"TensorRT {_version_text(installed)} is installed here but device '{profile.name}' runs "
                            f"TensorRT {wanted}, and a plan loads only in the TensorRT that built it: run trtexec.sh "
                            "(or 'vitedge build') on the device")
    elif installed is not None:
        target = installed
    else:
        target = DEFAULT_TRT
    if installed is None:
        notes.append(f"TensorRT is not installed here; trtexec.sh targets TensorRT {_version_text(target)}")
    if target < PYTHON_BUILDER_MIN:
        who = f"device '{profile.name}' runs" if wanted else "this machine has"
        return target, (f"{who} TensorRT {_version_text(target)}, older than the {_version_text(PYTHON_BUILDER_MIN)} "
                        "vitedge's Python builder needs (explicit batch, optimisation levels): run trtexec.sh on the board")
    return target, None


def resolve_build(outdir, precision: str = "fp32", device: str | None = None, workspace_mb: int = 1024,
                  timing_cache=None, dla_core: int | None = None, batch=None, version_compatible: bool = False,
                  optimization_level: int = 3, devices_dir=None, trt_version=None) -> BuildSettings:
    """Check every build setting against the artifact, the device profile and the TensorRT version.

    ``trt_version`` stands for the TensorRT installed here (default: the one ``import tensorrt``
    finds, None without it); the engine targets the device profile's version when it names one.
    """
    artifact = Artifact(outdir)
    meta = artifact.metadata
    if precision not in PRECISIONS:
        raise VitedgeError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if not isinstance(workspace_mb, int) or workspace_mb < 1:
        raise VitedgeError(f"--workspace-mb must be a positive number of MiB, got {workspace_mb}")
    if not 0 <= optimization_level <= 5:
        raise VitedgeError(f"--optimization-level must be 0..5 (TensorRT's builder levels), got {optimization_level}")
    profile = get_device(device, devices_dir) if device else None
    notes: list[str] = []
    if trt_version is None:
        installed = tensorrt_version()
    else:
        installed = parse_version(trt_version) if isinstance(trt_version, str) else tuple(trt_version)
    if profile is not None and "trt" not in profile.backends:
        raise VitedgeError(f"device '{profile.name}' has no TensorRT (its backends: {', '.join(profile.backends)}); "
                           "profile it with 'vitedge profile --backend ort' instead")
    trt_version, blocked = _target_version(profile, installed, notes)
    if profile is not None:
        wanted = ("fp16", "int8") if precision == "best" else (precision,)
        missing = [p for p in wanted if p not in profile.precisions]
        if missing:
            raise VitedgeError(f"device '{profile.name}' does not run {'/'.join(missing)} "
                               f"(its precisions: {', '.join(profile.precisions)})")
    if dla_core is not None:
        if dla_core < 0:
            raise VitedgeError(f"--dla-core must be >= 0, got {dla_core}")
        if profile is not None and dla_core >= profile.dla_cores:
            have = "no DLA cores" if profile.dla_cores == 0 else f"DLA cores 0..{profile.dla_cores - 1}"
            raise VitedgeError(f"device '{profile.name}' has {have}; drop --dla-core or pick another --device")
        if precision == "fp32":
            raise VitedgeError("the DLA runs FP16 and INT8 layers only: use --precision fp16, int8 or best with --dla-core")
        if not dla_supported(trt_version):
            raise VitedgeError(f"TensorRT {_version_text(trt_version)} has no DLA support (10.7 was the last 10.x with "
                               "it; 11.4 brings it back on AGX Orin with JetPack 7.2): drop --dla-core or build with "
                               "JetPack 6's TensorRT 10.3")
    if version_compatible and trt_version < VERSION_COMPATIBLE_MIN:
        raise VitedgeError(f"version-compatible engines need TensorRT >= 8.6, this targets {_version_text(trt_version)}: "
                           "drop --version-compatible")

    # Strong typing where TensorRT has it: always on 11, for FP16 on 10 (not on the DLA, placed by the FP16 flag there).
    strongly_typed = trt_version[0] >= 11 or (
        precision == "fp16" and trt_version >= STRONGLY_TYPED_MIN and dla_core is None)
    # The ONNX that carries the precision.
    source, calibration = meta.get("model", "model.onnx"), None
    if precision in ("int8", "best"):
        source, calibration = _quantized_model(artifact)
        if not (artifact.root / source).is_file():
            raise VitedgeError(f"--precision {precision} needs the QDQ INT8 model {artifact.root / source}; "
                               "run 'vitedge quantize' (INT8) on this artifact first")
        _check_qdq(artifact.root / source)
    elif precision == "fp16" and strongly_typed:
        source = FP16_MODEL
        if not (artifact.root / source).is_file():
            raise VitedgeError(f"TensorRT {_version_text(trt_version)} builds FP16 strongly typed (the token scores stay "
                               f"FP32): it needs {artifact.root / source}; run 'vitedge quantize' (FP16) on this "
                               "artifact first")
    if not (artifact.root / source).is_file():
        raise VitedgeError(f"{artifact.root / source} is missing; re-run 'vitedge export'")

    shape = meta["input"]["shape"]
    static = meta["input"]["batch"] if isinstance(meta["input"]["batch"], int) else None
    if static is not None:
        if batch is not None and parse_batch(batch) != (static,) * 3:
            raise VitedgeError(f"the graph was exported for batch {static}; build without --batch "
                               "or re-export with --dynamic-batch")
        profile_batch = None
    else:
        profile_batch = parse_batch(batch) if batch is not None else DEFAULT_DYNAMIC_BATCH
    sizes = _resolution(meta)
    if dla_core is not None:
        if profile_batch is not None and len(set(profile_batch)) > 1:
            raise VitedgeError(f"the DLA takes one input shape (min = opt = max), but --batch is "
                               f"{':'.join(map(str, profile_batch))}: pass --batch N with --dla-core")
        if sizes is not None and len(set(sizes)) > 1:
            raise VitedgeError(f"the DLA takes one input shape (min = opt = max), but the graph takes sizes "
                               f"{sizes[0]}..{sizes[2]} px: re-export without --dynamic-resolution for --dla-core")
    if timing_cache is not None:
        cache = Path(timing_cache)
        if cache.is_dir() or not cache.resolve().parent.is_dir():
            raise VitedgeError(f"--timing-cache {timing_cache} must be a file in an existing folder")
        timing_cache = str(cache.resolve())
    return BuildSettings(
        onnx=source, precision=precision, input_name=meta["input"]["name"], input_shape=list(shape[1:]),
        batch=profile_batch, static_batch=static, workspace_mb=workspace_mb, optimization_level=optimization_level,
        trt_version=tuple(trt_version), strongly_typed=strongly_typed, timing_cache=timing_cache, dla_core=dla_core,
        version_compatible=version_compatible, device=profile, calibration_cache=calibration, notes=notes,
        sizes=sizes, builder_blocked=blocked,
    )


def _resolution(meta: dict) -> tuple[int, int, int] | None:
    """A dynamic-resolution graph's (min, opt, max) input size from vitedge.json, else None."""
    resolution = meta["input"].get("resolution")
    return (resolution["min"], resolution["opt"], resolution["max"]) if resolution else None


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_args(settings: BuildSettings) -> list[str]:
    """trtexec arguments for the same build as ``build``, in the option grammar of the TensorRT it targets."""
    version = settings.trt_version
    args = [f"--onnx={settings.onnx}", f"--saveEngine={PLAN}",
            f"--memPoolSize=workspace:{settings.workspace_mb}"]  # MiB: the unit every version reads a bare number in
    args += [f"--{flag}" for flag in settings.precision_flags]  # explicit quantization: no --calib
    if settings.strongly_typed and version[0] == 10:
        args.append("--stronglyTyped")  # 11 is strongly typed only (the flag is a deprecated no-op there)
    if settings.dynamic:
        name = settings.input_name
        for flag, shape in zip(("min", "opt", "max"), settings.profile_shapes()):
            args.append(f"--{flag}Shapes={name}:{_dims(shape)}")
    if version >= OPTIMIZATION_LEVEL_MIN:
        args.append(f"--builderOptimizationLevel={settings.optimization_level}")
    if settings.timing_cache:
        args.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.dla_core is not None:
        args += [f"--useDLACore={settings.dla_core}", "--allowGPUFallback"]
    if settings.version_compatible:
        args.append("--versionCompatible")
    args += ["--profilingVerbosity=detailed", f"--exportLayerInfo={LAYERS}"]
    return args


def trtexec_timing_args(settings: BuildSettings) -> list[str]:
    """trtexec arguments that load and time the saved plan the way ``vitedge profile`` runs it."""
    timing = [f"--loadEngine={PLAN}", "--iterations=200", "--warmUp=500"]
    if settings.dynamic:
        timing.append(f"--shapes={settings.input_name}:{_dims(settings.profile_shapes()[1])}")
    if settings.dla_core is not None:
        timing.append(f"--useDLACore={settings.dla_core}")
    if settings.version_compatible:
        timing.append("--versionCompatible")  # trtexec lets the runtime run the plan's embedded lean runtime only then
    return timing


def trtexec_script(settings: BuildSettings) -> str:
    """``trtexec.sh``: build the engine, then time it (H2D, GPU compute, D2H percentiles)."""
    build = " \\\n  ".join(shlex.quote(a) for a in trtexec_args(settings))
    typing = (" (strongly typed: the precision comes from the ONNX)." if settings.strongly_typed
              else " (weakly typed: precision from builder flags).")
    lines = [
        "#!/usr/bin/env bash",
        "# Written by 'vitedge build': the same engine build as the Python API, for a board that only has trtexec.",
        f"# Targets TensorRT {_version_text(settings.trt_version)}" + typing,
        f"# precision {settings.precision}, source {settings.onnx}"
        + (f", device {settings.device.name}" if settings.device else "")
        + (f", calibration cache {settings.calibration_cache} (scales already in the QDQ graph)" if settings.calibration_cache else ""),
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        "",
        f'"$TRTEXEC" \\\n  {build}',
        "",
        "# Latency of the saved engine:",
        '"$TRTEXEC" ' + " ".join(shlex.quote(t) for t in trtexec_timing_args(settings)),
        "",
    ]
    return "\n".join(lines)


def describe_parser_error(onnx_path: Path, desc: str, node_index: int = -1, node_name: str = "", node_op: str = "") -> str:
    """One line for a TensorRT ONNX-parser error, naming the node and its op (looked up in the graph if needed)."""
    if (not node_name or not node_op) and node_index is not None and node_index >= 0:
        try:
            nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
            if node_index < len(nodes):
                node_name = node_name or nodes[node_index].name
                node_op = node_op or nodes[node_index].op_type
        except Exception:  # the graph was readable by TensorRT; if onnx cannot read it, keep what the parser said
            pass
    desc = " ".join(str(desc).split())
    where = f"node '{node_name or '?'}' (op {node_op or '?'})" if (node_name or node_op) else "the graph"
    return f"TensorRT's ONNX parser rejects {where} in {Path(onnx_path).name}: {desc[:300]}"


_PRECISION_WORDS = (("int8", "INT8"), ("fp16", "FP16"), ("half", "FP16"), ("bfloat16", "BF16"), ("fp8", "FP8"),
                    ("fp32", "FP32"), ("float", "FP32"), ("int32", "INT32"), ("int64", "INT64"), ("bool", "BOOL"))


def tensor_precision(tensor: dict) -> str | None:
    """Precision of one tensor in the inspector's JSON: TensorRT 10 has 'Format/Datatype', 11 has 'DataType'."""
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or "").lower()
    for word, name in _PRECISION_WORDS:
        if re.search(rf"\b{word}\b", text) or (word in ("int8", "fp16", "fp32", "fp8") and word in text):
            return name
    return None


def layer_precisions(engine_info: dict) -> dict:
    """Which precision each engine layer really runs in (its first input's type, as trex counts it).

    ``selection`` counts the precisions of the TopK layers (the token selection): FP16 there
    means TensorRT ranks the scores in half precision, which the FP32 selection path forbids.
    """
    layers = []
    for layer in engine_info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        tensors = list(layer.get("Inputs") or []) + list(layer.get("Outputs") or [])
        precision = next((p for p in map(tensor_precision, tensors) if p), None)
        layers.append({"name": layer.get("Name"), "type": layer.get("LayerType"), "precision": precision or "unknown"})
    counts = collections.Counter(layer["precision"] for layer in layers)
    selection = collections.Counter(layer["precision"] for layer in layers
                                    if "topk" in f"{layer['type']} {layer['name']}".lower())
    return {"layers": len(layers), "by_precision": dict(counts.most_common()),
            "selection": dict(selection.most_common()), "per_layer": layers}


def _network_flags(trt, settings: BuildSettings) -> int:
    """TensorRT 10's STRONGLY_TYPED creation flag (11 is strongly typed only and takes 0)."""
    if settings.strongly_typed and settings.trt_version[0] == 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _set_precision_flags(trt, config, settings: BuildSettings) -> None:
    """TensorRT 10's weakly typed precision flags (11 has no such builder flags)."""
    for flag in settings.precision_flags:
        config.set_flag(trt.BuilderFlag.FP16 if flag == "fp16" else trt.BuilderFlag.INT8)


def _build_engine(settings: BuildSettings, root: Path, log) -> tuple[bytes, bytes | None, dict, dict]:
    """TensorRT: parse, configure, build, serialise, inspect. Returns (plan, timing cache, inspector JSON, GPU)."""
    from .trt_runtime import TensorRTLogger, deserialize, gpu_info, import_tensorrt

    trt = import_tensorrt()
    gpu = gpu_info()
    device = settings.device
    if device is not None and device.compute_capability and gpu["compute_capability"] != device.compute_capability:
        raise VitedgeError(f"this GPU ({gpu['name']}, compute capability {gpu['compute_capability']}) is not a "
                           f"{device.name} ({device.compute_capability}): a TensorRT plan runs only on the GPU it was "
                           "built on; build on the device (or run trtexec.sh there), or drop --device")
    logger = TensorRTLogger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, settings))  # explicit batch is the only mode in 10+
    parser = trt.OnnxParser(network, logger)
    onnx_path = root / settings.onnx
    if not parser.parse_from_file(str(onnx_path)):
        error = parser.get_error(0)
        raise BuildFailed(describe_parser_error(onnx_path, error.desc(), error.node(), error.node_name(),
                                                error.node_operator()))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.builder_optimization_level = settings.optimization_level
    if settings.precision_flags:
        _set_precision_flags(trt, config, settings)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.dla_core is not None:
        if builder.num_DLA_cores <= settings.dla_core:
            raise VitedgeError(f"this machine has {builder.num_DLA_cores} DLA cores; --dla-core {settings.dla_core} does not exist")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if settings.dynamic:
        profile = builder.create_optimization_profile()
        profile.set_shape(settings.input_name, *settings.profile_shapes())
        config.add_optimization_profile(profile)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    typing = "strongly typed" if settings.strongly_typed else "weakly typed"
    log(f"building the TensorRT {trt.__version__} engine ({settings.precision}, {typing}) on {gpu['name']}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildFailed(f"TensorRT could not build the engine: {logger.last_error() or 'no error message'}")
    plan = bytes(plan)
    timing = bytes(config.get_timing_cache().serialize()) if cache_path is not None else None
    _, engine = deserialize(trt, plan, logger, settings.version_compatible, settings.dla_core)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    gpu["tensorrt"] = trt.__version__
    return plan, timing, info, gpu


def build(outdir, precision: str = "fp32", device: str | None = None, workspace_mb: int = 1024, timing_cache=None,
          dla_core: int | None = None, batch=None, version_compatible: bool = False, optimization_level: int = 3,
          devices_dir=None, log=print) -> dict:
    """OUTDIR's ONNX → OUTDIR/model.plan (+ trtexec.sh, engine_layers.json; vitedge.json["engine"]).

    Raises VitedgeError on bad settings (nothing written), BackendMissing where TensorRT is not
    installed or cannot build for the target here (only trtexec.sh written: an older TensorRT than
    the Python builder supports, or a device whose TensorRT differs from this machine's), and
    BuildFailed when TensorRT rejects the graph.
    """
    settings = resolve_build(outdir, precision, device, workspace_mb, timing_cache, dla_core, batch,
                             version_compatible, optimization_level, devices_dir)
    artifact = Artifact(outdir)
    root = artifact.root
    write_text_atomic(root / TRTEXEC, trtexec_script(settings))
    (root / TRTEXEC).chmod(0o755)
    for note in settings.notes:
        log(note)
    log(f"wrote {root / TRTEXEC}")
    if settings.builder_blocked:
        raise BackendMissing(f"{settings.builder_blocked}; wrote {root / TRTEXEC}")
    try:
        plan, timing, info, gpu = _build_engine(settings, root, log)
    except BackendMissing as exc:
        raise BackendMissing(f"{exc}; wrote {root / TRTEXEC} to build it with trtexec where TensorRT is") from None
    precisions = layer_precisions(info)
    write_bytes_atomic(root / PLAN, plan)
    write_json_atomic(root / LAYERS, info)
    if timing is not None:
        write_bytes_atomic(Path(settings.timing_cache), timing)
    engine = {
        "plan": PLAN,
        "tensorrt": gpu.pop("tensorrt"),
        "gpu": gpu,
        **settings.to_dict(),
        "device_profile": None if settings.device is None else settings.device.to_dict(),
        "layer_precisions": precisions["by_precision"],
        "selection_precisions": precisions["selection"],
        "layers": precisions["layers"],
        "plan_bytes": len(plan),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata = dict(artifact.metadata)
    metadata["engine"] = engine
    write_json_atomic(root / "vitedge.json", metadata)
    artifact.metadata = metadata
    artifact.update_report("build", {k: v for k, v in engine.items() if k != "device_profile"})
    log(f"wrote {root / PLAN} ({len(plan) / 1e6:.1f} MB): layers by precision {precisions['by_precision']}, "
        f"token selection (TopK) {precisions['selection'] or 'none'}")
    if set(precisions["selection"]) - {"FP32", "INT32", "INT64", "unknown"}:
        log("warning: TensorRT ranks token scores below FP32 in this engine; selection may differ from the reference")
    return engine


__all__ = ["BuildSettings", "PRECISIONS", "build", "describe_parser_error", "dla_supported", "layer_precisions",
           "nonzero_zero_points", "parse_batch", "resolve_build", "trtexec_args", "trtexec_script",
           "trtexec_timing_args", "INSTALL_HINT"]
