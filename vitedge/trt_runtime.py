"""TensorRT and the CUDA runtime, imported lazily: every other stage works without them.

``import_tensorrt`` is the one place that says how to get TensorRT; ``EngineRunner`` runs a
serialized plan with explicit copies so that the profiler can time host-to-device copies,
GPU compute and device-to-host copies separately (as trtexec reports them), with CUDA events.
The CUDA runtime comes from NVIDIA's ``cuda-python`` bindings (the ``[trt-cu12]`` /
``[trt-cu13]`` extras, or JetPack's pinned minor).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import BackendMissing, VitedgeError

INSTALL_HINT = ("install it with pip install 'vitedge[trt-cu12]' (driver >= 525) or 'vitedge[trt-cu13]' (driver >= 580) "
                "on an x86 CUDA machine, use JetPack 6's python3-libnvinfer on a Jetson, or run the docker/ images")
CUDA_PYTHON_HINT = ("install the cuda-python of this driver's CUDA minor (nvidia-smi's 'CUDA Version'; JetPack 6: "
                    "pip install 'cuda-python==12.6.*')")


def import_tensorrt():
    """``tensorrt``, or BackendMissing with how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise BackendMissing(f"TensorRT is not installed here: {INSTALL_HINT}") from None
    return tensorrt


def tensorrt_version() -> tuple[int, int] | None:
    """(major, minor) of the installed TensorRT, or None."""
    try:
        import tensorrt
    except ImportError:
        return None
    return parse_version(tensorrt.__version__)


def parse_version(text: str) -> tuple[int, int]:
    """'10.3.0.30' -> (10, 3); '10.x' -> (10, 0)."""
    parts = str(text).split(".")
    try:
        major = int(parts[0])
    except ValueError:
        raise VitedgeError(f"cannot read a TensorRT version from '{text}'") from None
    minor = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return major, minor


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise BackendMissing(f"the CUDA runtime bindings (cuda-python) are not installed: {CUDA_PYTHON_HINT}") from None
    return runtime


def _check(result):
    """cuda-python returns (error, value...): raise on an error, return the value(s)."""
    error, *values = result
    if int(error) != 0:
        raise VitedgeError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


def cuda_error_line(error, what: str) -> str:
    """One line for a failed CUDA runtime call; a too-new cuda-python for the driver says which to install."""
    name = getattr(error, "name", None) or str(error).split(".")[-1]
    line = f"{what} failed with {name}"
    if "InsufficientDriver" in name:
        line += (": the installed cuda-python's CUDA runtime is newer than this driver supports; "
                 + CUDA_PYTHON_HINT)
    elif "NoDevice" in name:
        line += ": no CUDA GPU is visible (run with --runtime nvidia / --gpus all inside docker)"
    return line


def gpu_info() -> dict:
    """Name and compute capability of CUDA device 0 (cuda-python, else torch).

    Raises instead of answering "unknown": a silent unknown used to skip the check that the plan
    is built on the device profile's GPU.
    """
    try:
        cudart = _cudart()
    except BackendMissing:
        cudart = None
    if cudart is not None:
        try:
            error, props = cudart.cudaGetDeviceProperties(0)
        except RuntimeError as exc:  # cuda-python dlopens the driver on first use
            raise VitedgeError(f"cuda-python cannot load the NVIDIA driver ({exc}): install the driver, or run the "
                               "container with --runtime nvidia / --gpus all") from None
        if int(error) != 0:
            raise VitedgeError(cuda_error_line(error, "cudaGetDeviceProperties(0)"))
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name, "compute_capability": f"{props.major}.{props.minor}"}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    raise BackendMissing(f"no CUDA runtime here can name the GPU: cuda-python is missing and torch sees no CUDA "
                         f"device; {CUDA_PYTHON_HINT}")


# Bits per element of each TensorRT DataType (by enum member name): 4-bit types pack two per byte.
ELEMENT_BITS = {"FLOAT": 32, "HALF": 16, "BF16": 16, "INT8": 8, "UINT8": 8, "BOOL": 8, "FP8": 8, "E8M0": 8,
                "INT32": 32, "INT64": 64, "INT4": 4, "FP4": 4}
HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_,
               "INT32": np.int32, "INT64": np.int64}


def host_buffer(type_name: str, shape) -> np.ndarray:
    """A zeroed host buffer for a tensor: its NumPy type where NumPy has one, else the packed bytes."""
    if type_name not in ELEMENT_BITS:
        raise VitedgeError(f"vitedge does not know the size of TensorRT data type {type_name}")
    count = int(np.prod(shape, dtype=np.int64))
    if type_name in HOST_DTYPES:
        return np.zeros(tuple(shape), HOST_DTYPES[type_name])
    return np.zeros((count * ELEMENT_BITS[type_name] + 7) // 8, np.uint8)


class TensorRTLogger:
    """A TensorRT logger that keeps the messages (the last error explains a failed build)."""

    def __new__(cls, trt, verbose: bool = False):
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[str, str]] = []
                self.verbose = verbose

            def log(self, severity, msg):
                level = str(severity).split(".")[-1]
                self.messages.append((level, msg))
                if self.verbose:
                    print(f"[TensorRT {level}] {msg}", flush=True)

            def last_error(self) -> str | None:
                errors = [m for level, m in self.messages if level in ("ERROR", "INTERNAL_ERROR")]
                return errors[-1] if errors else None

        return _Logger()


def deserialize(trt, plan: bytes, logger, version_compatible: bool = False, dla_core: int | None = None):
    """(runtime, engine) from a plan: host code allowed for version-compatible plans, the DLA core set for DLA ones."""
    runtime = trt.Runtime(logger)
    if version_compatible:
        runtime.engine_host_code_allowed = True  # a version-compatible plan carries its lean runtime
    if dla_core is not None:
        if runtime.num_DLA_cores <= dla_core:
            raise VitedgeError(f"the engine runs on DLA core {dla_core}, this machine has {runtime.num_DLA_cores} "
                               "DLA cores: rebuild with another --dla-core")
        runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise VitedgeError("TensorRT cannot load model.plan (built by another TensorRT version or for another GPU); "
                           "re-run 'vitedge build' on this machine")
    return runtime, engine


class EngineRunner:
    """Runs ``model.plan`` at one batch size from numpy (pageable) host buffers, with per-stage CUDA events."""

    def __init__(self, plan_path: Path, batch: int, version_compatible: bool = False, size: int | None = None,
                 dla_core: int | None = None):
        """``size`` fills the image axes of a dynamic-resolution engine (-1 there); ``dla_core`` is the build's."""
        trt = import_tensorrt()
        self.cudart = cudart = _cudart()
        self.logger = TensorRTLogger(trt)
        self.runtime, self.engine = deserialize(trt, Path(plan_path).read_bytes(), self.logger, version_compatible,
                                                dla_core)
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.inputs, self.outputs, self._device = [], [], []
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        rng = np.random.default_rng(0)
        for name in names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = list(self.engine.get_tensor_shape(name))
                if shape[0] == -1:
                    shape[0] = batch
                elif shape[0] != batch:
                    raise VitedgeError(f"the engine was built for batch {shape[0]}; profile with --batch {shape[0]} "
                                       "or rebuild with --batch MIN:OPT:MAX from a --dynamic-batch export")
                shape = [size if axis >= 2 and d == -1 else d for axis, d in enumerate(shape)]
                if not self.context.set_input_shape(name, shape):
                    raise VitedgeError(f"batch {batch} is outside the engine's optimisation profile; rebuild with a wider --batch")
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            host = host_buffer(self.engine.get_tensor_dtype(name).name, shape)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT and host.shape == shape:
                host[...] = rng.standard_normal(shape).astype(host.dtype)
            pointer = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
            self._device.append(pointer)
            self.context.set_tensor_address(name, int(pointer))
            entry = (name, host, pointer)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(entry)
        self.events = [_check(cudart.cudaEventCreate()) for _ in range(4)]

    def run(self) -> dict:
        """One inference; returns milliseconds for h2d, gpu_compute, d2h (CUDA events) and end_to_end (host clock)."""
        cudart, stream, ev = self.cudart, self.stream, self.events
        start = time.perf_counter()
        _check(cudart.cudaEventRecord(ev[0], stream))
        for _, host, pointer in self.inputs:
            _check(cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        _check(cudart.cudaEventRecord(ev[1], stream))
        if not self.context.execute_async_v3(int(stream)):
            raise VitedgeError(f"TensorRT inference failed: {self.logger.last_error() or 'no message'}")
        _check(cudart.cudaEventRecord(ev[2], stream))
        for _, host, pointer in self.outputs:
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        _check(cudart.cudaEventRecord(ev[3], stream))
        _check(cudart.cudaStreamSynchronize(stream))
        end_to_end = (time.perf_counter() - start) * 1000.0
        return {
            "h2d": float(_check(cudart.cudaEventElapsedTime(ev[0], ev[1]))),
            "gpu_compute": float(_check(cudart.cudaEventElapsedTime(ev[1], ev[2]))),
            "d2h": float(_check(cudart.cudaEventElapsedTime(ev[2], ev[3]))),
            "end_to_end": end_to_end,
        }

    def output(self, name: str) -> np.ndarray:
        return next(host for n, host, _ in self.outputs if n == name)

    def close(self) -> None:
        for pointer in self._device:
            self.cudart.cudaFree(pointer)
        for event in self.events:
            self.cudart.cudaEventDestroy(event)
        self.cudart.cudaStreamDestroy(self.stream)
        self._device = []
