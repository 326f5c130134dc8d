"""SIGINT / SIGTERM on the real ``vitedge`` process: exit 130 / 143, one line, no staging folder, old artifact intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO, copy_artifact, folder_listing

MODEL = REPO / "models" / "fmnist-evit.safetensors"


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "vitedge.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def _wait_for_stage(outdir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outdir.is_dir() and any(p.name.startswith(".vitedge-stage-") for p in outdir.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the export never staged its files")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err, err
    assert len((out + err).strip().splitlines()) <= 5 or "interrupted by" in err.strip().splitlines()[-1]
    return proc.returncode, err


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_export_removes_the_stage(tmp_path, signum, code):
    outdir = tmp_path / "out"
    proc = _start("export", str(MODEL), "-o", str(outdir), "--validate-limit", "64")
    _wait_for_stage(outdir, proc)
    proc.send_signal(signum)
    returncode, err = _finish(proc)
    assert returncode == code
    assert err.strip().splitlines()[-1] == f"vitedge: interrupted by {signal.Signals(signum).name}; nothing half-written is kept"
    assert not outdir.exists()  # the folder the export created goes too
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_re_export_keeps_the_previous_artifact(evit_artifact, evit_ckpt, tmp_path):
    outdir = copy_artifact(evit_artifact, tmp_path / "out")
    before = folder_listing(outdir)
    proc = _start("export", str(evit_ckpt), "-o", str(outdir), "--family", "evit", "--num-heads", "2")
    _wait_for_stage(outdir, proc)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc)[0] == 143
    assert folder_listing(outdir) == before


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_start_up_exits_cleanly(tmp_path, signum, code):
    """While torch and onnx are still importing (the handlers are installed before them)."""
    proc = _start("export", str(MODEL), "-o", str(tmp_path / "out"))
    time.sleep(0.3)
    assert proc.poll() is None, "vitedge started faster than the test can interrupt it"
    proc.send_signal(signum)
    returncode, err = _finish(proc)
    assert returncode == code, err
    assert "interrupted by" in err
    assert not (tmp_path / "out").exists()
