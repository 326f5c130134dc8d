"""The hostile-input corpus: every command, fed what a careless or hostile user gives it.

Each case runs the real command in-process (click's CliRunner; a few through ``python -m
vitedge.cli``) and must end with the contract of docs/guarantees.md: a non-zero exit that
is not an internal error (70), no traceback, at most 5 lines of output ending in one
``vitedge: error:`` line, no file created or changed anywhere under the test's folder (no
staging folder, lock or temporary left, the previous artifact byte-for-byte intact) and no
pickled payload executed. The cases are generated from a few families of damage (random
and truncated bytes, bad UTF-8, deep nesting, wrong types per schema field, bad flag values,
missing files) crossed with the commands that read each file. The controls at the end must
succeed, so that the checks cannot pass by refusing everything.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support import HEADS, REPO, folder_listing, make_state_dict, run_cli

MODELS = REPO / "models"
MAX_LINES = 5
INTERNAL_ERROR = 70

# ---------------------------------------------------------------- the contract


def assert_refused(result, root: Path, before: dict, marker: Path | None = None) -> str:
    output = (result.stdout or "") + (result.stderr or "")
    assert isinstance(result.exception, SystemExit) or result.exception is None, f"uncaught {result.exception!r}"
    assert result.exit_code not in (0, INTERNAL_ERROR), output
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert 1 <= len(lines) <= MAX_LINES, output
    assert result.stderr.strip().splitlines()[-1].startswith("vitedge: error: "), output
    assert folder_listing(root) == before, sorted(set(folder_listing(root)) ^ set(before))
    if marker is not None:
        assert not marker.exists(), "a pickled payload ran"
    return lines[-1]


# ---------------------------------------------------------------- hostile files, built once


class Payload:
    """A pickle that would create a file when unpickled by anything but a weights-only loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _random(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _safetensors_bytes(state, metadata: dict | None) -> bytes:
    buffer = Path(os.environ.get("TMPDIR", "/tmp")) / f"vitedge-hostile-{os.getpid()}.safetensors"
    save_file(state, str(buffer), metadata=metadata)
    data = buffer.read_bytes()
    buffer.unlink()
    return data


def _state(edit=None):
    state = make_state_dict("evit", seed=11)
    if edit:
        edit(state)
    return state


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


def _meta(**fields):
    base = {"family": "evit", "arch": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10,
                                       "embed_dim": 64, "depth": 12, "num_heads": 2}}
    base.update(fields)
    return {"vitedge": json.dumps(base)}


def checkpoint_cases(marker: Path) -> dict[str, tuple[str, bytes]]:
    """name → (file suffix, bytes)."""
    good_pth = _torch_bytes({"model": _state()})
    good_st = (MODELS / "fmnist-evit.safetensors").read_bytes()
    cases: dict[str, tuple[str, bytes]] = {}
    for seed in range(12):
        cases[f"random-{seed}.pth"] = (".pth", _random(seed, 64 + 397 * seed))
    for seed in range(6):
        cases[f"random-{seed}.safetensors"] = (".safetensors", _random(100 + seed, 64 + 997 * seed))
    for fraction in (0.0, 0.01, 0.3, 0.6, 0.95):
        cases[f"truncated-{fraction}.pth"] = (".pth", good_pth[: int(len(good_pth) * fraction)])
        cases[f"truncated-{fraction}.safetensors"] = (".safetensors", good_st[: int(len(good_st) * fraction)])
    header_size = struct.unpack("<Q", good_st[:8])[0]
    cases["safetensors-header-claims-petabytes"] = (".safetensors", struct.pack("<Q", 1 << 50) + good_st[8:])
    cases["safetensors-header-bad-utf8"] = (".safetensors", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc" + good_st[8:])
    cases["safetensors-header-not-json"] = (".safetensors", struct.pack("<Q", header_size) + b"x" * header_size + good_st[8 + header_size:])
    cases["text.pth"] = (".pth", "family: evit\n".encode())
    cases["bad-utf8.pth"] = (".pth", b"\xff\xfe" * 100)
    cases["zip-of-garbage.pth"] = (".pth", _zip({"archive/data.pkl": _random(7, 300), "archive/version": b"3\n"}))
    cases["payload.pth"] = (".pth", pickle.dumps(Payload(marker)))
    cases["payload-in-zip.pth"] = (".pth", _zip({"archive/data.pkl": pickle.dumps(Payload(marker)), "archive/version": b"3\n"}))
    for name, obj in {"a-list": [1, 2, 3], "a-tensor": torch.zeros(3), "an-int": 5, "empty-dict": {},
                      "wrapper-of-a-string": {"model": "weights"}, "nested-non-tensors": {"model": {"a": [1], "b": "c"}},
                      "deep-dict": _nested_dict(200)}.items():
        cases[f"{name}.pth"] = (".pth", _torch_bytes(obj))
    damaged = {
        "nan-weight": lambda s: s["blocks.0.attn.qkv.weight"].__setitem__((0, 0), float("nan")),
        "inf-weight": lambda s: s["head.weight"].__setitem__((0, 0), float("inf")),
        "int-weights": _set("norm.weight", torch.ones(64, dtype=torch.int32)),
        "bool-weights": _set("pos_embed", torch.ones(1, 50, 64, dtype=torch.bool)),
        "wrong-shape": _set("head.weight", torch.zeros(10, 32)),
        "missing-key": lambda s: s.pop("blocks.5.mlp.fc1.weight"),
        "extra-key": _set("blocks.99.attn.qkv.weight", torch.zeros(3)),
        "zero-patch": _set("patch_embed.proj.weight", torch.zeros(64, 1, 0, 0)),
    }
    for name, edit in damaged.items():
        cases[f"{name}.pth"] = (".pth", _torch_bytes({"model": _state(edit)}))
    metadata = {
        "not-json": {"vitedge": "{family: evit"},
        "a-list": {"vitedge": "[1, 2]"},
        "deep": {"vitedge": _deep(5000)},
        "family-a-number": _meta(family=5),
        "arch-a-list": _meta(arch=[28, 4]),
        "arch-patch-0": _meta(arch={"img_size": 28, "patch_size": 0, "in_chans": 1, "embed_dim": 64, "depth": 12, "num_heads": 2}),
        "arch-unknown-key": _meta(arch={"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 12,
                                        "num_heads": 2, "wings": 2}),
        "arch-heads-string": _meta(arch={"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 12,
                                         "num_heads": "two"}),
        "mean-a-string": _meta(mean="0.5"),
        "std-zero": _meta(std=[0.0]),
        "settings-a-list": _meta(settings=[0.7]),
    }
    for name, meta in metadata.items():
        cases[f"meta-{name}.safetensors"] = (".safetensors", _safetensors_bytes(_state(), meta))
    return cases


def _nested_dict(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"model": value}
    return value


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


CHECKPOINT_COMMANDS = {
    "export": ["export", "{ckpt}", "-o", "{out}", "--family", "evit", "--num-heads", str(HEADS), "--validate-limit", "8"],
    "calibrate": ["calibrate", "{ckpt}", "-o", "{out}/budgets.json", "--limit", "8"],
    "tune": ["tune", "{ckpt}", "-o", "{out}", "--latency-budget-ms", "50", "--family", "evit", "--limit", "8",
             "--iterations", "2", "--warmup", "0"],
    "export-bundle": ["export-bundle", "{ckpt}", "-o", "{out}", "--validate-limit", "8", "--iterations", "2"],
}


@pytest.fixture(scope="module")
def hostile_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-checkpoints")
    marker = root.parent / f"{root.name}-payload-ran"
    for name, (suffix, data) in checkpoint_cases(marker).items():
        (root / (name if name.endswith(suffix) else name + suffix)).write_bytes(data)
    return root, marker


def _checkpoint_case_names() -> list[str]:
    names = checkpoint_cases(Path("/nonexistent/marker"))
    return [name if name.endswith(suffix) else name + suffix for name, (suffix, _) in names.items()]


CHECKPOINT_CASES = _checkpoint_case_names()


@pytest.mark.parametrize("command", list(CHECKPOINT_COMMANDS))
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_hostile_checkpoints(hostile_checkpoints, tmp_path, command, case):
    root, marker = hostile_checkpoints
    (tmp_path / "out").mkdir()  # for calibrate's output file; an export must leave it empty
    before = folder_listing(tmp_path)
    args = [a.format(ckpt=root / case, out=tmp_path / "out") for a in CHECKPOINT_COMMANDS[command]]
    assert_refused(run_cli(*args), tmp_path, before, marker)


# ---------------------------------------------------------------- hostile YAML: recipes, calibration sets, devices

_COMMON_YAML = {
    "bad-utf8": b"family: evit\nnum_heads: \xff\xfe\n",
    "deep-list": _deep(5000).encode(),
    "deep-mapping": ("a: " * 3000 + "1").encode(),
    "invalid": b"family: evit\n  keep_rate: [0.7\n",
    "a-list": b"- family\n- evit\n",
    "a-scalar": b"42\n",
    "python-tag": b"family: !!python/object/apply:os.system ['touch /tmp/vitedge-yaml-payload']\n",
    "tab-indent": b"family:\n\t- evit\n",
    "nul-bytes": b"family: evit\x00\x00\n",
    "alias-bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
                  b"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\nsettings: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
}

RECIPE_FIELDS = {
    "family-number": "family: 5", "arch-list": "arch: [1]", "heads-string": "num_heads: two", "heads-zero": "num_heads: 0",
    "img-size-zero": "img_size: 0", "img-size-float": "img_size: 28.5", "img-size-inf": "img_size: .inf",
    "img-size-huge": "img_size: 4000000", "opset-string": "opset: '18'", "opset-99": "opset: 99", "opset-16": "opset: 16",
    "batch-negative": "batch_size: -1", "batch-huge": "batch_size: 100000000", "dynamic-batch-string": "dynamic_batch: maybe",
    "settings-list": "settings: [1, 2]", "keep-rate-string": "keep_rate: high", "keep-rate-nan": "keep_rate: .nan",
    "keep-rate-zero": "keep_rate: 0", "validation-list": "validation: [1]",
    "threshold-nan": "validation: {thresholds: {min_top1_agreement: .nan}}",
    "threshold-string": "validation: {thresholds: {min_top1_agreement: high}}",
    "threshold-unknown": "validation: {thresholds: {min_top1: 0.9}}", "resolution-number": "dynamic_resolution: 5",
    "resolution-words": "dynamic_resolution: 'small:large'", "unknown-key": "keep_ratio: 0.7",
    "prune-blocks-strings": "settings: {prune_blocks: [a, b]}", "merge-count-float": "settings: {merge_count: 1.5}",
}


def _recipe_cases() -> dict[str, bytes]:
    cases = dict(_COMMON_YAML)
    for name, line in RECIPE_FIELDS.items():
        head = "" if line.startswith("family") else "family: evit\nnum_heads: 2\n"
        cases[f"field-{name}"] = f"{head}{line}\n".encode()
    return cases


RECIPE_CASES = _recipe_cases()


@pytest.mark.parametrize("command", ["export", "calibrate"])
@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_hostile_recipes(evit_ckpt, tmp_path, command, case):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(RECIPE_CASES[case])
    before = folder_listing(tmp_path)
    target = tmp_path / ("out" if command == "export" else "budgets.json")
    extra = ["--validate-limit", "8"] if command == "export" else ["--limit", "8"]
    result = run_cli(command, evit_ckpt, "-o", target, "--recipe", recipe, *extra)
    assert_refused(result, tmp_path, before)
    assert not Path("/tmp/vitedge-yaml-payload").exists()


CALIBRATION_FIELDS = {
    "source-number": "source: 5\npreprocess: {size: 28, channels: 1}", "source-unknown": "source: imagenet\npreprocess: {size: 28, channels: 1}",
    "preprocess-list": "source: fashion-mnist\npreprocess: [28, 1]", "size-zero": "source: fashion-mnist\npreprocess: {size: 0, channels: 1}",
    "size-string": "source: fashion-mnist\npreprocess: {size: big, channels: 1}", "channels-2": "source: fashion-mnist\npreprocess: {size: 28, channels: 2}",
    "count-negative": "source: fashion-mnist\ncount: -1\npreprocess: {size: 28, channels: 1}",
    "seed-string": "source: fashion-mnist\nseed: abc\npreprocess: {size: 28, channels: 1}",
    "split-list": "source: fashion-mnist\nsplit: [train]\npreprocess: {size: 28, channels: 1}",
    "images-string": "source: skimage\nimages: camera\npreprocess: {size: 28, channels: 1}",
    "folder-without-path": "source: image-folder\npreprocess: {size: 28, channels: 1}",
    "crops-zero": "source: fashion-mnist\ncrops_per_image: 0\npreprocess: {size: 28, channels: 1}",
    "size-mismatch": "source: fashion-mnist\npreprocess: {size: 32, channels: 1}",
    "unknown-key": "source: fashion-mnist\nfrobnicate: 1\npreprocess: {size: 28, channels: 1}",
}
CALIBRATION_CASES = {**_COMMON_YAML, **{f"field-{k}": (v + "\n").encode() for k, v in CALIBRATION_FIELDS.items()}}


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_hostile_calibration_sets(evit_artifact, tmp_path, case):
    art = shutil.copytree(evit_artifact, tmp_path / "art")
    calib = tmp_path / "calib.yaml"
    calib.write_bytes(CALIBRATION_CASES[case])
    before = folder_listing(tmp_path)
    assert_refused(run_cli("quantize", art, "--precision", "int8", "--calib", calib, "--no-validate"), tmp_path, before)


DEVICE_BASE = "name: board\ndescription: a board\nplatform: x86\nbackends: [ort]\nprecisions: [fp32]\n"
DEVICE_FIELDS = {
    "backends-number": "backends: 5", "backends-unknown": "backends: [tensorflow]", "backends-string": "backends: ort",
    "precisions-string": "precisions: fp16", "precisions-unknown": "precisions: [int4]", "budget-string": "latency_budget_ms: fast",
    "budget-zero": "latency_budget_ms: 0", "budget-negative": "latency_budget_ms: -5", "budget-nan": "latency_budget_ms: .nan",
    "budget-inf": "latency_budget_ms: .inf", "dla-negative": "dla_cores: -1", "dla-string": "dla_cores: two",
    "gpu-list": "gpu: [8.7]", "software-string": "software: tensorrt", "name-mismatch": "name: other",
}


def _device_cases() -> dict[str, bytes]:
    cases = dict(_COMMON_YAML)
    for name, line in DEVICE_FIELDS.items():
        key = line.split(":")[0]
        kept = "".join(f"{row}\n" for row in DEVICE_BASE.splitlines() if not row.startswith(key + ":"))
        cases[f"field-{name}"] = (kept + line + "\n").encode()
    cases["missing-required"] = b"name: board\n"
    return cases


DEVICE_CASES = _device_cases()


@pytest.mark.parametrize("command", ["devices", "profile"])
@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_hostile_device_profiles(evit_artifact, tmp_path, command, case):
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "board.yaml").write_bytes(DEVICE_CASES[case])
    art = shutil.copytree(evit_artifact, tmp_path / "art")
    before = folder_listing(tmp_path)
    args = ["devices", "--devices-dir", devices] if command == "devices" else [
        "profile", art, "--device", "board", "--devices-dir", devices, "--iterations", "2", "--warmup", "0"]
    assert_refused(run_cli(*args), tmp_path, before)


# ---------------------------------------------------------------- hostile artifacts: vitedge.json and model.onnx


def _edit(change):
    def apply(art: Path):
        meta = json.loads((art / "vitedge.json").read_text())
        change(meta)
        (art / "vitedge.json").write_text(json.dumps(meta))
    return apply


def _write(name: str, data: bytes):
    return lambda art: (art / name).write_bytes(data)


def _truncate(name: str, fraction: float):
    def apply(art: Path):
        data = (art / name).read_bytes()
        (art / name).write_bytes(data[: int(len(data) * fraction)])
    return apply


def _graph(change):
    def apply(art: Path):
        import onnx

        model = onnx.load(str(art / "model.onnx"))
        change(model)
        onnx.save(model, str(art / "model.onnx"))
    return apply


def _drop(*path):
    def change(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return _edit(change)


def _put(value, *path):
    def change(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return _edit(change)


ARTIFACT_DAMAGE = {
    "metadata-missing": lambda art: (art / "vitedge.json").unlink(),
    "metadata-random": _write("vitedge.json", _random(3, 500)),
    "metadata-bad-utf8": _write("vitedge.json", b'{"family": "\xff\xfe"}'),
    "metadata-not-json": _write("vitedge.json", b"{family: evit"),
    "metadata-deep": _write("vitedge.json", _deep(100_000).encode()),
    "metadata-a-list": _write("vitedge.json", b"[]"),
    "metadata-empty-object": _write("vitedge.json", b"{}"),
    "metadata-truncated": _truncate("vitedge.json", 0.5),
    "metadata-newer-schema": _put(99, "schema_version"),
    "metadata-schema-string": _put("1", "schema_version"),
    "metadata-a-bundle": _edit(lambda m: m.update(kind="bundle", variants="many")),
    "no-family": _drop("family"),
    "family-number": _put(3, "family"),
    "arch-list": _put([1, 2], "arch"),
    "patch-size-zero": _put(0, "arch", "patch_size"),
    "depth-string": _put("12", "arch", "depth"),
    "input-list": _put([], "input"),
    "input-shape-short": _put([1, 1, 28], "input", "shape"),
    "input-shape-string": _put([1, 1, "x", 28], "input", "shape"),
    "input-std-zero": _put([0], "input", "std"),
    "input-mean-strings": _put(["a"], "input", "mean"),
    "outputs-string": _put("logits", "outputs"),
    "outputs-empty": _put([], "outputs"),
    "opset-bool": _put(True, "opset"),
    "no-batch": _drop("input", "batch"),
    "no-token-budgets": _drop("token_budgets"),
    "blocks-not-a-list": _put({"0": 50}, "token_budgets", "tokens_per_block"),
    "selection-without-block": _edit(lambda m: m["token_budgets"]["selections"][0].pop("block")),
    "flops-string": _put("many", "flops", "static"),
    "model-outside": _put("../../model.onnx", "model"),
    "model-absolute": _put("/etc/passwd.onnx", "model"),
    "checkpoint-list": _put([], "checkpoint"),
    "thresholds-strings": _put({"min_top1_agreement": "high"}, "validation"),
    "quantized-list": _put([], "quantized"),
    "optimized-list": _put([], "optimized"),
    "optimized-written-string": _put({"ort": {"model": "model.ort.onnx", "written": "yes", "passes": {}}}, "optimized"),
    "optimized-model-outside": _put({"ort": {"model": "../model.ort.onnx", "written": True, "passes": {}}}, "optimized"),
    "mismatch-input-name": _put("pixels", "input", "name"),
    "mismatch-input-shape": _put([1, 1, 32, 32], "input", "shape"),
    "mismatch-outputs": _put(["logits"], "outputs"),
    "mismatch-opset": _put(17, "opset"),
    "model-missing": lambda art: (art / "model.onnx").unlink(),
    "model-random": _write("model.onnx", _random(9, 4096)),
    "model-empty": _write("model.onnx", b""),
    "model-truncated": _truncate("model.onnx", 0.5),
    "model-extra-input": _graph(lambda m: m.graph.input.append(__import__("onnx").helper.make_tensor_value_info(
        "extra", 1, [1]))),
    "model-renamed-output": _graph(lambda m: m.graph.output[0].__setattr__("name", "scores")),
}

NPY_GOOD = np.zeros((1, 1, 28, 28), np.float32)
ARTIFACT_COMMANDS = {
    "check": ["check", "{art}"],
    "inspect": ["inspect", "{art}"],
    "validate": ["validate", "{art}", "--limit", "4"],
    "profile": ["profile", "{art}", "--iterations", "2", "--warmup", "0"],
    "predict": ["predict", "{art}", "{npy}", "-o", "{root}/logits.npy"],
    "quantize": ["quantize", "{art}", "--precision", "fp16", "--no-validate"],
    "optimize": ["optimize", "{art}", "--no-validate", "--rounds", "1"],
    "build": ["build", "{art}"],
}


def _copy_with(evit_artifact, tmp_path, damage) -> tuple[Path, Path]:
    art = shutil.copytree(evit_artifact, tmp_path / "art")
    damage(art)
    npy = tmp_path / "images.npy"
    np.save(npy, NPY_GOOD)
    return art, npy


@pytest.mark.parametrize("command", list(ARTIFACT_COMMANDS))
@pytest.mark.parametrize("damage", list(ARTIFACT_DAMAGE))
def test_hostile_artifacts(evit_artifact, tmp_path, command, damage):
    art, npy = _copy_with(evit_artifact, tmp_path, ARTIFACT_DAMAGE[damage])
    before = folder_listing(tmp_path)
    args = [a.format(art=art, npy=npy, root=tmp_path) for a in ARTIFACT_COMMANDS[command]]
    assert_refused(run_cli(*args), tmp_path, before)


# ---------------------------------------------------------------- hostile arrays for predict


def _npy(header: dict, payload: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def _npy_bytes(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


NPY_CASES = {
    "random-bytes": _random(5, 1000),
    "empty": b"",
    "text": b"1 2 3\n",
    "magic-only": b"\x93NUMPY\x01\x00",
    "future-version": b"\x93NUMPY\x09\x00" + b"\x00" * 64,
    "header-petabytes": _npy({"descr": "<f4", "fortran_order": False, "shape": (10**8, 1, 28, 28)}, b"\x00" * 64),
    "header-truncated-data": _npy({"descr": "<f4", "fortran_order": False, "shape": (4, 1, 28, 28)}, b"\x00" * 100),
    "header-garbage": b"\x93NUMPY\x01\x00" + struct.pack("<H", 20) + b"{'descr': nonsense}\n",
    "header-bad-utf8": b"\x93NUMPY\x01\x00" + struct.pack("<H", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\n",
    "object-array": _npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True),
    "wrong-shape": _npy_bytes(np.zeros((1, 28, 28), np.float32)),
    "wrong-dtype": _npy_bytes(np.zeros((1, 1, 28, 28), np.float64)),
    "no-images": _npy_bytes(np.zeros((0, 1, 28, 28), np.float32)),
    "scalar": _npy_bytes(np.float32(1)),
    "structured": _npy_bytes(np.zeros((1, 1, 28, 28), dtype=[("a", "<f4"), ("b", "<i4")])),
    "strings": _npy_bytes(np.array(["a", "b"])),
    "npz-archive": _zip({"x.npy": _npy_bytes(NPY_GOOD)}),
}


@pytest.mark.parametrize("case", list(NPY_CASES))
def test_hostile_arrays(evit_artifact, tmp_path, case):
    art = shutil.copytree(evit_artifact, tmp_path / "art")
    (tmp_path / "in.npy").write_bytes(NPY_CASES[case])
    before = folder_listing(tmp_path)
    assert_refused(run_cli("predict", art, tmp_path / "in.npy", "-o", tmp_path / "out.npy"), tmp_path, before)


# ---------------------------------------------------------------- hostile budgets files (A-ViT) and bundles


def _budgets(**fields) -> bytes:
    base = {"kind": "vitedge-avit-budgets", "token_budgets": [50] * 12,
            "arch": {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 12, "num_heads": 2},
            "checkpoint": {"sha256": "0" * 64}, "settings": {"gate_scale": 10.0, "gate_center": 30.0}}
    base.update(fields)
    return json.dumps(base).encode()


BUDGET_CASES = {
    "random": _random(21, 300), "bad-utf8": b'{"kind": "\xff"}', "deep": _deep(50_000).encode(), "a-list": b"[1]",
    "not-a-budgets-file": b'{"kind": "something-else"}', "budgets-zero": _budgets(token_budgets=[0] * 12),
    "budgets-strings": _budgets(token_budgets=["a"] * 12), "budgets-empty": _budgets(token_budgets=[]),
    "arch-list": _budgets(arch=[12]), "arch-patch-zero": _budgets(arch={"img_size": 28, "patch_size": 0, "in_chans": 1,
                                                                       "embed_dim": 64, "depth": 12, "num_heads": 2}),
    "checkpoint-string": _budgets(checkpoint="x"), "gates-strings": _budgets(settings={"gate_scale": "ten"}),
    "other-checkpoint": _budgets(),
}


@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_hostile_budgets_files(tmp_path, case):
    budgets = tmp_path / "budgets.json"
    budgets.write_bytes(BUDGET_CASES[case])
    before = folder_listing(tmp_path)
    result = run_cli("export", MODELS / "fmnist-avit.safetensors", "-o", tmp_path / "out", "--budgets", budgets, "--no-validate")
    assert_refused(result, tmp_path, before)


def _bundle(**fields) -> bytes:
    base = {"schema_version": 1, "kind": "bundle", "devices": ["cpu"], "input": {"batch": 1},
            "variants": [{"name": "28px-keep1", "path": "28px-keep1", "accuracy": 0.8, "flops": {"static": 1, "ratio": 1},
                          "latency_ms": {"cpu": {"p50_ms": 1.0}}}]}
    base.update(fields)
    return json.dumps(base).encode()


BUNDLE_CASES = {
    "missing": None, "random": _random(31, 300), "bad-utf8": b'{"kind": "\xff"}', "deep": _deep(50_000).encode(),
    "a-list": b"[]", "single-artifact": b'{"kind": "artifact"}', "newer-schema": _bundle(schema_version=7),
    "variants-dict": _bundle(variants={"a": 1}), "input-missing": b'{"kind": "bundle", "variants": []}',
    "batch-zero": _bundle(input={"batch": 0}), "variant-a-string": _bundle(variants=["28px"]),
    "variant-path-outside": _bundle(variants=[{"name": "x", "flops": {"static": 1}, "path": "../x", "latency_ms": {"cpu": {"p50_ms": 1}}}]),
    "latency-string": _bundle(variants=[{"name": "x", "flops": {"static": 1}, "path": "x", "latency_ms": {"cpu": {"p50_ms": "fast"}}}]),
    "latency-list": _bundle(variants=[{"name": "x", "flops": {"static": 1}, "path": "x", "latency_ms": [1]}]),
    "accuracy-string": _bundle(variants=[{"name": "x", "flops": {"static": 1}, "path": "x", "accuracy": "high", "latency_ms": {"cpu": {"p50_ms": 1}}}]),
    "devices-string": _bundle(devices="cpu"),
    "variant-folder-missing": _bundle(),
}


@pytest.mark.parametrize("command", ["select", "profile-bundle"])
@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_hostile_bundles(tmp_path, command, case):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if BUNDLE_CASES[case] is not None:
        (bundle / "vitedge.json").write_bytes(BUNDLE_CASES[case])
    before = folder_listing(tmp_path)
    args = ["select", bundle, "--latency-ms", "5"] if command == "select" else ["profile-bundle", bundle, "--iterations", "2"]
    if case == "variant-folder-missing" and command == "select":
        pytest.skip("select reads only vitedge.json; the variant folder is checked where it is used")
    assert_refused(run_cli(*args), tmp_path, before)


# ---------------------------------------------------------------- bad flag values and missing files

FLAG_CASES = {
    "export img-size 0": ["export", "{ckpt}", "-o", "{out}", "--img-size", "0"],
    "export img-size negative": ["export", "{ckpt}", "-o", "{out}", "--img-size", "-28"],
    "export img-size huge": ["export", "{ckpt}", "-o", "{out}", "--img-size", "4000000"],
    "export num-heads 0": ["export", "{ckpt}", "-o", "{out}", "--num-heads", "0"],
    "export num-heads 3": ["export", "{ckpt}", "-o", "{out}", "--num-heads", "3"],
    "export opset 99": ["export", "{ckpt}", "-o", "{out}", "--opset", "99"],
    "export opset 16": ["export", "{ckpt}", "-o", "{out}", "--opset", "16"],
    "export opset -1": ["export", "{ckpt}", "-o", "{out}", "--opset", "-1"],
    "export batch 0": ["export", "{ckpt}", "-o", "{out}", "--batch-size", "0"],
    "export batch huge": ["export", "{ckpt}", "-o", "{out}", "--batch-size", "1000000000"],
    "export keep-rate nan": ["export", "{ckpt}", "-o", "{out}", "--keep-rate", "nan"],
    "export keep-rate inf": ["export", "{ckpt}", "-o", "{out}", "--keep-rate", "inf"],
    "export keep-rate word": ["export", "{ckpt}", "-o", "{out}", "--keep-rate", "most"],
    "export quantile nan": ["export", "{ckpt}", "-o", "{out}", "--quantile", "nan"],
    "export resolution words": ["export", "{ckpt}", "-o", "{out}", "--dynamic-resolution", "a:b"],
    "export resolution reversed": ["export", "{ckpt}", "-o", "{out}", "--dynamic-resolution", "56:28"],
    "export validate-limit 0": ["export", "{ckpt}", "-o", "{out}", "--validate-limit", "0"],
    "export data missing": ["export", "{ckpt}", "-o", "{out}", "--validate-data", "{root}/no-such-folder"],
    "export missing checkpoint": ["export", "{root}/none.pth", "-o", "{out}"],
    "export checkpoint is a folder": ["export", "{root}", "-o", "{out}"],
    "export output is a file": ["export", "{ckpt}", "-o", "{root}/a-file"],
    "export recipe missing": ["export", "{ckpt}", "-o", "{out}", "--recipe", "{root}/none.yaml"],
    "export budgets missing": ["export", "{ckpt}", "-o", "{out}", "--budgets", "{root}/none.json"],
    "export unknown family": ["export", "{ckpt}", "-o", "{out}", "--family", "resnet"],
    "export unknown arch": ["export", "{ckpt}", "-o", "{out}", "--arch", "vit_huge"],
    "validate threshold nan": ["validate", "{art}", "--min-top1-agreement", "nan"],
    "validate logit diff inf": ["validate", "{art}", "--max-abs-logit-diff", "inf"],
    "validate batch 0": ["validate", "{art}", "--batch-size", "0"],
    "validate batch huge": ["validate", "{art}", "--batch-size", "1000000000", "--limit", "4"],
    "validate limit 0": ["validate", "{art}", "--limit", "0"],
    "validate img-size other": ["validate", "{art}", "--img-size", "32"],
    "validate accuracy drop nan": ["validate", "{art}", "--precision", "fp16", "--max-accuracy-drop", "nan"],
    "validate checkpoint missing": ["validate", "{art}", "--checkpoint", "{root}/none.pth", "--limit", "4"],
    "validate data missing": ["validate", "{art}", "--data", "{root}/no-such-folder"],
    "profile budget nan": ["profile", "{art}", "--latency-budget-ms", "nan"],
    "profile budget -1": ["profile", "{art}", "--latency-budget-ms", "-1"],
    "profile batch 0": ["profile", "{art}", "--batch", "0"],
    "profile threads 0": ["profile", "{art}", "--threads", "0"],
    "profile backend cuda": ["profile", "{art}", "--backend", "cuda"],
    "profile unknown device": ["profile", "{art}", "--device", "toaster"],
    "profile devices-dir missing": ["profile", "{art}", "--device", "x86-cpu", "--devices-dir", "{root}/none"],
    "profile int8 missing": ["profile", "{art}", "--precision", "int8"],
    "check int8 missing": ["check", "{art}", "--precision", "int8"],
    "quantize unknown calib": ["quantize", "{art}", "--precision", "int8", "--calib", "no-such-set"],
    "quantize exclude matches nothing": ["quantize", "{art}", "--precision", "fp16", "--exclude", "NoSuchOp*", "--no-validate"],
    "quantize precision fp64": ["quantize", "{art}", "--precision", "fp64"],
    "build unknown device": ["build", "{art}", "--device", "toaster"],
    "build batch words": ["build", "{art}", "--batch", "a:b:c"],
    "tune budget nan": ["tune", "{ckpt}", "-o", "{out}", "--latency-budget-ms", "nan"],
    "tune budget inf": ["tune", "{ckpt}", "-o", "{out}", "--latency-budget-ms", "inf"],
    "tune keep-rates nan": ["tune", "{ckpt}", "-o", "{out}", "--latency-budget-ms", "5", "--keep-rates", "0.5,nan"],
    "tune keep-rates words": ["tune", "{ckpt}", "-o", "{out}", "--latency-budget-ms", "5", "--keep-rates", "half"],
    "tune both knobs": ["tune", "{ckpt}", "-o", "{out}", "--latency-budget-ms", "5", "--keep-rates", "0.5", "--quantiles", "0.9"],
    "select budget nan": ["select", "{root}", "--latency-ms", "nan"],
    "select budget 0": ["select", "{root}", "--latency-ms", "0"],
    "calibrate quantile nan": ["calibrate", "{ckpt}", "-o", "{root}/b.json", "--quantile", "nan"],
    "calibrate flops-ratio inf": ["calibrate", "{ckpt}", "-o", "{root}/b.json", "--flops-ratio", "inf"],
    "calibrate output folder missing": ["calibrate", "{ckpt}", "-o", "{root}/none/b.json"],
    "bundle sizes words": ["export-bundle", "{ckpt}", "-o", "{out}", "--sizes", "big"],
    "bundle keep-rates nan": ["export-bundle", "{ckpt}", "-o", "{out}", "--keep-rates", "nan"],
    "predict input missing": ["predict", "{art}", "{root}/none.npy", "-o", "{root}/o.npy"],
    "predict output folder missing": ["predict", "{art}", "{root}/in.npy", "-o", "{root}/none/o.npy"],
    "inspect not an artifact": ["inspect", "{root}"],
    "devices folder missing": ["devices", "--devices-dir", "{root}/none"],
    "unknown command": ["frobnicate"],
    "unknown option": ["export", "{ckpt}", "-o", "{out}", "--turbo"],
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag_values(evit_artifact, tmp_path, case):
    art = shutil.copytree(evit_artifact, tmp_path / "art")
    (tmp_path / "a-file").write_text("x")
    np.save(tmp_path / "in.npy", NPY_GOOD)
    before = folder_listing(tmp_path)
    fill = {"ckpt": MODELS / "fmnist-evit.safetensors", "out": tmp_path / "out", "art": art, "root": tmp_path}
    args = [a.format(**{k: str(v) for k, v in fill.items()}) for a in FLAG_CASES[case]]
    assert_refused(run_cli(*args), tmp_path, before)


# ---------------------------------------------------------------- through the real process


@pytest.mark.parametrize("case", ["random-3.pth", "payload.pth", "meta-deep.safetensors", "bool-weights.pth"])
def test_hostile_checkpoints_in_a_real_process(hostile_checkpoints, tmp_path, case):
    root, marker = hostile_checkpoints
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VITEDGE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "vitedge.cli", "export", str(root / case), "-o", str(tmp_path / "out"),
                           "--family", "evit", "--num-heads", str(HEADS)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len((proc.stdout + proc.stderr).strip().splitlines()) <= MAX_LINES
    assert proc.stderr.strip().splitlines()[-1].startswith("vitedge: error: cannot read checkpoint") or \
        "weights" in proc.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == [] and not marker.exists()


# ---------------------------------------------------------------- controls: what must still work


def test_controls_succeed(evit_artifact, evit_ckpt, tmp_path):
    art = shutil.copytree(evit_artifact, tmp_path / "art")
    meta = json.loads((art / "vitedge.json").read_text())
    meta["input"]["vendor_notes"] = {"resize": 28}  # another tool's section
    (art / "vitedge.json").write_text(json.dumps(meta))
    (art / "report.json").write_bytes(b"\xff not a report")  # unreadable report: regenerated, not fatal
    np.save(tmp_path / "in.npy", NPY_GOOD)
    for args in (["check", art], ["inspect", art], ["validate", art, "--limit", "4"],
                 ["predict", art, tmp_path / "in.npy", "-o", tmp_path / "out.npy"],
                 ["profile", art, "--iterations", "2", "--warmup", "0"], ["devices"], ["families"]):
        result = run_cli(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "Traceback" not in result.output
    assert json.loads((art / "report.json").read_text())["check"]["passed"] is True
    (tmp_path / "recipe.yaml").write_text("family: evit\nnum_heads: 2\nkeep_rate: 0.5\n")
    result = run_cli("export", evit_ckpt, "-o", tmp_path / "fresh", "--recipe", tmp_path / "recipe.yaml", "--no-validate")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["model.onnx", "report.json", "report.md", "vitedge.json"]


def test_the_corpus_is_large_enough():
    """docs/guarantees.md states the count; this is where it comes from."""
    counts = {
        "checkpoints": len(CHECKPOINT_CASES) * len(CHECKPOINT_COMMANDS),
        "recipes": len(RECIPE_CASES) * 2,
        "calibration sets": len(CALIBRATION_CASES),
        "device profiles": len(DEVICE_CASES) * 2,
        "artifacts": len(ARTIFACT_DAMAGE) * len(ARTIFACT_COMMANDS),
        "arrays": len(NPY_CASES),
        "budgets": len(BUDGET_CASES),
        "bundles": len(BUNDLE_CASES) * 2 - 1,
        "flags": len(FLAG_CASES),
        "real process": 4,
    }
    total = sum(counts.values())
    assert total >= 300, counts
    stated = re.search(r"(\d+) cases:", (REPO / "docs" / "guarantees.md").read_text())
    assert stated and int(stated.group(1)) == total, (total, counts)
