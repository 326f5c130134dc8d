"""vitedge.trt_runtime and the TensorRT API vitedge calls.

The API-surface test reads vitedge's TensorRT code (AST) for every attribute, method and enum
member it touches on TensorRT objects and checks each against the names the real TensorRT Python
bindings export (tests/data/tensorrt_api/<version>.txt, from the PyPI wheels by
scripts/tensorrt_api_names.py): no TensorRT and no network needed.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from support import REPO

from vitedge.errors import BackendMissing, VitedgeError
from vitedge.trt_runtime import ELEMENT_BITS, cuda_error_line, gpu_info, host_buffer

API_LISTS = REPO / "tests" / "data" / "tensorrt_api"
TENSORRT_CODE = [REPO / "vitedge" / "build.py", REPO / "vitedge" / "trt_runtime.py", REPO / "vitedge" / "profile.py"]
# Python builder targets: JetPack 6's 10.3, the newest 10.x ([trt-cu12]), the newest 11.x ([trt-cu13]).
VERSIONS = ("10.3", "10.16", "11.4")
# Functions that run on some versions only (build.py calls them only where the version has the API).
VERSION_BRANCHES = {"_set_precision_flags": ("10.3", "10.16")}
# Parameters and calls whose values are TensorRT objects; whatever is derived from them is too.
TRT_PARAMETERS = {"trt", "config", "builder", "network", "engine", "runtime", "context", "parser"}
TRT_FACTORIES = {"import_tensorrt", "deserialize"}


def api_names(version: str) -> set[str]:
    lines = (API_LISTS / f"{version}.txt").read_text().splitlines()
    return {line for line in lines if line and not line.startswith("#")}


def exported(name: str, names: set[str]) -> bool:
    """Present as a string, or as the tail of a longer identifier the linker merged it into ('INT8' in 'UINT8')."""
    return name in names or any(other.endswith(name) for other in names)


def _root(node: ast.AST) -> str | None:
    """The name an attribute/call/subscript chain starts from: 'self.engine' for self.engine.get_x()[0]."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _target_names(target: ast.AST) -> list[str]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for element in target.elts for n in _target_names(element)]
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
        return [f"self.{target.attr}"]
    return [target.id] if isinstance(target, ast.Name) else []


def _is_trt(value: ast.AST, tainted: set[str]) -> bool:
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in TRT_FACTORIES:
        return True
    return _root(value) in tainted


def tensorrt_uses(source: str) -> dict[str, set[str]]:
    """Function name → names of TensorRT attributes/methods/enum members it uses (per top-level def or class)."""
    uses: dict[str, set[str]] = {}
    for top in ast.parse(source).body:
        if not isinstance(top, (ast.FunctionDef, ast.ClassDef)):
            continue
        functions = [n for n in ast.walk(top) if isinstance(n, (ast.FunctionDef, ast.Lambda))]
        tainted = {a.arg for f in functions for a in f.args.args if a.arg in TRT_PARAMETERS}
        for _ in range(5):  # propagate through assignments until nothing new is tainted
            before = len(tainted)
            for node in ast.walk(top):
                if isinstance(node, ast.Assign) and _is_trt(node.value, tainted):
                    tainted.update(n for t in node.targets for n in _target_names(t))
                elif isinstance(node, ast.NamedExpr) and _is_trt(node.value, tainted):
                    tainted.add(node.target.id)
            if len(tainted) == before:
                break
        names = {n.attr for n in ast.walk(top) if isinstance(n, ast.Attribute) and _root(n.value) in tainted}
        if names:
            uses[top.name] = names
    return uses


def all_uses() -> dict[str, set[str]]:
    uses: dict[str, set[str]] = {}
    for path in TENSORRT_CODE:
        for function, names in tensorrt_uses(path.read_text()).items():
            uses.setdefault(function, set()).update(names)
    return uses


def missing_names(uses: dict[str, set[str]], version: str) -> list[str]:
    names = api_names(version)
    return sorted(f"{function}: {name}" for function, used in uses.items()
                  if version in VERSION_BRANCHES.get(function, VERSIONS) for name in used
                  if not exported(name, names))


# ---------------------------------------------------------------- API surface


def test_the_name_lists_come_from_the_wheels():
    for version in VERSIONS:
        header = (API_LISTS / f"{version}.txt").read_text().splitlines()[:2]
        assert header[0].startswith(f"# TensorRT {version} Python API names") and "sha256" in header[1]
        assert len(api_names(version)) > 1000


def test_the_analysis_finds_the_calls_that_matter():
    uses = all_uses()
    assert {"create_network", "create_builder_config", "set_memory_pool_limit", "builder_optimization_level",
            "STRONGLY_TYPED", "NetworkDefinitionCreationFlag", "VERSION_COMPATIBLE", "DLA_core",
            "get_engine_information"} <= uses["_build_engine"] | uses["_network_flags"]
    assert {"engine_host_code_allowed", "deserialize_cuda_engine", "DLA_core", "num_DLA_cores"} <= uses["deserialize"]
    assert {"set_input_shape", "execute_async_v3", "get_tensor_dtype", "set_tensor_address"} <= uses["EngineRunner"]
    assert uses["_set_precision_flags"] == {"set_flag", "BuilderFlag", "FP16", "INT8"}
    for function in VERSION_BRANCHES:  # a renamed branch function must not drop out of the check silently
        assert function in uses


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tensorrt_name_vitedge_uses_exists(version):
    assert missing_names(all_uses(), version) == []


def test_a_name_tensorrt_does_not_have_is_reported():
    made_up = tensorrt_uses("def f(trt):\n    builder = trt.Builder(None)\n    builder.build_cuda_engine_v9()\n")
    assert missing_names(made_up, "10.3") == ["f: build_cuda_engine_v9"]
    # TensorRT 11 dropped the weakly typed precision flags: calling them outside the 10.x branch is caught
    weak = tensorrt_uses("def g(trt, config):\n    config.set_flag(trt.BuilderFlag.FP16)\n")
    assert missing_names(weak, "11.4") == ["g: FP16"] and missing_names(weak, "10.3") == []
    # names on objects that are not TensorRT's (CUDA runtime, numpy) are not TensorRT API
    assert tensorrt_uses("def h(cudart):\n    cudart.cudaStreamCreate()\n") == {}


# ---------------------------------------------------------------- GPU, CUDA runtime, buffers


def test_gpu_info_fails_loudly_without_a_usable_gpu():
    """Without a driver, gpu_info raises one line instead of answering 'unknown' (which skipped the CC check)."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: this machine may have a GPU")
    try:
        info = gpu_info()
    except BackendMissing as exc:
        assert "cuda-python is missing and torch sees no CUDA device" in str(exc)
        assert "pip install 'cuda-python==12.6.*'" in str(exc)
    except VitedgeError as exc:  # cuda-python installed, no driver here
        assert str(exc).startswith(("cuda-python cannot load the NVIDIA driver", "cudaGetDeviceProperties(0) failed"))
    else:
        assert info["name"] and info["compute_capability"], info


def test_cuda_errors_say_what_to_do():
    class Error:  # the shape of cuda-python's cudaError_t enum member: a name and an int value
        def __init__(self, name):
            self.name = name

    line = cuda_error_line(Error("cudaErrorInsufficientDriver"), "cudaGetDeviceProperties(0)")
    assert line.startswith("cudaGetDeviceProperties(0) failed with cudaErrorInsufficientDriver: the installed")
    assert "pip install 'cuda-python==12.6.*'" in line
    assert "--gpus all" in cuda_error_line(Error("cudaErrorNoDevice"), "x")
    cuda = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    real = cuda_error_line(cuda.cudaError_t.cudaErrorInsufficientDriver, "cudaMalloc")
    assert real.startswith("cudaMalloc failed with cudaErrorInsufficientDriver: ")


def test_host_buffers_have_the_real_element_sizes():
    """BF16/FP8/E8M0 are 1-2 bytes and INT4/FP4 pack two per byte (the old C++ element_size said 4)."""
    assert host_buffer("FLOAT", (2, 3)).nbytes == 24 and host_buffer("FLOAT", (2, 3)).dtype == np.float32
    assert host_buffer("HALF", (1, 10)).dtype == np.float16 and host_buffer("INT64", (3,)).nbytes == 24
    assert host_buffer("BF16", (2, 3)).nbytes == 12
    assert host_buffer("FP8", (5,)).nbytes == 5 and host_buffer("E8M0", (4,)).nbytes == 4
    assert host_buffer("INT4", (1, 7)).nbytes == 4 and host_buffer("FP4", (8,)).nbytes == 4
    with pytest.raises(VitedgeError, match="does not know the size of TensorRT data type FP6"):
        host_buffer("FP6", (1,))


def test_every_data_type_of_each_version_has_a_size():
    """The DataType members the bindings export are all in ELEMENT_BITS (FP4 arrived in 10.8, E8M0 in 10.12)."""
    for version in VERSIONS:
        names = api_names(version)
        for member in ("FLOAT", "HALF", "BF16", "INT8", "UINT8", "BOOL", "FP8", "INT32", "INT64", "INT4"):
            assert exported(member, names), (version, member)
    assert {"FP4", "E8M0"} <= api_names("10.16") and "FP4" in api_names("11.4")
    assert set(ELEMENT_BITS) >= {"FP4", "E8M0", "INT4", "BF16", "FP8"}


def test_the_shipped_bindings_list_is_not_a_stale_copy():
    assert Path(API_LISTS / "10.3.txt").read_text() != Path(API_LISTS / "11.4.txt").read_text()
    assert not exported("FP16", api_names("11.4")) and exported("FP16", api_names("10.3"))
