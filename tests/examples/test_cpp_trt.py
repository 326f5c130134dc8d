"""examples/cpp's TensorRT program: its CMake rules, what it reads from vitedge.json and how it fills
dynamic input dimensions (engine_settings.hpp, built and run here without TensorRT), and a
syntax-only compile against real TensorRT headers.

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


@pytest.fixture(scope="module")
def engine_settings_program(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("cpp-trt")
    subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "test_engine_settings", "-j", "2"], check=True,
                   capture_output=True)
    return build / "test_engine_settings"


def test_the_program_reads_what_build_records(engine_settings_program, evit_artifact, tmp_path):
    """vitedge_trt_infer's view of vitedge.json["engine"], as 'vitedge build' writes it (BuildSettings.to_dict)."""
    import json

    from vitedge.build import resolve_build

    assert subprocess.run([str(engine_settings_program)]).returncode == 0  # the dynamic-dimension rules
    cases = [({}, "version_compatible=0 dla_core=-1"),
             ({"precision": "fp16", "dla_core": 1, "version_compatible": True}, "version_compatible=1 dla_core=1")]
    for options, expected in cases:
        meta = json.loads((evit_artifact / "vitedge.json").read_text())
        meta["engine"] = {"plan": "model.plan", **resolve_build(evit_artifact, trt_version=(10, 3), **options).to_dict()}
        path = tmp_path / "vitedge.json"
        path.write_text(json.dumps(meta))
        result = subprocess.run([str(engine_settings_program), str(path)], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.strip() == expected, result.stdout + result.stderr
