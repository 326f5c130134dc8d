"""vitedge.build: settings checks, trtexec.sh, the no-TensorRT path, engine-inspector parsing,
and (where ``tensorrt`` imports and a GPU is present) real engine builds.

Without TensorRT (CI) everything up to the TensorRT call runs for real: the artifact, the
device profiles, the QDQ model (quantized by ONNX Runtime on real Fashion-MNIST images), the
script (run with a recording stand-in for the trtexec binary, which is not installed here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import onnx
import pytest
from support import assert_clean_failure, copy_artifact, folder_listing, quiet, read_json, run_cli

import vitedge
from vitedge.build import (
    DEFAULT_DYNAMIC_BATCH,
    describe_parser_error,
    layer_precisions,
    parse_batch,
    resolve_build,
    tensor_precision,
    trtexec_args,
    trtexec_script,
)
from vitedge.errors import VitedgeError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAVE_TRT, reason="tests the path where TensorRT is not installed")


@pytest.fixture
def art(evit_artifact, tmp_path):
    return copy_artifact(evit_artifact, tmp_path / "art")


@pytest.fixture(scope="module")
def dynamic_artifact(tmp_path_factory, evit_ckpt):
    out = tmp_path_factory.mktemp("dyn") / "evit-dyn"
    vitedge.export(evit_ckpt, out, family="evit", num_heads=2, dynamic_batch=True, validate_data=None, log=quiet)
    return out


def _quantize(artifact, images) -> None:
    """A real QDQ INT8 model beside model.onnx: ONNX Runtime static quantization calibrated on Fashion-MNIST."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": images[i : i + 1]} for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(artifact / "model.onnx"), str(artifact / "model.int8.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"])


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory, evit_artifact, fmnist_batch):
    out = copy_artifact(evit_artifact, tmp_path_factory.mktemp("int8") / "art")
    _quantize(out, fmnist_batch[0])
    return out


# ---------------------------------------------------------------- settings and trtexec.sh


def test_fp32_settings_and_script(art):
    settings = resolve_build(art, trt_version=(10, 3))
    assert settings.onnx == "model.onnx" and settings.batch is None and settings.static_batch == 1
    args = trtexec_args(settings)
    assert args[:3] == ["--onnx=model.onnx", "--saveEngine=model.plan", "--memPoolSize=workspace:1024M"]
    assert "--fp16" not in args and "--int8" not in args and not any(a.startswith("--minShapes") for a in args)
    assert "--builderOptimizationLevel=3" in args and "--profilingVerbosity=detailed" in args
    script = trtexec_script(settings)
    assert script.startswith("#!/usr/bin/env bash\n") and "Targets TensorRT 10.3 (weakly typed" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_device_precision_dla_cache_and_version_flags(art, tmp_path):
    cache = tmp_path / "timing.cache"
    settings = resolve_build(art, "fp16", device="orin-nx-16gb", workspace_mb=256, timing_cache=cache, dla_core=1,
                             version_compatible=True, optimization_level=5, trt_version=(10, 3))
    args = trtexec_args(settings)
    assert "--fp16" in args and "--memPoolSize=workspace:256M" in args
    assert ["--useDLACore=1", "--allowGPUFallback"] == [a for a in args if "DLA" in a or "Fallback" in a]
    assert f"--timingCacheFile={cache}" in args and "--versionCompatible" in args
    assert "--builderOptimizationLevel=5" in args
    assert settings.to_dict()["gpu_fallback"] is True and settings.to_dict()["device"] == "orin-nx-16gb"
    # TensorRT 8.5 (Xavier NX's JetPack 5) has no optimisation-level flag
    older = resolve_build(art, "fp16", device="xavier-nx", trt_version=(8, 5))
    assert not any(a.startswith("--builderOptimizationLevel") for a in trtexec_args(older))


def test_without_tensorrt_the_script_follows_the_device_profile(art):
    if HAVE_TRT:
        pytest.skip("TensorRT is installed: the script targets its version")
    assert resolve_build(art, device="xavier-nx").trt_version == (8, 5)
    assert resolve_build(art, device="orin-nano-8gb").trt_version == (10, 3)
    assert resolve_build(art).trt_version == (10, 3)
    assert "TensorRT is not installed here" in resolve_build(art).notes[0]


def test_int8_and_best_use_the_qdq_model(int8_artifact):
    proto = onnx.load(str(int8_artifact / "model.int8.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 10
    int8 = resolve_build(int8_artifact, "int8", trt_version=(10, 3))
    assert int8.onnx == "model.int8.onnx"
    args = trtexec_args(int8)
    assert args[0] == "--onnx=model.int8.onnx" and "--int8" in args and "--fp16" not in args
    assert not any(a.startswith("--calib") for a in args)  # explicit quantization: scales are in the graph
    best = trtexec_args(resolve_build(int8_artifact, "best", trt_version=(10, 3)))
    assert "--int8" in best and "--fp16" in best
    # TensorRT 11: strongly typed, no precision flags, the QDQ graph says it all
    strong = resolve_build(int8_artifact, "int8", trt_version=(11, 4))
    assert strong.strongly_typed and not {"--int8", "--fp16"} & set(trtexec_args(strong))
    assert "strongly typed" in trtexec_script(strong)


def test_dynamic_batch_gets_an_optimisation_profile(dynamic_artifact):
    settings = resolve_build(dynamic_artifact, batch="2:4:16", trt_version=(10, 3))
    assert settings.batch == (2, 4, 16) and settings.static_batch is None
    args = trtexec_args(settings)
    assert ["--minShapes=images:2x1x28x28", "--optShapes=images:4x1x28x28", "--maxShapes=images:16x1x28x28"] == \
        [a for a in args if "Shapes=" in a]
    assert "--shapes=images:4x1x28x28" in trtexec_script(settings)
    assert settings.to_dict()["profile"] == {"min": [2, 1, 28, 28], "opt": [4, 1, 28, 28], "max": [16, 1, 28, 28]}
    assert resolve_build(dynamic_artifact, trt_version=(10, 3)).batch == DEFAULT_DYNAMIC_BATCH
    assert resolve_build(dynamic_artifact, batch="8", trt_version=(10, 3)).batch == (8, 8, 8)


def test_dynamic_resolution_gets_one_profile_over_its_size_range(tmp_path):
    """A castling graph for 16-40 px: the profile spans the sizes, combined with a dynamic batch."""
    castling = Path(__file__).resolve().parents[1] / "models" / "fmnist-castling.safetensors"
    out = tmp_path / "castling-dyn"
    vitedge.export(castling, out, dynamic_resolution="16:40", validate_data=None, log=quiet)
    settings = resolve_build(out, trt_version=(10, 3))
    assert settings.sizes == (16, 28, 40) and settings.batch is None and settings.dynamic
    assert [a for a in trtexec_args(settings) if "Shapes=" in a] == [
        "--minShapes=images:1x1x16x16", "--optShapes=images:1x1x28x28", "--maxShapes=images:1x1x40x40"]
    assert "--shapes=images:1x1x28x28" in trtexec_script(settings)
    both = tmp_path / "castling-dyn-batch"
    vitedge.export(castling, both, dynamic_resolution="16:40", dynamic_batch=True, validate_data=None, log=quiet)
    assert resolve_build(both, batch="1:2:8", trt_version=(10, 3)).to_dict()["profile"] == {
        "min": [1, 1, 16, 16], "opt": [2, 1, 28, 28], "max": [8, 1, 40, 40]}


def test_parse_batch():
    assert parse_batch("1:2:3") == (1, 2, 3) and parse_batch("4") == (4, 4, 4) and parse_batch((1, 1, 2)) == (1, 1, 2)
    for bad in ("0:1:2", "4:2:8", "1:2", "a:b:c", "", "1:2:3:4", "-1"):
        with pytest.raises(VitedgeError, match="--batch must be MIN:OPT:MAX"):
            parse_batch(bad)


# ---------------------------------------------------------------- bad input: one line, nothing written


@pytest.mark.parametrize("args, message", [
    (["--device", "jetson-nano"], "unknown device 'jetson-nano'; known devices: agx-orin-64gb, orin-nano-8gb"),
    (["--device", "x86-cpu"], "device 'x86-cpu' has no TensorRT"),
    (["--device", "orin-nano-8gb", "--precision", "fp16", "--dla-core", "0"], "'orin-nano-8gb' has no DLA cores"),
    (["--device", "orin-nx-16gb", "--precision", "fp16", "--dla-core", "2"], "has DLA cores 0..1"),
    (["--precision", "fp32", "--dla-core", "0"], "the DLA runs FP16 and INT8 layers only"),
    (["--dla-core", "-1", "--precision", "fp16"], "--dla-core must be >= 0"),
    (["--precision", "int8"], "needs the QDQ INT8 model .*model.int8.onnx; run 'vitedge quantize'"),
    (["--precision", "best"], "needs the QDQ INT8 model"),
    (["--batch", "1:4:8"], "exported for batch 1; build without --batch"),
    (["--workspace-mb", "0"], "--workspace-mb must be a positive number"),
    (["--optimization-level", "7"], "--optimization-level must be 0..5"),
    (["--device", "xavier-nx", "--version-compatible"], "version-compatible engines need TensorRT >= 8.6"),
    (["--precision", "fp8"], "Invalid value for '--precision'"),
])
def test_bad_settings_fail_in_one_line_and_write_nothing(art, args, message):
    if HAVE_TRT and "xavier-nx" in args:
        pytest.skip("with TensorRT installed the target version is the installed one")
    before = folder_listing(art)
    result = run_cli("build", art, *args)
    line = assert_clean_failure(result)
    assert result.exit_code == 2
    assert __import__("re").search(message, line), line
    assert folder_listing(art) == before


def test_missing_model_onnx_or_artifact(art, tmp_path):
    (art / "model.onnx").unlink()
    assert "model.onnx is missing; re-run 'vitedge export'" in assert_clean_failure(run_cli("build", art))
    assert "is not a vitedge artifact folder" in assert_clean_failure(run_cli("build", tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()


def test_int8_model_without_qdq_nodes_is_not_calibrated(art):
    (art / "model.int8.onnx").write_bytes((art / "model.onnx").read_bytes())
    line = assert_clean_failure(run_cli("build", art, "--precision", "int8"))
    assert "model.int8.onnx has no QuantizeLinear/DequantizeLinear nodes, so no INT8 calibration" in line
    assert not (art / "trtexec.sh").exists()


def test_strongly_typed_fp16_needs_the_fp16_model(art):
    with pytest.raises(VitedgeError, match="TensorRT 11 builds strongly typed networks .*/model.fp16.onnx"):
        resolve_build(art, "fp16", trt_version=(11, 0))
    with pytest.raises(VitedgeError, match="TensorRT 11 has no DLA support"):
        resolve_build(art, "fp16", dla_core=0, trt_version=(11, 0))


def test_timing_cache_in_a_missing_folder(art, tmp_path):
    with pytest.raises(VitedgeError, match="--timing-cache .* must be a file in an existing folder"):
        resolve_build(art, timing_cache=tmp_path / "no" / "cache.bin")


# ---------------------------------------------------------------- no TensorRT here


@no_trt
def test_without_tensorrt_build_writes_trtexec_sh_and_exits_6(art, tmp_path):
    metadata = (art / "vitedge.json").read_bytes()
    result = run_cli("build", art, "--device", "orin-nx-16gb", "--precision", "fp16", "--dla-core", "0")
    line = assert_clean_failure(result)
    assert result.exit_code == 6
    assert "TensorRT is not installed here: install it with pip install 'vitedge[trt]'" in line
    assert "docker/ images" in line and "trtexec.sh" in line
    script = art / "trtexec.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert not (art / "model.plan").exists() and (art / "vitedge.json").read_bytes() == metadata
    # Run it from elsewhere with a recording stand-in for the trtexec binary: it must cd to the
    # artifact and pass exactly the arguments trtexec_args computes.
    recorder = tmp_path / "trtexec"
    log = tmp_path / "calls.txt"
    recorder.write_text(f'#!/usr/bin/env bash\n{{ pwd; printf "%s\\n" "$@"; echo ---; }} >> {shlex.quote(str(log))}\n')
    recorder.chmod(0o755)
    subprocess.run(["bash", str(script)], cwd=tmp_path, env={**os.environ, "TRTEXEC": str(recorder)}, check=True)
    calls = log.read_text().split("---\n")[:-1]
    build_call, time_call = (c.splitlines() for c in calls)
    assert build_call[0] == str(art.resolve())
    expected = trtexec_args(resolve_build(art, "fp16", device="orin-nx-16gb", dla_core=0))
    assert build_call[1:] == expected
    assert "--fp16" in expected and "--useDLACore=0" in expected
    assert time_call[1:] == ["--loadEngine=model.plan", "--iterations=200", "--warmUp=500", "--useDLACore=0"]


@no_trt
def test_python_api_raises_backend_missing(art):
    with pytest.raises(vitedge.BackendMissing, match="TensorRT is not installed here"):
        vitedge.build(art, log=quiet)
    assert (art / "trtexec.sh").is_file()


# ---------------------------------------------------------------- parsing TensorRT's answers


def test_parser_errors_name_the_node_and_op(art):
    nodes = onnx.load(str(art / "model.onnx")).graph.node
    index = next(i for i, n in enumerate(nodes) if n.op_type == "TopK")
    line = describe_parser_error(art / "model.onnx", "  Assertion failed:\n K must be\tconstant ", index)
    assert line == (f"TensorRT's ONNX parser rejects node '{nodes[index].name}' (op TopK) in model.onnx: "
                    "Assertion failed: K must be constant")
    named = describe_parser_error(art / "model.onnx", "unsupported", -1, "my_node", "NonZero")
    assert named.startswith("TensorRT's ONNX parser rejects node 'my_node' (op NonZero)")
    assert "rejects the graph in model.onnx: bad file" in describe_parser_error(art / "model.onnx", "bad file", -1)


def test_layer_precisions_from_both_inspector_schemas():
    """TensorRT 10 writes 'Format/Datatype' per tensor; 11 splits it into 'Format' and 'DataType'."""
    trt10 = {"Layers": [
        {"Name": "patch_embed", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "images", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "t0", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "qkv", "LayerType": "CaskGemm", "Inputs": [{"Name": "t0", "Format/Datatype": "Row major Int8 format"}],
         "Outputs": []},
        {"Name": "fc1", "LayerType": "CaskGemm",
         "Inputs": [{"Name": "t1", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}], "Outputs": []},
        {"Name": "topk", "LayerType": "TopK", "Inputs": [{"Name": "t2", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "idx", "Format/Datatype": "Row major linear Int32"}]},
        "a layer name only (ProfilingVerbosity below DETAILED)",
    ], "Bindings": ["images", "logits"]}
    summary = layer_precisions(trt10)
    assert summary["layers"] == 4 and summary["by_precision"] == {"FP32": 2, "INT8": 1, "FP16": 1}
    assert [layer["precision"] for layer in summary["per_layer"]] == ["FP32", "INT8", "FP16", "FP32"]
    trt11 = {"Layers": [
        {"Name": "gemm", "LayerType": "Gemm", "Inputs": [{"Name": "a", "DataType": "Half", "Format": "Row major linear"}]},
        {"Name": "cast", "LayerType": "Cast", "Inputs": [{"Name": "b", "DataType": "Float"}]},
        {"Name": "q", "LayerType": "Quantize", "Inputs": [], "Outputs": [{"Name": "c", "DataType": "Int8"}]},
        {"Name": "bf", "LayerType": "Gemm", "Inputs": [{"Name": "d", "DataType": "BFloat16"}]},
    ], "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float"}]}
    assert layer_precisions(trt11)["by_precision"] == {"FP16": 1, "FP32": 1, "INT8": 1, "BF16": 1}
    assert tensor_precision({"Format/Datatype": "Unknown format"}) is None


# ---------------------------------------------------------------- real TensorRT (GPU machines)


@pytest.fixture
def tensorrt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'vitedge[trt]' on a CUDA machine)")
    from vitedge.trt_runtime import gpu_info

    if gpu_info()["name"] is None:
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    return trt


def test_tensorrt_fp32_and_fp16_builds(tensorrt, art, fmnist_batch, tmp_path):
    cache = tmp_path / "timing.cache"
    engine = vitedge.build(art, workspace_mb=256, timing_cache=cache, log=quiet)
    assert (art / "model.plan").stat().st_size == engine["plan_bytes"] > 0 and cache.stat().st_size > 0
    meta = read_json(art / "vitedge.json")["engine"]
    assert meta["tensorrt"] == tensorrt.__version__ and meta["gpu"]["compute_capability"]
    assert meta["precision"] == "fp32" and "FP32" in meta["layer_precisions"] and "FP16" not in meta["layer_precisions"]
    assert read_json(art / "report.json")["build"]["plan"] == "model.plan"
    assert json.loads((art / "engine_layers.json").read_text())["Layers"]
    result = vitedge.profile(art, "trt", iterations=20, warmup=5, latency_budget_ms=1000.0, log=quiet)
    assert result["budget"]["passed"] and 0 < result["gpu_compute_ms"]["p50_ms"] <= result["p50_ms"]
    assert (art / "profile_trt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    half = vitedge.build(art, "fp16", timing_cache=cache, log=quiet)
    assert "FP16" in half["layer_precisions"]


def test_tensorrt_int8_build_from_the_qdq_model(tensorrt, int8_artifact, tmp_path):
    art = copy_artifact(int8_artifact, tmp_path / "int8")
    engine = vitedge.build(art, "int8", log=quiet)
    assert engine["onnx"] == "model.int8.onnx" and "INT8" in engine["layer_precisions"]


def test_tensorrt_dynamic_batch_profile(tensorrt, dynamic_artifact, tmp_path):
    art = copy_artifact(dynamic_artifact, tmp_path / "dyn")
    engine = vitedge.build(art, batch="1:4:8", log=quiet)
    assert engine["profile"]["max"] == [8, 1, 28, 28]
    assert vitedge.profile(art, "trt", batch=8, iterations=5, warmup=1, log=quiet)["batch"] == 8
    with pytest.raises(VitedgeError, match="outside the engine's optimisation profile"):
        vitedge.profile(art, "trt", batch=9, iterations=1, warmup=0, log=quiet)


def test_tensorrt_gpu_mismatch_with_the_device_profile(tensorrt, art):
    from vitedge.trt_runtime import gpu_info

    other = "xavier-nx" if gpu_info()["compute_capability"] != "7.2" else "orin-nano-8gb"
    with pytest.raises(VitedgeError, match="a TensorRT plan runs only on the GPU it was built on"):
        vitedge.build(art, "fp16", device=other, log=quiet)
    assert not (art / "model.plan").exists()


def test_tensorrt_parser_error_is_one_line(tensorrt, art):
    """A graph TensorRT cannot parse (a NonZero with data-dependent output) → BuildFailed naming node and op."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NonZero", ["images"], ["nz"], name="data_dependent")], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("nz", TensorProto.INT64, [4, None])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(art / "model.onnx"))
    with pytest.raises(vitedge.BuildFailed):
        vitedge.build(art, log=quiet)
    assert not (art / "model.plan").exists()
