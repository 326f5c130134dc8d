"""The slow part of the hostile-input corpus (tests/test_hostile.py holds the fast cases).

Each case runs the real ``vitedge`` process against a good artifact exported once from
models/fmnist-evit.safetensors and checks the guarantees of docs/guarantees.md:

  signals      SIGTERM / SIGINT at random moments of a re-export (start-up, loading,
               exporting, validating): exit 130/143, no traceback, no .vitedge-stage-* or
               .vitedge-lock left, the previous artifact byte-for-byte intact
  writers      several exports into one folder at once: exactly the first writer proceeds,
               every other one exits 7 at once, and the artifact left is a valid one
  oversized    sparse files larger than vitedge reads (recipe, vitedge.json, device YAML):
               refused from their size, before they are read
  failed       a re-export that fails validation (a 0.0 logit threshold) keeps the artifact
               and leaves its attempt in OUTDIR.failed/

Usage: python scripts/hostile_slow.py [--trials 12] [--seed 0]   (a few minutes on 2 cores)
Exits 1 and prints the failing cases when any guarantee is broken.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "fmnist-evit.safetensors"


def vitedge(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VITEDGE_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "vitedge.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, **kwargs)


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".vitedge-*")]


def contract(proc: subprocess.Popen, codes: set[int], out: str, err: str) -> list[str]:
    problems = []
    if proc.returncode not in codes:
        problems.append(f"exit {proc.returncode}, expected one of {sorted(codes)}: {err.strip()[-300:]}")
    if "Traceback" in out + err:
        problems.append("printed a traceback")
    lines = err.strip().splitlines()
    if proc.returncode != 0 and not (lines and lines[-1].startswith(("vitedge: error:", "vitedge: interrupted"))):
        problems.append(f"last line is not a vitedge line: {lines[-1:]}")
    return problems


def signals(good: Path, work: Path, trials: int, rng: random.Random) -> list[str]:
    problems = []
    for trial in range(trials):
        outdir = work / f"signal-{trial}"
        shutil.copytree(good, outdir)
        before = listing(outdir)
        signum = rng.choice([signal.SIGTERM, signal.SIGINT])
        delay = rng.uniform(0.05, 12.0)
        proc = vitedge("export", MODEL, "-o", outdir, "--validate-limit", "64")
        time.sleep(delay)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=600)
        codes = {0, 130 if signum == signal.SIGINT else 143}  # 0: it finished before the signal
        label = f"signals[{trial}] {signal.Signals(signum).name} after {delay:.2f}s"
        problems += [f"{label}: {p}" for p in contract(proc, codes, out, err)]
        if leftovers(outdir):
            problems.append(f"{label}: left {leftovers(outdir)}")
        if proc.returncode != 0 and listing(outdir) != before:
            problems.append(f"{label}: the previous artifact changed")
        print(f"{label}: exit {proc.returncode}", flush=True)
    return problems


def writers(good: Path, work: Path, count: int = 3) -> list[str]:
    outdir = work / "writers"
    shutil.copytree(good, outdir)
    first = vitedge("export", MODEL, "-o", outdir, "--validate-limit", "64")
    deadline = time.monotonic() + 300
    while not (outdir / ".vitedge-lock").exists():
        if first.poll() is not None or time.monotonic() > deadline:
            return [f"writers: the first export never took the lock: {first.communicate()[1][-300:]}"]
        time.sleep(0.02)
    others = [vitedge("export", MODEL, "-o", outdir, "--validate-limit", "64") for _ in range(count - 1)]
    problems = []
    for index, proc in enumerate(others):
        out, err = proc.communicate(timeout=600)
        problems += [f"writers[{index + 1}]: {p}" for p in contract(proc, {7}, out, err)]
    out, err = first.communicate(timeout=600)
    problems += [f"writers[0]: {p}" for p in contract(first, {0}, out, err)]
    check = vitedge("check", outdir)
    out, err = check.communicate(timeout=600)
    problems += [f"writers check: {p}" for p in contract(check, {0}, out, err)]
    if leftovers(outdir):
        problems.append(f"writers: left {leftovers(outdir)}")
    print(f"writers: first exit {first.returncode}, others {[p.returncode for p in others]}", flush=True)
    return problems


def oversized(good: Path, work: Path) -> list[str]:
    problems = []
    art = work / "oversized-art"
    shutil.copytree(good, art)
    recipe = work / "huge.yaml"
    devices = work / "devices"
    devices.mkdir()
    cases = {
        "recipe": (recipe, ["export", MODEL, "-o", work / "oversized-out", "--recipe", recipe]),
        "vitedge.json": (art / "vitedge.json", ["inspect", art]),
        "device profile": (devices / "board.yaml", ["devices", "--devices-dir", devices]),
    }
    for name, (path, args) in cases.items():
        with open(path, "r+b" if path.exists() else "wb") as handle:
            handle.truncate(80 << 20)  # sparse: 80 MiB on paper, nothing on disk
        proc = vitedge(*args)
        out, err = proc.communicate(timeout=600)
        problems += [f"oversized {name}: {p}" for p in contract(proc, {2}, out, err)]
        if "MiB" not in err:
            problems.append(f"oversized {name}: not refused for its size: {err.strip()[-200:]}")
        print(f"oversized {name}: exit {proc.returncode}", flush=True)
    return problems


def failed(good: Path, work: Path) -> list[str]:
    outdir = work / "failed"
    shutil.copytree(good, outdir)
    before = listing(outdir)
    recipe = work / "strict.yaml"
    recipe.write_text("family: evit\nvalidation:\n  thresholds:\n    max_abs_logit_diff: 0.0\n")
    proc = vitedge("export", MODEL, "-o", outdir, "--recipe", recipe, "--validate-limit", "16")
    out, err = proc.communicate(timeout=600)
    problems = [f"failed: {p}" for p in contract(proc, {3}, out, err)]
    if listing(outdir) != before:
        problems.append("failed: the previous artifact changed")
    if not (work / "failed.failed" / "report.json").is_file():
        problems.append("failed: no attempt in OUTDIR.failed/")
    print(f"failed validation: exit {proc.returncode}", flush=True)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="signal trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vitedge-hostile-") as tmp:
        work = Path(tmp)
        good = work / "good"
        proc = vitedge("export", MODEL, "-o", good, "--validate-limit", "64")
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            print(f"could not export the good artifact: {err}", file=sys.stderr)
            return 1
        problems = signals(good, work, args.trials, rng) + writers(good, work) + oversized(good, work) + failed(good, work)
    for line in problems:
        print(f"BROKEN: {line}")
    print(f"{args.trials + 3 + 3 + 1} slow cases, {len(problems)} broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
