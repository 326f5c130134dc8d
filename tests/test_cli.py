"""The ``vitedge`` command: results on stdout, progress on stderr, and one clean line per bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import click
import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from support import HEADS, assert_clean_failure, copy_artifact, folder_listing, make_state_dict, read_json, run_cli

import vitedge
from vitedge import cli
from vitedge.cli import OneLineErrors, friendly
from vitedge.errors import VitedgeError

# ---------------------------------------------------------------- commands that work


def test_export_prints_a_json_summary_and_no_traceback(dynamicvit_export):
    outdir, result = dynamicvit_export
    summary = json.loads(result.stdout)
    assert summary["outdir"] == str(outdir) and summary["check"] is True
    assert summary["top1_agreement"] == 1.0
    assert summary["kept_agreement"] == {"kept_tokens_3": 1.0, "kept_tokens_6": 1.0, "kept_tokens_9": 1.0}
    assert result.stderr.startswith("[1/4] loading ")
    assert "[4/4] validating on fashion-mnist (128 images)" in result.stderr
    assert "Traceback" not in result.stderr and "vitedge: error" not in result.stderr


def test_version_and_families():
    assert run_cli("--version").stdout.strip() == f"vitedge, version {vitedge.__version__}"
    lines = run_cli("families").stdout.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert names == sorted(names) == vitedge.available_families()
    assert {"deit", "dynamicvit", "evit"} <= set(names)
    # Each family's settings follow it, with type, range, default, help and flags (from its schema).
    evit = lines[lines.index(next(line for line in lines if line.startswith("evit "))) + 1:]
    keep = next(line for line in evit if line.split()[0] == "keep_rate")
    assert "a number or a list of numbers in (0, 1], default 0.7" in keep and "--keep-rate" in keep


def test_inspect_json(evit_artifact):
    result = run_cli("inspect", evit_artifact, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "evit"
    budgets = info["token_budgets"]
    assert [s["tokens_after"] for s in budgets["selections"]] == [37, 28, 21]
    assert len(budgets["tokens_per_block"]) == 12
    assert budgets["tokens_per_block"][3] == {"attention": 50, "mlp": 37}
    assert 0 < info["flops"]["ratio"] < 1 and info["flops"]["static"] < info["flops"]["dense"]
    assert info["ops"]["TopK"] == 3 and info["ops"]["Softmax"] == 12
    assert "NonZero" not in info["ops"]
    assert info["report"] == {"check": True, "validate": True}
    assert vitedge.inspect(evit_artifact) == info


def test_inspect_text(dynamicvit_artifact):
    result = run_cli("inspect", dynamicvit_artifact)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "family: dynamicvit" in out
    assert "tokens per block (attention/mlp): 50/50 50/50 50/50 35/35" in out
    assert "block 3: keep 34 patch tokens -> 35 tokens" in out
    assert "TopK 3" in out and "report: check passed, validate passed" in out


def _ort_logits(model_path, images):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], {"images": image[None]})[0] for image in images])


def test_predict_api_equals_the_onnx_runtime_session(artifact, fmnist_batch):
    images = fmnist_batch[0][:7]
    logits = vitedge.predict(artifact, images)
    assert logits.shape == (7, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, _ort_logits(artifact / "model.onnx", images))


def test_predict_cli_round_trip(evit_artifact, fmnist_batch, tmp_path):
    images = fmnist_batch[0][:5]
    np.save(tmp_path / "in.npy", images)
    result = run_cli("predict", evit_artifact, tmp_path / "in.npy", "-o", tmp_path / "out.npy")
    assert result.exit_code == 0, result.output
    logits = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(logits, _ort_logits(evit_artifact / "model.onnx", images))
    summary = json.loads(result.stdout)
    assert summary["shape"] == [5, 10] and summary["top1"] == logits.argmax(1).tolist()
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "out.npy"]  # no temporary left by the atomic write


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 28, 28), np.float32), r"input has shape \[2, 28, 28\]; this model takes \[N, 1, 28, 28\]"),
    (np.zeros((2, 3, 28, 28), np.float32), r"this model takes \[N, 1, 28, 28\]"),
    (np.zeros((2, 1, 32, 32), np.float32), r"input has shape \[2, 1, 32, 32\]"),
    (np.zeros((2, 1, 28, 28), np.float64), "input dtype is float64; this model takes float32"),
    (np.zeros((2, 1, 28, 28), np.uint8), "input dtype is uint8"),
    (np.zeros((0, 1, 28, 28), np.float32), "input holds no images"),
])
def test_predict_rejects_wrong_shapes_and_dtypes(evit_artifact, images, message):
    with pytest.raises(VitedgeError, match=message):
        vitedge.predict(evit_artifact, images)


def test_predict_cli_bad_inputs(evit_artifact, tmp_path):
    np.save(tmp_path / "grey.npy", np.zeros((1, 28, 28), np.float32))
    (tmp_path / "text.npy").write_text("1 2 3")
    np.save(tmp_path / "ok.npy", np.zeros((1, 1, 28, 28), np.float32))
    cases = [
        (tmp_path / "missing.npy", tmp_path / "o.npy", "input file not found"),
        (tmp_path / "text.npy", tmp_path / "o.npy", "is not a .npy array"),
        (tmp_path / "grey.npy", tmp_path / "o.npy", "input has shape"),
        (tmp_path / "ok.npy", tmp_path / "nodir" / "o.npy", "output folder .* does not exist"),
    ]
    for src, dst, message in cases:
        result = run_cli("predict", evit_artifact, src, "-o", dst)
        line = assert_clean_failure(result)
        assert re.search(message, line), line
    assert not (tmp_path / "o.npy").exists()


# ---------------------------------------------------------------- bad input: one clean line, nothing written


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "random.pth").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    (root / "random.safetensors").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))
    (root / "a-file").write_text("not a folder")
    (root / "broken.yaml").write_text("family: evit\n  keep_rate: [0.7\n")
    (root / "unknown-key.yaml").write_text("family: evit\nkeep_ratio: 0.7\n")
    (root / "bad-validation.yaml").write_text("family: evit\nvalidation:\n  thresholds:\n    min_top1: 0.9\n")
    (root / "mistyped.yaml").write_text("family: evit\nimg_size: big\n")
    torch.save({"model": make_state_dict("evit", seed=5)}, root / "evit.pth")
    return root


def _bad_cases():
    h = ["--num-heads", str(HEADS)]
    return {
        "missing checkpoint": (["{root}/nope.pth", "--family", "evit"], "checkpoint not found"),
        "random bytes .pth": (["{root}/random.pth", "--family", "evit"], "cannot read checkpoint"),
        "random bytes .safetensors": (["{root}/random.safetensors", "--family", "evit"], "cannot read checkpoint"),
        "dynamicvit checkpoint as evit": (["{dyn}", "--family", "evit", *h], "look like family 'dynamicvit'"),
        "shape mismatch deit_tiny": (["{evit}", "--family", "evit", "--arch", "deit_tiny"], "does not match arch"),
        "unknown arch": (["{evit}", "--family", "evit", "--arch", "deit_huge"], "unknown arch"),
        "unknown family": (["{evit}", "--family", "vit-nope", *h], "unknown family 'vit-nope'"),
        "no family": (["{evit}", *h], "does not say its family"),
        "keep rate 0": (["{evit}", "--family", "evit", "--keep-rate", "0", *h], r"keep rate must be in \(0, 1\]"),
        "keep rate 1.5": (["{evit}", "--family", "evit", "--keep-rate", "1.5", *h], r"keep rate must be in \(0, 1\], got 1.5"),
        "keep rate -1": (["{evit}", "--family", "evit", "--keep-rate", "-1", *h], r"keep rate must be in \(0, 1\], got -1"),
        "dynamicvit keep rate 0": (["{dyn}", "--family", "dynamicvit", "--keep-rate", "0", *h], "keep rate must be in"),
        "img size 30": (["{evit}", "--family", "evit", "--img-size", "30", *h], "not a positive multiple of the patch size 4"),
        "output under a file": (["{evit}", "--family", "evit", *h, "-o", "{root}/a-file/out"], "cannot write to output folder"),
        "broken recipe": (["{evit}", "--recipe", "{root}/broken.yaml", *h], "is not valid YAML"),
        "unknown recipe key": (["{evit}", "--recipe", "{root}/unknown-key.yaml", *h], r"unknown key\(s\) keep_ratio"),
        "missing recipe": (["{evit}", "--recipe", "{root}/nope.yaml", *h], "recipe not found"),
        "bad threshold in recipe": (["{evit}", "--recipe", "{root}/bad-validation.yaml", *h], "unknown validation threshold"),
        "mistyped recipe value": (["{evit}", "--recipe", "{root}/mistyped.yaml", *h], "'img_size' must be an integer"),
        "opset 16": (["{evit}", "--family", "evit", "--opset", "16", *h], "opset 16 is too old"),
        "batch size 0": (["{evit}", "--family", "evit", "--batch-size", "0", *h], "batch size must be >= 1"),
        "--set unknown name": (["{evit}", "--family", "evit", "--set", "keep_ratio=0.7", *h],
                               "Invalid value for '--set': unknown setting 'keep_ratio'; the families' settings are:"),
        "--set wrong type": (["{evit}", "--family", "evit", "--set", "fuse_token=maybe", *h],
                             "fuse_token must be true or false, got 'maybe'"),
        "--set list item": (["{evit}", "--family", "evit", "--set", "prune_blocks=3,six", *h],
                            "prune_blocks must be a list of whole numbers >= 0, got 'six'"),
        "--set out of range": (["{evit}", "--family", "evit", "--set", "keep_rate=0", *h], r"keep rate must be in \(0, 1\]"),
        "--set without a value": (["{evit}", "--family", "evit", "--set", "keep_rate", *h], "--set takes NAME=VALUE"),
        "--set another family's": (["{evit}", "--family", "evit", "--set", "merge_count=4", *h],
                                   "family 'evit' has no setting merge_count; its settings: fuse_token, keep_rate"),
        "--set and its alias": (["{evit}", "--family", "evit", "--set", "keep_rate=0.5", "--keep-rate", "0.7", *h],
                                "keep_rate is given twice"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_export_bad_input(case, bad_inputs, dynamicvit_ckpt, tmp_path):
    args, message = _bad_cases()[case]
    fill = {"root": str(bad_inputs), "dyn": str(dynamicvit_ckpt), "evit": str(bad_inputs / "evit.pth")}
    args = [a.format(**fill) for a in args]
    outdir = tmp_path / "out"
    if "-o" not in args:
        args += ["-o", str(outdir)]
    result = run_cli("export", *args)
    line = assert_clean_failure(result, outdir)
    assert re.search(message, line), line
    assert result.exit_code == 2
    assert not any(p.name.startswith(".vitedge-stage-") for p in tmp_path.rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] == []  # OUTDIR absent, nothing else created
    assert sorted(p.name for p in bad_inputs.iterdir()) == [
        "a-file", "bad-validation.yaml", "broken.yaml", "evit.pth", "mistyped.yaml", "random.pth", "random.safetensors",
        "unknown-key.yaml"]


def test_set_gives_any_setting_typed_by_the_schema(evit_ckpt, tmp_path):
    """--set for a setting without a flag of its own, a list among them; repeated --set add up."""
    out = tmp_path / "set"
    result = run_cli("export", evit_ckpt, "-o", out, "--family", "evit", "--num-heads", HEADS, "--set", "prune_blocks=2,5,8",
                     "--set", "keep_rate=0.5,0.6,0.7", "--set", "fuse_token=false", "--validate-limit", "16")
    assert result.exit_code == 0, result.output
    meta = read_json(out / "vitedge.json")
    assert meta["settings"] == {"keep_rate": [0.5, 0.6, 0.7], "prune_blocks": [2, 5, 8], "fuse_token": False}
    assert [s["block"] for s in meta["token_budgets"]["selections"]] == [2, 5, 8]


def test_failed_export_leaves_a_good_outdir_unchanged(evit_artifact, evit_ckpt, tmp_path):
    outdir = copy_artifact(evit_artifact, tmp_path / "out")
    before = folder_listing(outdir)
    for bad in (["--opset", "16"], ["--batch-size", "0"], ["--keep-rate", "1.5"], ["--img-size", "30"]):
        result = run_cli("export", evit_ckpt, "-o", outdir, "--family", "evit", "--num-heads", str(HEADS), *bad)
        assert_clean_failure(result)
        assert folder_listing(outdir) == before, bad


def test_validation_failure_exits_3_and_keeps_the_attempt_beside_outdir(evit_ckpt, tmp_path):
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("family: evit\nnum_heads: 2\nvalidation:\n  thresholds:\n    max_abs_logit_diff: 0.0\n")
    outdir = tmp_path / "out"
    result = run_cli("export", evit_ckpt, "-o", outdir, "--recipe", recipe, "--validate-limit", "16")
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("vitedge: error:")]
    assert len(errors) == 1 and "validation failed on fashion-mnist: max |logit diff|" in errors[0]
    assert "Traceback" not in result.output
    # OUTDIR is not written; the failed attempt, with its report saying why, lies beside it.
    failed = tmp_path / "out.failed"
    assert f"{outdir} was not written, the failed attempt is in {failed}" in errors[0]
    assert not outdir.exists()
    assert sorted(os.listdir(failed)) == ["model.onnx", "report.json", "report.md", "vitedge.json"]
    assert read_json(failed / "report.json")["validate"]["passed"] is False


def test_a_re_export_that_fails_validation_keeps_the_previous_artifact(evit_artifact, evit_ckpt, tmp_path):
    outdir = copy_artifact(evit_artifact, tmp_path / "out")
    before = folder_listing(outdir)
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("family: evit\nnum_heads: 2\nvalidation:\n  thresholds:\n    max_abs_logit_diff: 0.0\n")
    for attempt in range(2):  # a second failure replaces the first failed attempt
        result = run_cli("export", evit_ckpt, "-o", outdir, "--recipe", recipe, "--validate-limit", "8")
        assert result.exit_code == 3
        assert f"{outdir} is unchanged, the failed attempt is in {tmp_path / 'out.failed'}" in assert_clean_failure(result)
        assert folder_listing(outdir) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.failed", "strict.yaml"]
        assert read_json(tmp_path / "out.failed" / "report.json")["validate"]["passed"] is False


@pytest.mark.parametrize("command", [["validate"], ["profile"], ["inspect"], ["check"], ["predict", "x.npy", "-o", "y.npy"]])
def test_commands_on_a_folder_that_is_not_an_artifact(command, tmp_path):
    args = [command[0], tmp_path, *command[1:]]
    if command[0] == "predict":
        np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
        args = ["predict", tmp_path, tmp_path / "x.npy", "-o", tmp_path / "y.npy"]
    line = assert_clean_failure(run_cli(*args))
    assert "is not a vitedge artifact folder" in line


@pytest.mark.parametrize("args, message", [
    (["validate", "{art}", "--batch-size", "0", "--limit", "4"], "batch size and threads must be >= 1"),
    (["profile", "{art}", "--backend", "torch", "--threads", "0"], "threads must be >= 1"),
    (["profile", "{art}", "--batch", "0"], "batch must be >= 1"),
    (["validate", "{art}", "--limit", "0"], "image limit must be positive"),
    (["validate", "{art}", "--data", "{empty}"], "no images"),
])
def test_stage_commands_bad_numbers(evit_artifact, tmp_path, args, message):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    (tmp_path / "empty").mkdir()
    before = folder_listing(art)
    result = run_cli(*[a.format(art=art, empty=tmp_path / "empty") for a in args])
    assert message in assert_clean_failure(result)
    assert folder_listing(art) == before


def test_validate_cli(evit_artifact, other_evit_ckpt, tmp_path):
    art = copy_artifact(evit_artifact, tmp_path / "art")
    ok = run_cli("validate", art, "--limit", "32")
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["passed"] and summary["top1_agreement"] == 1.0 and summary["images"] == 32
    failed = run_cli("validate", art, "--limit", "16", "--max-abs-logit-diff", "0")
    assert failed.exit_code == 3
    assert assert_clean_failure(failed).startswith("vitedge: error: validation failed on fashion-mnist: max |logit diff|")
    assert read_json(art / "report.json")["validate"]["passed"] is False
    other = run_cli("validate", art, "--limit", "8", "--checkpoint", other_evit_ckpt)
    assert other.exit_code == 2
    assert "sha256 differs" in assert_clean_failure(other)


def test_subprocess_bad_inputs_print_one_line(tmp_path, evit_ckpt):
    """The installed entry point, end to end: a corrupt checkpoint and a keep rate out of range."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(2048))
    for args in ([str(corrupt), "--family", "evit"], [str(evit_ckpt), "--family", "evit", "--keep-rate", "1.5"]):
        proc = subprocess.run([sys.executable, "-m", "vitedge.cli", "export", *args, "-o", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr + proc.stdout
        assert [line for line in proc.stderr.splitlines() if line.startswith("vitedge: error:")] == [proc.stderr.splitlines()[-1]]
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "{ckpt}", "-o", "{out}", "--keep-rate", "abc"], "Invalid value for '--keep-rate'"),
        (["export", "-o", "{out}"], "Missing argument 'CHECKPOINT'"),
        (["export", "{ckpt}", "-o", "{file}"], "is a file"),
        (["nonsense"], "No such command 'nonsense'"),
        (["profile", "{out}", "--backend", "cuda"], "Invalid value for '--backend'"),
    ],
)
def test_click_usage_errors_are_one_line_too(tmp_path, args, message):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    outdir = tmp_path / "out"
    filled = [a.format(ckpt=tmp_path / "x.pth", out=outdir, file=a_file) for a in args]
    result = run_cli(*filled)
    line = assert_clean_failure(result, outdir)
    assert result.exit_code == 2
    assert message in line and "--help" in line


def test_bare_command_prints_help_and_succeeds():
    result = run_cli()
    assert result.exit_code == 0
    assert "Usage: vitedge" in result.output and "export" in result.output


# ---------------------------------------------------------------- the error boundary


def _boundary_group():
    """A group with the real boundary (``OneLineErrors`` + ``friendly``) and commands that fail the ways a bug does."""

    @click.group(cls=OneLineErrors)
    @click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=cli._set_debug)
    def group():
        pass

    @group.command()
    @friendly
    def divide():
        return 1 // 0

    @group.command()
    def lookup():  # not wrapped in friendly: the group's main is the last boundary
        return {}["family"]

    @group.command()
    @friendly
    def disk():
        raise OSError(28, "No space left on device", "/out/model.onnx")

    return group


@pytest.mark.parametrize("command, exit_code, message", [
    ("divide", 70, r"internal error in '.* divide': ZeroDivisionError: integer division or modulo by zero at vitedge"),
    ("lookup", 70, r"internal error in 'vitedge': KeyError 'family'.*rerun with --debug or VITEDGE_DEBUG=1"),
    ("disk", 2, r"No space left on device: /out/model.onnx"),
])
def test_any_exception_becomes_one_line_and_an_exit_code(command, exit_code, message, monkeypatch):
    monkeypatch.delenv("VITEDGE_DEBUG", raising=False)
    result = CliRunner().invoke(_boundary_group(), [command])
    line = assert_clean_failure(result)
    assert result.exit_code == exit_code
    assert re.search(message, line), line


def test_debug_prints_the_traceback_then_the_line(monkeypatch):
    monkeypatch.delenv("VITEDGE_DEBUG", raising=False)
    group = _boundary_group()
    try:
        flagged = CliRunner().invoke(group, ["--debug", "divide"])
        monkeypatch.setenv("VITEDGE_DEBUG", "1")
        cli._set_debug(None, None, False)
        env = CliRunner().invoke(group, ["lookup"])
    finally:
        cli._set_debug(None, None, False)
    for result, raised in ((flagged, "ZeroDivisionError"), (env, "KeyError")):
        assert result.exit_code == 70
        assert "Traceback (most recent call last)" in result.stderr and raised in result.stderr
        assert result.stderr.rstrip().splitlines()[-1].startswith("vitedge: error: internal error")


def test_real_commands_have_the_debug_flag(tmp_path):
    result = run_cli("--debug", "inspect", tmp_path)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "is not a vitedge artifact folder" in result.stderr.splitlines()[-1]
    cli._set_debug(None, None, False)
