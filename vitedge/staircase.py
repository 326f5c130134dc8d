"""Latency against the token count: measure the staircase, find its steps, snap budgets onto them.

On real kernels latency is not linear in the token count: GEMM tiling and attention kernels
make it a staircase (POMT, WACV 2025, measured it on Jetson), so a budget a few tokens lower can
cost the same and a few tokens higher can be free. What is timed is the backbone's own blocks
(``depth`` dense ViT blocks of the model's width, random weights: latency does not depend on
them) at T tokens, for every T asked, on the backend at hand; a family's budgeted blocks run the
same blocks at its kept counts, so their steps are where the family's latency steps are. Stage
code never names a family: ``Family.budget_tokens`` says which counts a setting fixes and
``Family.with_budget_tokens`` turns raised counts back into settings.

Step rule (stated so it can be checked): the noise of a count's median latency is its standard
error from the interleaved rounds, ``1.2533 * 1.4826 * MAD / sqrt(rounds)``; two counts a, b are
*on one step* when ``|m_b - m_a| <= Z * sqrt(se_a^2 + se_b^2)`` (Z = 2, about 95 %). A budget t
snaps to the largest measured T >= t such that every count t..T was measured (no gap) and every
one of them is on t's step or cheaper: ``m_T' <= m_t + Z * sqrt(se_t^2 + se_T'^2)``. A ramp whose
slope is above the noise therefore never snaps; a flat tread snaps to its top.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .artifact import staged_outdir, write_bytes_atomic, write_json_atomic
from .backbone import Block, ViTConfig
from .errors import VitedgeError

Z = 2.0  # two standard errors: counts closer than this are one step
BACKENDS = ("ort", "torch")
STAIRCASE_JSON = "staircase.json"
STAIRCASE_PLOT = "staircase.png"
DEFAULT_STEP = 8
DEFAULT_WINDOW = 16


@dataclass
class Staircase:
    """Median latency (ms) of the block stack per token count, with its noise and the steps found."""

    counts: list[int]
    median_ms: list[float]
    stderr_ms: list[float]
    backend: str = "ort"
    batch: int = 1
    threads: int = 2
    rounds: int = 0
    blocks: int = 0
    steps: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not self.steps:
            self.steps = find_steps(self.counts, self.median_ms, self.stderr_ms)

    def to_dict(self) -> dict:
        return {**asdict(self), "rule": f"same step: |m_b - m_a| <= {Z:g} * sqrt(se_a^2 + se_b^2)"}


def median_stderr(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column (token count): median and the standard error of the median (robust, from the MAD)."""
    samples = np.asarray(samples, dtype=float)
    median = np.median(samples, axis=0)
    mad = np.median(np.abs(samples - median), axis=0)
    return median, 1.2533 * 1.4826 * mad / math.sqrt(samples.shape[0])


def _same_or_cheaper(m, se, a: int, b: int) -> bool:
    return m[b] <= m[a] + Z * math.hypot(se[a], se[b])


def find_steps(counts, median_ms, stderr_ms) -> list[dict]:
    """Greedy left-to-right segmentation: a step starts at a count and holds the following
    consecutive counts whose latency is within noise of that first count; a gap in the counts,
    a rise or a fall beyond noise starts the next step."""
    counts, m, se = list(counts), list(median_ms), list(stderr_ms)
    steps: list[dict] = []
    start = 0
    for i in range(1, len(counts) + 1):
        if i < len(counts) and counts[i] == counts[i - 1] + 1 and abs(m[i] - m[start]) <= Z * math.hypot(se[start], se[i]):
            continue
        steps.append({"first": counts[start], "last": counts[i - 1],
                      "median_ms": float(np.median(m[start:i]))})
        start = i
    return steps


def snap(staircase: Staircase, tokens: int) -> int:
    """The largest count on ``tokens``' step (rule in the module docstring); ``tokens`` itself
    when the next count costs more than noise or was not measured."""
    counts = staircase.counts
    if tokens not in counts:
        raise VitedgeError(f"token count {tokens} was not measured (measured {counts[0]}..{counts[-1]}); "
                           "add it to the counts profiled")
    m, se = staircase.median_ms, staircase.stderr_ms
    at = counts.index(tokens)
    best = at
    for i in range(at + 1, len(counts)):
        if counts[i] != counts[i - 1] + 1 or not _same_or_cheaper(m, se, at, i):
            break
        best = i
    return counts[best]


class BlockStack(nn.Module):
    """``depth`` dense ViT blocks of the model's width: what a budgeted model runs at T tokens."""

    def __init__(self, cfg: ViTConfig, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def token_counts(max_tokens: int, near: list[int] = (), window: int = DEFAULT_WINDOW, step: int = DEFAULT_STEP,
                 low: int | None = None, high: int | None = None) -> list[int]:
    """Every multiple of ``step`` in low..high plus every count from each ``near`` value to
    ``window`` above it (what snapping needs), within 1..max_tokens."""
    low = 1 if low is None else low
    high = max_tokens if high is None else high
    if not 1 <= low <= high <= max_tokens:
        raise VitedgeError(f"token range {low}..{high} is empty or outside 1..{max_tokens} "
                           f"(this model's blocks see at most {max_tokens} tokens)")
    for value in near:
        if not low <= value <= high:
            raise VitedgeError(f"token count {value} is outside the range profiled, {low}..{high}")
    if step < 1 or window < 0:
        raise VitedgeError(f"step must be >= 1 and window >= 0, got step {step}, window {window}")
    counts = {c for c in range(low, high + 1) if c % step == 0} | {low, high}
    for value in near:
        counts.update(range(value, min(high, value + window) + 1))
    return sorted(counts)


def _runners(cfg: ViTConfig, counts: list[int], batch: int, threads: int, backend: str, depth: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    stack = BlockStack(cfg, depth).eval()
    rng = np.random.default_rng(0)
    inputs = {t: rng.standard_normal((batch, t, cfg.embed_dim), dtype=np.float32) for t in counts}
    if backend == "torch":
        def make(t):
            x = torch.from_numpy(inputs[t])

            def run():
                with torch.inference_mode():
                    stack(x)
            return run
        torch.set_num_threads(threads)
        return {t: make(t) for t in counts}
    from .runtime import ort_session

    path = tmp / "blocks.onnx"
    example = torch.from_numpy(inputs[counts[-1]])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(stack, (example,), str(path), dynamo=False, opset_version=17, input_names=["tokens"],
                          output_names=["out"], dynamic_axes={"tokens": {1: "n"}, "out": {1: "n"}})
    session = ort_session(path, threads)

    def make(t):
        feed = {"tokens": inputs[t]}
        return lambda: session.run(None, feed)
    return {t: make(t) for t in counts}


def measure(cfg: ViTConfig, counts: list[int], batch: int = 1, backend: str = "ort", threads: int = 2,
            rounds: int = 20, warmup: int = 2, depth: int | None = None, log=None) -> Staircase:
    """Interleaved rounds: each round times every count once (order rotated and reversed
    from round to round); medians and their standard errors per count."""
    if backend not in BACKENDS:
        raise VitedgeError(f"unknown backend '{backend}'; profile-tokens runs on: {', '.join(BACKENDS)}")
    if batch < 1 or threads < 1 or rounds < 3 or warmup < 0:
        raise VitedgeError(f"need batch >= 1, threads >= 1, rounds >= 3 (for a noise estimate), warmup >= 0; "
                           f"got batch {batch}, threads {threads}, rounds {rounds}, warmup {warmup}")
    if not counts:
        raise VitedgeError("no token counts to profile")
    depth = depth or cfg.depth
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vitedge-staircase-") as tmp:
        runners = _runners(cfg, counts, batch, threads, backend, depth, Path(tmp))
        if log:
            log(f"timing {depth} blocks at {len(counts)} token counts ({counts[0]}..{counts[-1]}) on {backend}, "
                f"batch {batch}: {rounds} interleaved rounds")
        for _ in range(warmup):
            for run in runners.values():
                run()
        samples = np.zeros((rounds, len(counts)))
        order = list(range(len(counts)))
        for r in range(rounds):
            shift = (r * 7) % len(order)
            ordered = order[shift:] + order[:shift]
            for i in (ordered[::-1] if r % 2 else ordered):
                start = time.perf_counter()
                runners[counts[i]]()
                samples[r, i] = (time.perf_counter() - start) * 1000.0
    median, stderr = median_stderr(samples)
    return Staircase(list(counts), [float(v) for v in median], [float(v) for v in stderr], backend, batch, threads,
                     rounds, depth)


def snap_settings(family, cfg: ViTConfig, settings: dict, staircase: Staircase) -> tuple[dict, dict | None]:
    """Settings whose budgeted counts sit at the top of their latency steps, and the record of
    what moved (None when the family has no token budget in these settings)."""
    before = family.budget_tokens(cfg, settings)
    if not before:
        return settings, None
    limits = [snap(staircase, t) for t in before]
    snapped = family.with_budget_tokens(cfg, settings, limits)
    after = family.budget_tokens(cfg, snapped)
    m = dict(zip(staircase.counts, staircase.median_ms))
    return snapped, {"tokens_before": before, "step_tops": limits, "tokens_after": after,
                     "stack_ms_before": [m[t] for t in before], "stack_ms_after": [m.get(t) for t in after]}


def add_snapped(family, cfg: ViTConfig, candidates: list[dict], calibrated: list[dict], batch: int, backend: str,
                threads: int, rounds: int = 20, log=None) -> tuple[list[dict], list[dict], dict]:
    """``vitedge tune --snap-budgets``: each candidate followed by its snapped form (where that
    differs), so the search measures both and tune.md shows what snapping cost and bought."""
    snapped, record = snap_candidates(family, cfg, candidates, batch, backend, threads, rounds, log=log)
    out, out_calibrated = [], []
    for before, after, calib, move in zip(candidates, snapped, calibrated, record["moves"]):
        out.append(before)
        out_calibrated.append(calib)
        if move is not None and move["tokens_after"] != move["tokens_before"]:
            out.append(after)
            out_calibrated.append({**calib, "snapped_from": move["tokens_before"]})
            move["settings"] = after
    if log:
        moved = sum(1 for m in record["moves"] if m and m["tokens_after"] != m["tokens_before"])
        log(f"snapped {moved} of {len(candidates)} candidate(s) to the top of their latency steps")
    return out, out_calibrated, record


def markdown(record: dict, plot_name: str | None) -> str:
    """The tune.md section: the rule, each candidate's counts before and after snapping."""
    stair = record["staircase"]
    lines = ["", "## Latency staircase", "",
             f"{stair['blocks']} dense blocks of this width timed at {len(stair['counts'])} token counts "
             f"({stair['counts'][0]}..{stair['counts'][-1]}) on {stair['backend']}, batch {stair['batch']}, "
             f"{stair['rounds']} interleaved rounds, medians. Rule: {stair['rule']} (se: standard error of the "
             "median from the MAD); a budget moves up to the last count on its step or cheaper, never across an "
             "unmeasured count. Each snapped candidate is measured beside its original above.", "",
             "| candidate tokens per step | snapped to | blocks' median ms before → after |", "|---|---|---|"]
    for move in record["moves"]:
        if move is None:
            continue
        after_ms = " ".join("—" if v is None else f"{v:.3f}" for v in move["stack_ms_after"])
        lines.append(f"| {','.join(map(str, move['tokens_before']))} | {','.join(map(str, move['tokens_after']))} | "
                     f"{' '.join(f'{v:.3f}' for v in move['stack_ms_before'])} → {after_ms} |")
    if plot_name:
        lines += ["", f"![staircase]({plot_name})"]
    return "\n".join(lines) + "\n"


def snap_candidates(family, cfg: ViTConfig, candidates: list[dict], batch: int, backend: str, threads: int,
                    rounds: int = 20, window: int = DEFAULT_WINDOW, log=None) -> tuple[list[dict], dict]:
    """Profile the block stack near every candidate's budgets, snap each; returns the new
    candidates and a record (the staircase, what each candidate's counts became)."""
    wanted = sorted({t for s in candidates for t in (family.budget_tokens(cfg, s) or [])})
    if not wanted:
        raise VitedgeError(f"family '{family.name}' has no token budget to snap in these candidates; "
                           "drop --snap-budgets")
    counts = token_counts(cfg.num_patches + 1, wanted, window)
    staircase = measure(cfg, counts, batch, backend, threads, rounds, log=log)
    out, moves = [], []
    for settings in candidates:
        snapped, record = snap_settings(family, cfg, settings, staircase)
        out.append(snapped)
        moves.append(record)
    return out, {"staircase": staircase.to_dict(), "moves": moves}


def plot(staircase: dict, path: Path, marks: list[dict] = (), title: str = "") -> bool:
    """Median latency per count with its noise band, steps shaded, budgets before/after snapping
    as arrows; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return False
    import io

    counts = np.asarray(staircase["counts"])
    m, se = np.asarray(staircase["median_ms"]), np.asarray(staircase["stderr_ms"])
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    axes.fill_between(counts, m - Z * se, m + Z * se, color="C0", alpha=0.2, label=f"±{Z:g} s.e.")
    axes.plot(counts, m, ".", color="C0", markersize=3, label="median")
    for i, step in enumerate(staircase["steps"]):
        if step["last"] > step["first"]:
            axes.hlines(step["median_ms"], step["first"], step["last"], colors="C1", linewidth=2,
                        label="step" if i == 0 or "step" not in axes.get_legend_handles_labels()[1] else None)
    by_count = dict(zip(counts.tolist(), m.tolist()))
    for mark in marks or ():
        for before, after in zip(mark["tokens_before"], mark["tokens_after"]):
            if after != before and before in by_count and after in by_count:
                axes.annotate("", (after, by_count[after]), (before, by_count[before]),
                              arrowprops={"arrowstyle": "->", "color": "C3"})
            axes.plot([before], [by_count.get(before, np.nan)], "o", color="C3", markersize=4)
    axes.set_xlabel("tokens per block")
    axes.set_ylabel(f"{staircase['blocks']} blocks, median ms ({staircase['backend']}, batch {staircase['batch']})")
    axes.set_title(title or "latency staircase", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return True


def profile_tokens(checkpoint, outdir, family: str | None = None, arch: str | None = None, low: int | None = None,
                   high: int | None = None, step: int = DEFAULT_STEP, near: list[int] | None = None,
                   window: int = DEFAULT_WINDOW, snap_tokens: list[int] | None = None, batch: int = 1,
                   backend: str = "ort", threads: int = 2, rounds: int = 20, warmup: int = 2, log=None) -> dict:
    """Measure the staircase of CHECKPOINT's blocks; OUTDIR gets staircase.json and staircase.png.

    ``near`` and ``snap_tokens`` add every count up to ``window`` above them; ``snap_tokens``
    are also snapped (``"snapped": {t: top of t's step}``). By default ``near`` is the budgeted
    counts of the checkpoint's own settings (``Family.budget_tokens``).
    """
    from .load import load_model

    loaded = load_model(checkpoint, family=family, arch=arch)
    top = loaded.cfg.num_patches + 1
    near = list(near or []) + list(snap_tokens or [])
    if not near:
        near = loaded.family.budget_tokens(loaded.cfg, loaded.settings) or []
        near = [t for t in near if (low or 1) <= t <= (high or top)]
    counts = token_counts(top, near, window, step, low, high)
    staircase = measure(loaded.cfg, counts, batch, backend, threads, rounds, warmup, log=log)
    result = {"family": loaded.family.name, "checkpoint": str(checkpoint), **staircase.to_dict(),
              "snapped": {str(t): snap(staircase, t) for t in snap_tokens or []}}
    with staged_outdir(Path(outdir)) as stage:
        marks = [{"tokens_before": [int(t) for t in result["snapped"]], "tokens_after": list(result["snapped"].values())}]
        result["plot"] = STAIRCASE_PLOT if plot(result, stage / STAIRCASE_PLOT, marks,
                                                f"{loaded.family.name}: latency vs tokens") else None
        write_json_atomic(stage / STAIRCASE_JSON, result)
    return result
