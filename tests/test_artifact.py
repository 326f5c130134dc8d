"""vitedge.artifact: atomic writes, the staged OUTDIR, and the Artifact reader."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import REPO, assert_clean_failure, copy_artifact, folder_listing, run_cli

from vitedge.artifact import (
    LOCK,
    Artifact,
    ensure_writable_dir,
    staged_outdir,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
    writer_lock,
)
from vitedge.errors import ValidationFailed, VitedgeError


def test_write_bytes_atomic_creates_and_replaces(tmp_path):
    path = tmp_path / "model.bin"
    write_bytes_atomic(path, b"first")
    write_bytes_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["model.bin"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # fails inside the write, after the temp file exists
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json_atomic(path, {"x": object()})
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_json_atomic_handles_numpy_tuples_and_paths(tmp_path):
    path = tmp_path / "meta.json"
    write_json_atomic(path, {"a": np.arange(3), "b": (1, 2), "c": Path("/x/y"), "d": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": [1, 2], "c": "/x/y", "d": 0.5}
    assert path.read_text().endswith("\n")


def test_ensure_writable_dir(tmp_path):
    ensure_writable_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(VitedgeError, match="cannot write to output folder .*file/out"):
        ensure_writable_dir(tmp_path / "file" / "out")


def test_staged_outdir_success_moves_files_in(tmp_path):
    outdir = tmp_path / "out"
    with staged_outdir(outdir) as stage:
        assert stage.parent == outdir and stage.name.startswith(".vitedge-stage-")
        (stage / "model.onnx").write_bytes(b"onnx")
        (stage / "vitedge.json").write_text("{}")
    assert sorted(os.listdir(outdir)) == ["model.onnx", "vitedge.json"]


def test_staged_outdir_failure_in_a_new_folder_leaves_nothing(tmp_path):
    outdir = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with staged_outdir(outdir) as stage:
            (stage / "model.onnx").write_bytes(b"half")
            raise RuntimeError("export crashed")
    assert not (tmp_path / "new").exists()  # parents created for OUTDIR go too
    assert os.listdir(tmp_path) == []


def test_staged_outdir_failure_keeps_an_existing_outdir_as_it_was(evit_artifact, tmp_path):
    outdir = copy_artifact(evit_artifact, tmp_path / "out")
    before = folder_listing(outdir)
    with pytest.raises(KeyboardInterrupt):
        with staged_outdir(outdir) as stage:
            (stage / "model.onnx").write_bytes(b"new but broken")
            raise KeyboardInterrupt
    assert folder_listing(outdir) == before


def test_artifact_reader(evit_artifact, tmp_path):
    art = Artifact(evit_artifact)
    assert art.metadata["family"] == "evit"
    assert art.model_path == evit_artifact / "model.onnx"
    assert art.report()["check"]["passed"] is True
    with pytest.raises(VitedgeError, match="not a vitedge artifact folder"):
        Artifact(tmp_path)
    broken = copy_artifact(evit_artifact, tmp_path / "broken")
    (broken / "report.json").write_text("{ half")
    assert Artifact(broken).report() == {}
    Artifact(broken).update_report("profile", {"ort": {"backend": "ort", "batch": 1, "threads": 1, "p50_ms": 1.0,
                                                        "p90_ms": 2.0, "p99_ms": 3.0, "throughput_img_s": 1000.0}})
    assert json.loads((broken / "report.json").read_text())["profile"]["ort"]["p99_ms"] == 3.0
    assert "| ort | 1 | 1 | 1.00 | 2.00 | 3.00 | 1000.0 |" in (broken / "report.md").read_text()
    (broken / "vitedge.json").write_text("{ half")
    with pytest.raises(VitedgeError, match="cannot read .*vitedge.json"):
        Artifact(broken)


def test_a_second_writer_is_refused_while_an_export_runs(evit_artifact, evit_ckpt, tmp_path):
    """A real export in another process holds OUTDIR's lock; check, validate and export here get exit 7."""
    outdir = copy_artifact(evit_artifact, tmp_path / "out")
    before = folder_listing(outdir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "vitedge.cli", "export", str(evit_ckpt), "-o", str(outdir),
                             "--family", "evit", "--num-heads", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".vitedge-stage-") for p in outdir.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        assert (outdir / LOCK).read_text().strip() == str(proc.pid)
        for args in (["check", outdir], ["validate", outdir, "--limit", "4"], ["export", evit_ckpt, "-o", outdir, "--family", "evit", "--num-heads", "2"]):
            result = run_cli(*args)
            assert result.exit_code == 7, result.output
            assert f"{outdir} is being written by another vitedge process (pid {proc.pid})" in assert_clean_failure(result)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert folder_listing(outdir) == before  # no lock file, no stage, the artifact as it was


def test_the_lock_is_re_entrant_and_leaves_nothing(tmp_path):
    with writer_lock(tmp_path):
        with writer_lock(tmp_path):
            assert (tmp_path / LOCK).is_file()
        assert (tmp_path / LOCK).is_file()
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_moves_the_attempt_beside_outdir_unless_nested(tmp_path):
    outdir = tmp_path / "out"
    write_text_atomic(ensure_dir(outdir) / "model.onnx", "previous")
    with pytest.raises(ValidationFailed, match=f"bad logits; {outdir} is unchanged, the failed attempt is in {tmp_path / 'out.failed'}"):
        with staged_outdir(outdir) as stage:
            write_text_atomic(stage / "model.onnx", "new")
            raise ValidationFailed("bad logits")
    assert (outdir / "model.onnx").read_text() == "previous"
    assert (tmp_path / "out.failed" / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in outdir.iterdir()) == ["model.onnx"]
    with staged_outdir(tmp_path / "outer") as outer:  # as tune does: a candidate's failure is the outer write's business
        with pytest.raises(ValidationFailed, match="^candidate failed$"):
            with staged_outdir(outer / "candidates" / "0") as inner:
                write_text_atomic(inner / "model.onnx", "candidate")
                raise ValidationFailed("candidate failed")
        assert not (outer / "candidates" / "0.failed").exists()
        write_text_atomic(outer / "tune.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.failed", "outer"]


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
