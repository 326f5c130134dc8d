"""vitedge.build: settings checks, trtexec.sh, the no-TensorRT path, engine-inspector parsing,
and (where ``tensorrt`` imports and a GPU is present) real engine builds.

Without TensorRT (CI) everything up to the TensorRT call runs for real: the artifact, the
device profiles, the QDQ and FP16 models (``vitedge quantize`` on real Fashion-MNIST images), the
script (run with a recording stand-in for the trtexec binary, which is not installed here), and
every trtexec command line the CLI can produce, checked against trtexec's option grammar of each
TensorRT version (tests/data/trtexec/, read from NVIDIA's sampleOptions.cpp).
"""

from __future__ import annotations

import collections
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
    _check_qdq,
    describe_parser_error,
    dla_supported,
    layer_precisions,
    nonzero_zero_points,
    parse_batch,
    resolve_build,
    tensor_precision,
    trtexec_args,
    trtexec_script,
    trtexec_timing_args,
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


CALIBRATION_SET = "source: fashion-mnist\nsplit: train\ncount: 48\nseed: 0\npreprocess: {size: 28, channels: 1}\n"
GRAMMARS = Path(__file__).resolve().parent / "data" / "trtexec"


@pytest.fixture(scope="module")
def castling_exports(tmp_path_factory) -> dict[str, Path]:
    """The bundled Castling-ViT exported for 16-40 px, with a static and with a dynamic batch (one export each)."""
    castling = Path(__file__).resolve().parents[1] / "models" / "fmnist-castling.safetensors"
    root = tmp_path_factory.mktemp("castling")
    exports = {}
    for name, extra in (("resolution", {}), ("resolution+batch", {"dynamic_batch": True})):
        exports[name] = root / name
        vitedge.export(castling, exports[name], dynamic_resolution="16:40", validate_data=None, log=quiet, **extra)
    return exports


@pytest.fixture(scope="module")
def calibration_set(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "fmnist-train-48.yaml"
    path.write_text(CALIBRATION_SET)
    return path


def _asymmetric_qdq(artifact, images) -> Path:
    """What this file's INT8 helper used to make: ONNX Runtime's default asymmetric activations (TensorRT rejects them)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": images[i : i + 1]} for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    target = artifact / "model.int8.onnx"
    quantize_static(str(artifact / "model.onnx"), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return target


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory, evit_artifact, calibration_set):
    """The product path: 'vitedge quantize' INT8 (symmetric, as TensorRT's parser requires) and FP16."""
    out = copy_artifact(evit_artifact, tmp_path_factory.mktemp("int8") / "art")
    vitedge.quantize(out, "int8", calib=str(calibration_set), validate_data=None, log=quiet)
    vitedge.quantize(out, "fp16", validate_data=None, log=quiet)
    return out


@pytest.fixture
def fp16_art(int8_artifact, tmp_path):
    return copy_artifact(int8_artifact, tmp_path / "fp16")


# ---------------------------------------------------------------- settings and trtexec.sh


def test_fp32_settings_and_script(art):
    settings = resolve_build(art, trt_version=(10, 3))
    assert settings.onnx == "model.onnx" and settings.batch is None and settings.static_batch == 1
    args = trtexec_args(settings)
    assert args[:3] == ["--onnx=model.onnx", "--saveEngine=model.plan", "--memPoolSize=workspace:1024"]
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
    # FP16 on the DLA stays weakly typed on TensorRT 10: the FP16 flag places layers there
    assert "--fp16" in args and "--stronglyTyped" not in args and "--memPoolSize=workspace:256" in args
    assert settings.onnx == "model.onnx" and not settings.strongly_typed
    assert ["--useDLACore=1", "--allowGPUFallback"] == [a for a in args if "DLA" in a or "Fallback" in a]
    assert f"--timingCacheFile={cache}" in args and "--versionCompatible" in args
    assert "--builderOptimizationLevel=5" in args
    assert settings.to_dict()["gpu_fallback"] is True and settings.to_dict()["device"] == "orin-nx-16gb"
    # trtexec refuses to load a version-compatible plan unless the timing run says so too
    assert trtexec_timing_args(settings) == ["--loadEngine=model.plan", "--iterations=200", "--warmUp=500",
                                             "--useDLACore=1", "--versionCompatible"]
    # TensorRT 8.5 (Xavier NX's JetPack 5) has no optimisation-level flag
    older = resolve_build(art, "fp16", device="xavier-nx", trt_version=(8, 5))
    assert not any(a.startswith("--builderOptimizationLevel") for a in trtexec_args(older))


def test_the_script_targets_the_device_profiles_tensorrt(art):
    """An x86 host with TensorRT 11 writing for a JetPack 6 board: the script is for the board's 10.3."""
    settings = resolve_build(art, "fp16", device="orin-nx-16gb", dla_core=0, trt_version=(11, 4))
    assert settings.trt_version == (10, 3) and not settings.strongly_typed
    args = trtexec_args(settings)
    assert "--fp16" in args and "--useDLACore=0" in args and "Targets TensorRT 10.3" in trtexec_script(settings)
    assert "TensorRT 11.4 is installed here but device 'orin-nx-16gb' runs TensorRT 10.3" in settings.builder_blocked
    # the same TensorRT here as on the device: the Python builder may build (on that GPU)
    assert resolve_build(art, device="orin-nx-16gb", trt_version=(10, 3)).builder_blocked is None
    # "10.x" (x86-l4) takes any 10 minor installed here
    assert resolve_build(art, device="x86-l4", trt_version=(10, 16)).trt_version == (10, 16)
    assert "older than the 10.0 vitedge's Python builder needs" in resolve_build(
        art, device="xavier-nx", trt_version=(8, 5)).builder_blocked


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
    assert strong.strongly_typed and not {"--int8", "--fp16", "--stronglyTyped"} & set(trtexec_args(strong))
    assert "strongly typed" in trtexec_script(strong)


def test_fp16_is_strongly_typed_from_the_fp16_model_on_tensorrt_10(fp16_art):
    """The FP32 graph with the FP16 flag lets TensorRT rank token scores in FP16; the FP16 model keeps them FP32."""
    settings = resolve_build(fp16_art, "fp16", trt_version=(10, 3))
    assert settings.strongly_typed and settings.onnx == "model.fp16.onnx" and settings.precision_flags == ()
    args = trtexec_args(settings)
    assert args[0] == "--onnx=model.fp16.onnx" and "--stronglyTyped" in args and "--fp16" not in args
    assert settings.to_dict()["strongly_typed"] is True and settings.to_dict()["tensorrt_target"] == "10.3"
    # no strong typing before TensorRT 10: Xavier's 8.5 keeps the FP16 flag on the FP32 graph
    old = resolve_build(fp16_art, "fp16", device="xavier-nx", trt_version=(8, 5))
    assert not old.strongly_typed and old.onnx == "model.onnx" and "--fp16" in trtexec_args(old)
    (fp16_art / "model.fp16.onnx").unlink()
    with pytest.raises(VitedgeError, match=r"TensorRT 10.3 builds FP16 strongly typed .*model.fp16.onnx; run 'vitedge quantize' \(FP16\)"):
        resolve_build(fp16_art, "fp16", trt_version=(10, 3))


def test_int8_lint_rejects_non_zero_zero_points(art, fmnist_batch):
    """ONNX Runtime's default (asymmetric) activations: 'x_zero_point must be zero' in TensorRT's parser."""
    model = _asymmetric_qdq(art, fmnist_batch[0])
    bad = nonzero_zero_points(onnx.load(str(model)))
    assert bad
    with pytest.raises(VitedgeError, match=r"model.int8.onnx has \d+ of \d+ Q/DQ nodes with a non-zero zero-point"):
        _check_qdq(model)
    line = assert_clean_failure(run_cli("build", art, "--precision", "int8"))
    assert "TensorRT's ONNX parser takes symmetric INT8 only" in line and not (art / "trtexec.sh").exists()


def test_the_product_int8_model_is_symmetric(int8_artifact):
    model = onnx.load(str(int8_artifact / "model.int8.onnx"))
    assert nonzero_zero_points(model) == [] and _check_qdq(int8_artifact / "model.int8.onnx") > 10


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


def test_dynamic_resolution_gets_one_profile_over_its_size_range(castling_exports):
    """A castling graph for 16-40 px: the profile spans the sizes, combined with a dynamic batch."""
    out = castling_exports["resolution"]
    settings = resolve_build(out, trt_version=(10, 3))
    assert settings.sizes == (16, 28, 40) and settings.batch is None and settings.dynamic
    assert [a for a in trtexec_args(settings) if "Shapes=" in a] == [
        "--minShapes=images:1x1x16x16", "--optShapes=images:1x1x28x28", "--maxShapes=images:1x1x40x40"]
    assert "--shapes=images:1x1x28x28" in trtexec_script(settings)
    assert resolve_build(castling_exports["resolution+batch"], batch="1:2:8", trt_version=(10, 3)).to_dict()["profile"] == {
        "min": [1, 1, 16, 16], "opt": [2, 1, 28, 28], "max": [8, 1, 40, 40]}


def test_parse_batch():
    assert parse_batch("1:2:3") == (1, 2, 3) and parse_batch("4") == (4, 4, 4) and parse_batch((1, 1, 2)) == (1, 1, 2)
    for bad in ("0:1:2", "4:2:8", "1:2", "a:b:c", "", "1:2:3:4", "-1"):
        with pytest.raises(VitedgeError, match="--batch must be MIN:OPT:MAX"):
            parse_batch(bad)


# ---------------------------------------------------------------- trtexec's option grammar, per TensorRT version


GRAMMAR_FOR = {(8, 5): "8.5", (10, 3): "10.3", (10, 16): "10.16", (11, 4): "11.1"}  # 11.4 ← the newest 11.x read


def read_grammar(version: str) -> dict:
    """tests/data/trtexec/<version>.txt → {"options": {name: (kind, *params)}, "excludes": [...], "deprecated": set}."""
    grammar = {"options": {}, "excludes": [], "deprecated": set()}
    for line in (GRAMMARS / f"{version}.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, *rest = line.split()
        if name == "excludes":
            grammar["excludes"].append((rest[0], set(rest[1:])))
        elif name == "deprecated":
            grammar["deprecated"].update(rest)
        else:
            grammar["options"][name] = tuple(rest)
    return grammar


def _value_problem(kind: tuple, value: str | None) -> str | None:
    """Why ``value`` does not fit the option's value syntax, or None."""
    import re

    what = kind[0]
    if what == "switch":
        return None if value is None else "takes no value"
    if value is None or value == "":
        return "needs a value"
    if what == "file":
        return None
    if what == "int":
        low, _, high = kind[1].partition("..")
        if not re.fullmatch(r"\d+", value):
            return f"'{value}' is not an integer"
        ok = int(value) >= int(low) and (not high or int(value) <= int(high))
        return None if ok else f"{value} is outside {kind[1]}"
    if what == "one-of":
        return None if value in kind[1].split("|") else f"'{value}' is not one of {kind[1]}"
    if what == "shapes":
        ok = all(re.fullmatch(r"[^:,]+:[1-9]\d*(x[1-9]\d*)*", spec) for spec in value.split(","))
        return None if ok else f"'{value}' is not INPUT:DxD..."
    if what == "pools":
        pools, units = kind[1].split("|"), [u for u in kind[2].split("|") if u != "-"]
        bare = "-" in kind[2].split("|")
        for spec in value.split(","):
            pool, _, size = spec.partition(":")
            unit = size[-1:] if size[-1:].isalpha() else ""
            number = size[: len(size) - len(unit)]
            if pool not in pools or not re.fullmatch(r"\d+(\.\d+)?", number) or (unit and unit not in units) \
                    or (not unit and not bare):
                return f"'{spec}' is not POOL:SIZE for pools {kind[1]}, units {kind[2]}"
        return None
    raise AssertionError(f"unknown value kind {kind}")


def grammar_problems(args: list[str], grammar: dict) -> list[str]:
    """Each argument trtexec would refuse, drop or ignore under ``grammar``."""
    problems, given = [], set()
    for arg in args:
        if not arg.startswith("--"):
            problems.append(f"{arg}: not an option")
            continue
        name, equals, value = arg[2:].partition("=")
        given.add(name)
        if name not in grammar["options"]:
            problems.append(f"--{name}: unknown option")
        elif name in grammar["deprecated"]:
            problems.append(f"--{name}: deprecated, does nothing")
        else:
            problem = _value_problem(grammar["options"][name], value if equals else None)
            if problem:
                problems.append(f"--{name}: {problem}")
    for option, dropped in grammar["excludes"]:
        if option in given and dropped & given:
            problems.append(f"--{option} drops --{', --'.join(sorted(dropped & given))}")
    return problems


def test_the_grammar_check_rejects_what_trtexec_rejects():
    g103, g111, g85 = read_grammar("10.3"), read_grammar("11.1"), read_grammar("8.5")
    good = ["--onnx=model.onnx", "--memPoolSize=workspace:1024", "--minShapes=images:1x1x28x28",
            "--builderOptimizationLevel=3", "--profilingVerbosity=detailed", "--useDLACore=0", "--allowGPUFallback"]
    assert grammar_problems(good, g103) == []
    assert grammar_problems(["--memPoolSize=workspace:1024M"], g103) == []
    assert grammar_problems(["--memPoolSize=workspace:1024M"], g85) == [
        "--memPoolSize: 'workspace:1024M' is not POOL:SIZE for pools workspace|dlaSRAM|dlaLocalDRAM|dlaGlobalDRAM, units -"]
    assert grammar_problems(["--fp16", "--int8"], g111) == ["--fp16: unknown option", "--int8: unknown option"]
    assert grammar_problems(["--stronglyTyped"], g111) == ["--stronglyTyped: deprecated, does nothing"]
    assert grammar_problems(["--stronglyTyped", "--fp16"], g103) == ["--stronglyTyped drops --fp16"]
    assert grammar_problems(["--versionCompatible", "--builderOptimizationLevel=3"], g85) == [
        "--versionCompatible: unknown option", "--builderOptimizationLevel: unknown option"]
    assert grammar_problems(["--builderOptimizationLevel=6", "--useDLACore", "--shapes=images:0x1",
                             "--profilingVerbosity=verbose", "--fp16=1"], g103) == [
        "--builderOptimizationLevel: 6 is outside 0..5", "--useDLACore: needs a value",
        "--shapes: 'images:0x1' is not INPUT:DxD...", "--profilingVerbosity: 'verbose' is not one of "
        "layer_names_only|detailed|none", "--fp16: takes no value"]


@pytest.fixture(scope="module")
def shape_kinds(tmp_path_factory, int8_artifact, dynamic_artifact, castling_exports):
    """One artifact per input-shape kind, each with the FP16 and QDQ INT8 models of the EViT.

    The precision models are the static EViT's (resolve_build reads their presence and their
    Q/DQ zero-points, not their shapes), so the combinations below cost one quantization.
    """
    root = tmp_path_factory.mktemp("kinds")
    kinds = {"static": int8_artifact, "dynamic-batch": copy_artifact(dynamic_artifact, root / "dyn")}
    for name, out in castling_exports.items():
        kinds[name] = copy_artifact(out, root / name)
    for out in list(kinds.values())[1:]:
        for model in ("model.fp16.onnx", "model.int8.onnx"):
            (out / model).write_bytes((int8_artifact / model).read_bytes())
    return kinds


REFUSALS = ("the DLA runs FP16 and INT8 layers only", "has no DLA support", "the DLA takes one input shape",
            "version-compatible engines need TensorRT >= 8.6")


def test_every_command_line_the_cli_can_write_parses_in_its_trtexec(shape_kinds, tmp_path):
    """precision x batch x resolution x DLA x version-compatible x timing cache x target TensorRT."""
    import itertools

    cache = tmp_path / "timing.cache"
    grammars = {version: read_grammar(name) for version, name in GRAMMAR_FOR.items()}
    checked, refused = 0, collections.Counter()
    batches = {"static": [None], "resolution": [None], "dynamic-batch": [None, "2:4:16", "4"],
               "resolution+batch": [None, "1:2:8", "2"]}
    for version, precision, kind, dla, compatible, timing in itertools.product(
            GRAMMAR_FOR, ("fp32", "fp16", "int8", "best"), shape_kinds, (None, 1), (False, True), (None, cache)):
        for batch in batches[kind]:
            try:
                settings = resolve_build(shape_kinds[kind], precision, dla_core=dla, batch=batch,
                                         version_compatible=compatible, timing_cache=timing, trt_version=version)
            except VitedgeError as exc:
                reason = next((r for r in REFUSALS if r in str(exc)), None)
                assert reason, f"{version} {precision} {kind} {batch} dla={dla}: unexpected refusal {exc}"
                refused[reason] += 1
                continue
            build, timing_run = trtexec_args(settings), trtexec_timing_args(settings)
            where = f"TensorRT {version} {precision} {kind} batch={batch} dla={dla} vc={compatible} cache={timing}"
            assert grammar_problems(build, grammars[version]) == [], where
            assert grammar_problems(timing_run, grammars[version]) == [], where
            # the timing run loads what the build wrote
            assert ("--versionCompatible" in build) == ("--versionCompatible" in timing_run) == compatible, where
            assert [a for a in build if a.startswith("--useDLACore")] == [a for a in timing_run if a.startswith("--useDLACore")]
            weak = {"fp16": {"--fp16"}, "int8": {"--int8"}, "best": {"--fp16", "--int8"}}.get(precision, set())
            assert {a for a in build if a in ("--fp16", "--int8")} == (set() if settings.strongly_typed else weak), where
            if settings.dynamic:
                low, _, high = (a.split(":", 1)[1] for a in build if "Shapes=" in a)
                shapes = next(a for a in timing_run if a.startswith("--shapes=")).split(":", 1)[1]
                assert all(int(lo) <= int(s) <= int(hi) for lo, s, hi in
                           zip(low.split("x"), shapes.split("x"), high.split("x"))), where
            checked += 1
    assert checked > 200 and set(refused) == set(REFUSALS), (checked, refused)


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
    (["--device", "xavier-nx", "--version-compatible"], "version-compatible engines need TensorRT >= 8.6, this targets 8.5"),
    (["--precision", "fp8"], "Invalid value for '--precision'"),
])
def test_bad_settings_fail_in_one_line_and_write_nothing(art, args, message):
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
    with pytest.raises(VitedgeError, match="TensorRT 11.0 builds FP16 strongly typed .*/model.fp16.onnx"):
        resolve_build(art, "fp16", trt_version=(11, 0))


def test_dla_follows_the_tensorrt_versions_that_have_it(fp16_art):
    """10.7 was the last 10.x with DLA, 11.0-11.3 have none, 11.4 has it again (AGX Orin, JetPack 7.2)."""
    assert [v for v in ((8, 5), (10, 3), (10, 7), (10, 8), (10, 16), (11, 0), (11, 3), (11, 4), (11, 5))
            if dla_supported(v)] == [(8, 5), (10, 3), (10, 7), (11, 4), (11, 5)]
    for version in ((11, 0), (10, 8)):
        with pytest.raises(VitedgeError, match=rf"TensorRT {version[0]}.{version[1]} has no DLA support"):
            resolve_build(fp16_art, "fp16", dla_core=0, trt_version=version)
    agx = resolve_build(fp16_art, "fp16", dla_core=1, trt_version=(11, 4))
    assert agx.strongly_typed and agx.onnx == "model.fp16.onnx" and "--useDLACore=1" in trtexec_args(agx)


def test_dla_refuses_a_dynamic_profile(dynamic_artifact, tmp_path):
    """DLA engines need min = opt = max: a dynamic batch is refused unless pinned with --batch N."""
    before = folder_listing(dynamic_artifact)
    line = assert_clean_failure(run_cli("build", dynamic_artifact, "--precision", "fp16", "--dla-core", "0",
                                        "--batch", "1:2:8"))
    assert "the DLA takes one input shape (min = opt = max), but --batch is 1:2:8: pass --batch N" in line
    line = assert_clean_failure(run_cli("build", dynamic_artifact, "--precision", "fp16", "--dla-core", "0"))
    assert "but --batch is 1:1:8" in line
    assert folder_listing(dynamic_artifact) == before
    pinned = resolve_build(dynamic_artifact, "fp16", dla_core=0, batch="4", trt_version=(10, 3))
    assert [a for a in trtexec_args(pinned) if "Shapes=" in a] == [
        "--minShapes=images:4x1x28x28", "--optShapes=images:4x1x28x28", "--maxShapes=images:4x1x28x28"]


def test_dla_refuses_a_resolution_range(castling_exports, tmp_path):
    out = copy_artifact(castling_exports["resolution"], tmp_path / "castling")
    before = folder_listing(out)
    line = assert_clean_failure(run_cli("build", out, "--precision", "fp16", "--dla-core", "0"))
    assert "the graph takes sizes 16..40 px: re-export without --dynamic-resolution for --dla-core" in line
    assert folder_listing(out) == before


@no_trt
def test_a_device_older_than_the_python_builder_gets_only_trtexec_sh(art):
    """Xavier NX (TensorRT 8.5): one line, exit 6, the complete trtexec.sh for the board and nothing else."""
    metadata = (art / "vitedge.json").read_bytes()
    result = run_cli("build", art, "--device", "xavier-nx", "--precision", "fp16")
    line = assert_clean_failure(result)
    assert result.exit_code == 6
    assert line.startswith("vitedge: error: device 'xavier-nx' runs TensorRT 8.5, older than the 10.0") and "trtexec.sh" in line
    script = (art / "trtexec.sh").read_text()
    assert "Targets TensorRT 8.5" in script and "--fp16" in script and "--builderOptimizationLevel" not in script
    assert not (art / "model.plan").exists() and (art / "vitedge.json").read_bytes() == metadata


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
    assert "TensorRT is not installed here: install it with pip install 'vitedge[trt-cu12]' (driver >= 525)" in line
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
    # a version-compatible build: both commands carry --versionCompatible
    assert run_cli("build", art, "--version-compatible").exit_code == 6
    log.unlink()
    subprocess.run(["bash", str(script)], cwd=tmp_path, env={**os.environ, "TRTEXEC": str(recorder)}, check=True)
    build_call, time_call = (c.splitlines() for c in log.read_text().split("---\n")[:-1])
    assert "--versionCompatible" in build_call and time_call[-1] == "--versionCompatible"


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
    named = describe_parser_error(art / "model.onnx", "unsupported", -1, "my_node", "Det")
    assert named.startswith("TensorRT's ONNX parser rejects node 'my_node' (op Det)")
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
    assert summary["selection"] == {"FP32": 1}  # the TopK that ranks the token scores
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
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'vitedge[trt-cu12]' on a CUDA machine)")
    from vitedge.trt_runtime import gpu_info

    try:
        gpu_info()
    except VitedgeError as exc:
        pytest.skip(f"TensorRT is installed but no CUDA GPU is usable: {exc}")
    return trt


def test_tensorrt_fp32_and_fp16_builds(tensorrt, fp16_art, tmp_path):
    art = fp16_art
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
    assert "FP16" in half["layer_precisions"] and half["onnx"] == "model.fp16.onnx" and half["strongly_typed"]
    assert set(half["selection_precisions"]) <= {"FP32", "INT32", "INT64"}  # the token scores stay FP32


def test_tensorrt_int8_build_from_the_qdq_model(tensorrt, int8_artifact, tmp_path):
    art = copy_artifact(int8_artifact, tmp_path / "int8")
    engine = vitedge.build(art, "int8", log=quiet)  # symmetric QDQ from 'vitedge quantize': the parser takes it
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
    """A graph TensorRT cannot parse (Det: 'N' in onnx-tensorrt's operator table) → BuildFailed naming node and op."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Det", ["images"], ["det"], name="determinant")], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("det", TensorProto.FLOAT, [1, 1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(art / "model.onnx"))
    with pytest.raises(vitedge.BuildFailed, match="rejects node 'determinant' \\(op Det\\)"):
        vitedge.build(art, log=quiet)
    assert not (art / "model.plan").exists()
