"""examples/cpp's TensorRT program: its CMake rules, and a syntax-only compile against real TensorRT headers.

CI has no TensorRT, so the compile runs where ``VITEDGE_TRT_HEADERS`` names one or more TensorRT
include folders (colon-separated, e.g. the ``include/`` of NVIDIA/TensorRT's release/10.3 and
release/11.1 branches, or /usr/include/aarch64-linux-gnu on JetPack) and a CUDA toolkit's
``cuda_runtime_api.h`` is found (``CUDA_HOME`` or /usr/local/cuda*). ``-Werror=switch`` makes a
TensorRT data type without a size in ``element_bits`` a compile error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import REPO

CPP = REPO / "examples" / "cpp"
PROGRAM = CPP / "trt" / "vitedge_trt_infer.cpp"


def _cuda_include() -> Path | None:
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates += sorted(Path("/usr/local").glob("cuda*/include"), reverse=True)
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


def test_cmake_needs_3_17_and_includes_tensorrt_as_system():
    text = (CPP / "CMakeLists.txt").read_text()
    version = re.search(r"cmake_minimum_required\(VERSION (\d+)\.(\d+)", text)
    assert version and (int(version[1]), int(version[2])) >= (3, 17), "FindCUDAToolkit (CUDA::cudart) needs CMake 3.17"
    assert re.search(r"target_include_directories\(vitedge_trt_infer SYSTEM PRIVATE \$\{TENSORRT_INCLUDE_DIR\}\)", text)


def test_the_program_compiles_against_tensorrt_headers():
    folders = [Path(p) for p in os.environ.get("VITEDGE_TRT_HEADERS", "").split(os.pathsep) if p]
    if not folders:
        pytest.skip("set VITEDGE_TRT_HEADERS to TensorRT include folders to compile-check vitedge_trt_infer.cpp")
    cuda = _cuda_include()
    compiler = shutil.which("g++") or shutil.which("clang++")
    if cuda is None or compiler is None:
        pytest.skip("no cuda_runtime_api.h (CUDA_HOME) or no C++ compiler here")
    for folder in folders:
        assert (folder / "NvInfer.h").is_file(), f"{folder} has no NvInfer.h"
        result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror=switch",
                                 "-isystem", str(folder), "-isystem", str(cuda), "-I", str(CPP / "include"),
                                 str(PROGRAM)], capture_output=True, text=True)
        assert result.returncode == 0, f"{folder}:\n{result.stderr[-3000:]}"
