"""Latency against the token count: measure the staircase, find its steps, snap budgets onto them.

On real kernels latency is not linear in the token count: GEMM tiling and attention kernels
make it a staircase (POMT, WACV 2025, measured it on Jetson), so a budget a few tokens lower can
cost the same and a few tokens higher can be free. What is timed is the backbone's own blocks
(``depth`` dense ViT blocks of the model's width, random weights: latency does not depend on
them) at T tokens, for every T asked, on the backend at hand, exported the way a model is (the
dynamo exporter, ``export.export_token_stack``) and, on ONNX Runtime, in the form that runs: with
the ``vitedge optimize`` passes where they apply and pay (``graph``). A family's budgeted blocks
run these blocks at its kept counts, but around them its own selection ops, so a snap is a
prediction: ``tune`` keeps one only after timing the snapped candidate's own graph against the
original's in one interleaved run (``verify_snap``: not measurably slower), and reverts it
otherwise. Stage code never names a family: ``Family.budget_tokens`` says which counts a setting
fixes and ``Family.with_budget_tokens`` turns raised counts back into settings.

Step rule (stated so it can be checked). Each count's median over the interleaved rounds is
smoothed by a running median of 5 neighbouring measured counts (within a run of consecutive
counts; a median filter keeps step edges and removes a count that one burst of load made slow),
giving the level L. The noise is one number for the curve, the median over counts of each
median's standard error, ``se = 1.2533 * 1.4826 * MAD / sqrt(rounds)``. Two counts a, b are *on
one step* when ``|L_b - L_a| <= Z * sqrt(2) * se`` (Z = 2, about 95 %). A budget t snaps to the
largest measured T >= t such that every count t..T was measured (no gap) and each is on t's step
or cheaper (``L_T' <= L_t + Z * sqrt(2) * se``). A ramp whose slope is above the noise therefore
never snaps, a flat tread snaps to its top, and a curve whose noise is over ``MAX_NOISE`` (5 %)
of the latency at t is too noisy to snap at all: t stays.
"""

from __future__ import annotations

import json
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
SMOOTH = 5  # running-median width over consecutive counts
MAX_NOISE = 0.05  # noise over this share of the latency: too noisy to snap
BACKENDS = ("ort", "torch")
STAIRCASE_JSON = "staircase.json"
STAIRCASE_PLOT = "staircase.png"
DEFAULT_STEP = 8
DEFAULT_WINDOW = 16
DEFAULT_ROUNDS = 20  # interleaved rounds of the staircase (each times every count once)
GRAPHS = ("auto", "portable", "optimized")  # as profile's --graph: the ORT form of the block stack timed
VERIFY_ROUNDS = 60  # interleaved rounds (5 runs each) of a snapped graph against its original: 30 were too few under load


@dataclass
class Staircase:
    """Median latency (ms) of the block stack per token count, its noise and the steps found."""

    counts: list[int]
    median_ms: list[float]
    stderr_ms: list[float]
    backend: str = "ort"
    batch: int = 1
    threads: int = 2
    rounds: int = 0
    blocks: int = 0
    level_ms: list[float] = field(default_factory=list)
    noise_ms: float = 0.0
    steps: list[dict] = field(default_factory=list)
    graph: str = "portable"  # ORT: the block stack as exported, or "optimized" (the vitedge optimize passes)
    graph_choice: dict = field(default_factory=dict)  # why that form: the passes and, for auto, their timing

    def __post_init__(self):
        if not self.level_ms:
            self.level_ms = smooth(self.counts, self.median_ms)
        if not self.noise_ms:
            self.noise_ms = float(np.median(self.stderr_ms))
        if not self.steps:
            self.steps = find_steps(self.counts, self.level_ms, self.noise_ms)

    def to_dict(self) -> dict:
        return {**asdict(self), "rule": (f"level: running median of {SMOOTH} counts; same step: |L_b - L_a| <= "
                                         f"{Z:g} * sqrt(2) * noise; no snap where noise > {MAX_NOISE:.0%} of L_t")}


def median_stderr(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column (token count): median and the standard error of the median (robust, from the MAD)."""
    samples = np.asarray(samples, dtype=float)
    median = np.median(samples, axis=0)
    mad = np.median(np.abs(samples - median), axis=0)
    return median, 1.2533 * 1.4826 * mad / math.sqrt(samples.shape[0])


def _runs(counts) -> list[range]:
    """Index ranges of consecutive counts (a gap splits them)."""
    runs, start = [], 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[i - 1] + 1:
            runs.append(range(start, i))
            start = i
    return runs


def smooth(counts, median_ms, width: int = SMOOTH) -> list[float]:
    """Running median over ``width`` neighbouring counts, never across a gap (shrinks at the ends)."""
    m, half, out = np.asarray(median_ms, dtype=float), width // 2, [0.0] * len(counts)
    for run in _runs(counts):
        for i in run:
            out[i] = float(np.median(m[max(run.start, i - half):min(run.stop, i + half + 1)]))
    return out


def _tolerance(noise: float) -> float:
    return Z * math.sqrt(2.0) * noise


def find_steps(counts, level_ms, noise_ms: float) -> list[dict]:
    """Greedy left-to-right split: a step starts at a count and holds the following consecutive
    counts whose level is within noise of that first count's; a gap, a rise or a fall beyond
    noise starts the next step."""
    steps, tol = [], _tolerance(noise_ms)
    for run in _runs(counts):
        start = run.start
        for i in range(run.start + 1, run.stop + 1):
            if i < run.stop and abs(level_ms[i] - level_ms[start]) <= tol:
                continue
            steps.append({"first": counts[start], "last": counts[i - 1], "median_ms": float(np.median(level_ms[start:i]))})
            start = i
    return steps


def snap(staircase: Staircase, tokens: int) -> int:
    """The largest count on ``tokens``' step or cheaper (rule in the module docstring);
    ``tokens`` itself when the next count costs more than noise, was not measured, or the
    curve is too noisy to tell."""
    counts, level = staircase.counts, staircase.level_ms
    if tokens not in counts:
        raise VitedgeError(f"token count {tokens} was not measured (measured {counts[0]}..{counts[-1]}); "
                           "add it to the counts profiled")
    at = counts.index(tokens)
    if staircase.noise_ms > MAX_NOISE * level[at]:
        return tokens
    best, tol = at, _tolerance(staircase.noise_ms)
    for i in range(at + 1, len(counts)):
        if counts[i] != counts[i - 1] + 1 or level[i] > level[at] + tol:
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


def _runners(cfg: ViTConfig, counts: list[int], batch: int, threads: int, backend: str, depth: int, tmp: Path,
             graph: str = "auto", log=None) -> tuple[dict, str, dict]:
    """One callable per count, the form of the stack timed ("portable"/"optimized") and why."""
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
        return {t: make(t) for t in counts}, "portable", {}
    from .export import export_token_stack
    from .runtime import ort_session

    path = tmp / "blocks.onnx"
    export_token_stack(stack, torch.from_numpy(inputs[counts[-1]]), path)
    path, form, choice = _stack_form(path, graph, batch, threads, counts, inputs, log)
    session = ort_session(path, threads)

    def make(t):
        feed = {"tokens": inputs[t]}
        return lambda: session.run(None, feed)
    return {t: make(t) for t in counts}, form, choice


def _stack_form(path: Path, graph: str, batch: int, threads: int, counts: list[int], inputs: dict, log):
    """The block stack with the ORT passes (``vitedge optimize``'s) where ``graph`` asks for them:
    "optimized" always (an error where none applies), "auto" where one applies and the optimised
    stack is faster at the middle count in one interleaved run; its outputs must match the stack's."""
    if graph == "portable":
        return path, "portable", {}
    import onnx

    from .optimize import interleaved_timing, optimize_graph
    from .runtime import ort_session

    model = onnx.load(str(path))
    passes = optimize_graph(model)
    if not any(passes.values()):
        if graph == "optimized":
            raise VitedgeError("no ONNX Runtime pass applies to this model's blocks; use --graph portable or auto")
        return path, "portable", {"passes": passes, "reason": "no pass applies"}
    optimized = path.with_name("blocks.ort.onnx")
    onnx.save_model(model, str(optimized))
    middle = counts[len(counts) // 2]
    feed = {"tokens": inputs[middle]}
    same = np.allclose(ort_session(path, threads).run(None, feed)[0], ort_session(optimized, threads).run(None, feed)[0],
                       rtol=1e-3, atol=1e-3)
    if not same:
        raise VitedgeError("the optimised block stack computes other values than the stack (a bug in vitedge's passes); "
                           "use --graph portable")
    choice = {"passes": passes}
    if graph == "auto":
        timing = interleaved_timing(path, optimized, batch, threads, rounds=10, size=middle)
        choice.update({"timed_at_tokens": middle, "ratio": timing["ratio"], "ratio_ci95": timing["ratio_ci95"]})
        if timing["ratio"] >= 1.0:
            choice["reason"] = "not faster than the stack as exported"
            return path, "portable", choice
        choice["reason"] = "faster than the stack as exported"
    if log:
        log(f"block stack: the ORT passes ({', '.join(f'{k} x{v}' for k, v in passes.items() if v)}) apply"
            + (f", {choice['ratio']:.3f} x the portable stack's latency at {middle} tokens" if "ratio" in choice else ""))
    return optimized, "optimized", choice


def measure(cfg: ViTConfig, counts: list[int], batch: int = 1, backend: str = "ort", threads: int = 2,
            rounds: int = DEFAULT_ROUNDS, warmup: int = 2, depth: int | None = None, log=None, graph: str = "auto") -> Staircase:
    """Interleaved rounds: each round times every count once (order rotated and reversed
    from round to round); medians and their standard errors per count. ``graph`` (ORT): the
    stack as exported ("portable"), with the ORT passes ("optimized"), or the faster ("auto")."""
    if backend not in BACKENDS:
        raise VitedgeError(f"unknown backend '{backend}'; profile-tokens runs on: {', '.join(BACKENDS)}")
    check_graph(graph, backend)
    if batch < 1 or threads < 1 or rounds < 3 or warmup < 0:
        raise VitedgeError(f"need batch >= 1, threads >= 1, rounds >= 3 (for a noise estimate), warmup >= 0; "
                           f"got batch {batch}, threads {threads}, rounds {rounds}, warmup {warmup}")
    if not counts:
        raise VitedgeError("no token counts to profile")
    depth = depth or cfg.depth
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vitedge-staircase-") as tmp:
        runners, form, choice = _runners(cfg, counts, batch, threads, backend, depth, Path(tmp), graph, log)
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
                     rounds, depth, graph=form, graph_choice=choice)


def check_graph(graph: str, backend: str) -> None:
    """``graph`` is one of GRAPHS, and "optimized" only on ONNX Runtime (the passes are ORT's)."""
    if graph not in GRAPHS:
        raise VitedgeError(f"unknown graph '{graph}'; use one of {', '.join(GRAPHS)}")
    if graph == "optimized" and backend != "ort":
        raise VitedgeError("--graph optimized is the ONNX Runtime form: use --backend ort")


def snap_settings(family, cfg: ViTConfig, settings: dict, staircase: Staircase) -> tuple[dict, dict | None]:
    """Settings whose budgeted counts sit at the top of their latency steps, and the record of
    what moved (None when the family has no token budget in these settings)."""
    before = family.budget_tokens(cfg, settings)
    if not before:
        return settings, None
    limits = [snap(staircase, t) for t in before]
    snapped = settings if limits == before else family.with_budget_tokens(cfg, settings, limits)
    after = family.budget_tokens(cfg, snapped)
    m = dict(zip(staircase.counts, staircase.level_ms))
    too_noisy = any(staircase.noise_ms > MAX_NOISE * m[t] for t in before)
    return snapped, {"tokens_before": before, "step_tops": limits, "tokens_after": after, "too_noisy": too_noisy,
                     "stack_ms_before": [m[t] for t in before], "stack_ms_after": [m.get(t) for t in after]}


def add_snapped(family, cfg: ViTConfig, candidates: list[dict], calibrated: list[dict], batch: int, backend: str,
                threads: int, rounds: int = DEFAULT_ROUNDS, log=None, graph: str = "auto") -> tuple[list[dict], list[dict], dict]:
    """``vitedge tune --snap-budgets``: each candidate followed by its snapped form (where that
    differs), so the search measures both and tune.md shows what snapping cost and bought."""
    snapped, record = snap_candidates(family, cfg, candidates, batch, backend, threads, rounds, log=log, graph=graph)
    out, out_calibrated = [], []
    for before, after, calib, move in zip(candidates, snapped, calibrated, record["moves"]):
        out.append(before)
        out_calibrated.append(calib)
        if move is not None and move["tokens_after"] != move["tokens_before"]:
            out.append(after)
            out_calibrated.append({**calib, "snapped_from": move["tokens_before"]})
            move["settings"], move["original"] = after, before
    if log:
        moved = sum(1 for m in record["moves"] if m and m["tokens_after"] != m["tokens_before"])
        stair = record["staircase"]
        log(f"snapped {moved} of {len(candidates)} candidate(s) to the top of their latency steps (noise "
            f"{stair['noise_ms']:.3f} ms, {stair['noise_ms'] / float(np.median(stair['level_ms'])):.1%} of the median level; "
            f"no snap where it is over {MAX_NOISE:.0%})")
    return out, out_calibrated, record


def settings_key(settings: dict) -> str:
    """A candidate's identity: its full settings (labels come from the family's schema)."""
    return json.dumps(settings, sort_keys=True, default=str)


def snap_pairs(measured: list[dict | None], moves: list[dict | None]) -> list[tuple[int | None, int | None, dict]]:
    """(index of the original, index of the snapped candidate, move) for every move that changed
    the counts; ``measured`` holds each candidate's settings, None where it failed validation
    (its index is then None: that pair cannot be timed)."""
    where: dict[str, int] = {}
    for index, settings in enumerate(measured):
        if settings is not None:
            where.setdefault(settings_key(settings), index)
    return [(where.get(settings_key(move["original"])), where.get(settings_key(move["settings"])), move)
            for move in moves if move and move["tokens_after"] != move["tokens_before"]]


def snap_verdict(timing: dict) -> dict:
    """Keep a snap whose own graph is not measurably slower than its original's (the 95 % interval
    of snapped / original latency reaches 1: within noise); revert it otherwise, saying why.
    ``timing``: ``optimize.interleaved_ratio`` with the original as reference."""
    low, high = timing["ratio_ci95"]
    kept = bool(low <= 1.0)
    measured = f"{timing['ratio']:.3f} x the original's latency [95 % CI {low:.3f}, {high:.3f}]"
    return {"original_ms": timing["reference_ms"], "snapped_ms": timing["optimized_ms"], "ratio": timing["ratio"],
            "ratio_ci95": [low, high], "rounds": timing["rounds"], "kept": kept,
            "reason": (f"within noise: {measured}" if kept else f"reverted, measurably slower: {measured}")}


def verify_snap(original_run, snapped_run, rounds: int = VERIFY_ROUNDS) -> dict:
    """Time the original's and the snapped candidate's graphs (callables) in one interleaved run; ``snap_verdict``."""
    from .optimize import interleaved_ratio

    return snap_verdict(interleaved_ratio([original_run, snapped_run], rounds))


def markdown(record: dict, plot_name: str | None) -> str:
    """The tune.md section: the rule, each candidate's counts before and after snapping."""
    stair = record["staircase"]
    form = " (the ORT-optimised stack)" if stair.get("graph") == "optimized" else ""
    lines = ["", "## Latency staircase", "",
             f"{stair['blocks']} dense blocks of this width{form} timed at {len(stair['counts'])} token counts "
             f"({stair['counts'][0]}..{stair['counts'][-1]}) on {stair['backend']}, batch {stair['batch']}, "
             f"{stair['rounds']} interleaved rounds, medians. Rule: {stair['rule']} (se: standard error of the "
             "median from the MAD); a budget moves up to the last count on its step or cheaper, never across an "
             "unmeasured count. Each snapped candidate is measured beside its original above, and its own graph "
             "is timed against the original's in one interleaved run: a snap measurably slower (the 95 % interval "
             "of the ratio above 1) is reverted, neither chosen nor on the front.", "",
             f"Noise (median standard error of a count's median): {stair['noise_ms']:.4f} ms.", "",
             "| candidate tokens per step | snapped to | blocks' level ms before → after | own graphs: snapped / original |",
             "|---|---|---|---|"]
    for move in record["moves"]:
        if move is None:
            continue
        after_ms = " ".join("—" if v is None else f"{v:.3f}" for v in move["stack_ms_after"])
        moved = ",".join(map(str, move["tokens_after"])) + (" (too noisy to snap)" if move["too_noisy"] else "")
        check = move.get("verification") or {}
        lines.append(f"| {','.join(map(str, move['tokens_before']))} | {moved} | "
                     f"{' '.join(f'{v:.3f}' for v in move['stack_ms_before'])} → {after_ms} | {check.get('reason', '')} |")
    if plot_name:
        lines += ["", f"![staircase]({plot_name})"]
    return "\n".join(lines) + "\n"


def snap_candidates(family, cfg: ViTConfig, candidates: list[dict], batch: int, backend: str, threads: int,
                    rounds: int = DEFAULT_ROUNDS, window: int = DEFAULT_WINDOW, log=None, graph: str = "auto") -> tuple[list[dict], dict]:
    """Profile the block stack near every candidate's budgets, snap each; returns the new
    candidates and a record (the staircase, what each candidate's counts became)."""
    wanted = sorted({t for s in candidates for t in (family.budget_tokens(cfg, s) or [])})
    if not wanted:
        raise VitedgeError(f"family '{family.name}' has no token budget to snap in these candidates; "
                           "drop --snap-budgets")
    counts = token_counts(cfg.num_patches + 1, wanted, window)
    staircase = measure(cfg, counts, batch, backend, threads, rounds, log=log, graph=graph)
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
    m, level = np.asarray(staircase["median_ms"]), np.asarray(staircase["level_ms"])
    tol = _tolerance(staircase["noise_ms"])
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    axes.fill_between(counts, level - tol, level + tol, color="C0", alpha=0.2, label="level ± step tolerance")
    axes.plot(counts, m, ".", color="0.5", markersize=3, label="median per count")
    axes.plot(counts, level, "-", color="C0", linewidth=1, label=f"level (running median of {SMOOTH})")
    labelled = False
    for step in staircase["steps"]:
        if step["last"] > step["first"]:
            axes.hlines(step["median_ms"], step["first"], step["last"], colors="C1", linewidth=2,
                        label=None if labelled else "step")
            labelled = True
    by_count = dict(zip(counts.tolist(), level.tolist()))
    for mark in marks or ():
        for before, after in zip(mark["tokens_before"], mark["tokens_after"]):
            if after != before and before in by_count and after in by_count:
                axes.annotate("", (after, by_count[after]), (before, by_count[before]),
                              arrowprops={"arrowstyle": "->", "color": "C3"})
            axes.plot([before], [by_count.get(before, np.nan)], "o", color="C3", markersize=4)
    axes.set_xlabel("tokens per block")
    form = ", ORT-optimised" if staircase.get("graph") == "optimized" else ""
    axes.set_ylabel(f"{staircase['blocks']} blocks, median ms ({staircase['backend']}{form}, batch {staircase['batch']})")
    axes.set_title(title or "latency staircase", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return True


def profile_tokens(checkpoint, outdir, family: str | None = None, arch: str | None = None,
                   num_heads: int | None = None, low: int | None = None,
                   high: int | None = None, step: int = DEFAULT_STEP, near: list[int] | None = None,
                   window: int = DEFAULT_WINDOW, snap_tokens: list[int] | None = None, batch: int = 1,
                   backend: str = "ort", threads: int = 2, rounds: int = DEFAULT_ROUNDS, warmup: int = 2, log=None,
                   graph: str = "auto") -> dict:
    """Measure the staircase of CHECKPOINT's blocks; OUTDIR gets staircase.json and staircase.png.

    ``near`` and ``snap_tokens`` add every count up to ``window`` above them; ``snap_tokens``
    are also snapped (``"snapped": {t: top of t's step}``). By default ``near`` is the budgeted
    counts of the checkpoint's own settings (``Family.budget_tokens``). ``graph`` (ORT): which form of
    the stack is timed, as in ``measure``; the result's ``graph`` says which one ran.
    """
    from .load import load_model

    check_graph(graph, backend)
    loaded = load_model(checkpoint, family=family, arch=arch, num_heads=num_heads)
    if not loaded.cfg.uniform_width:
        raise VitedgeError("profile-tokens times a stack of equal-width blocks, but this checkpoint's blocks change "
                           "width from stage to stage; time the exported model with `vitedge profile` instead")
    top = loaded.cfg.num_patches + 1
    near = list(near or []) + list(snap_tokens or [])
    if not near:
        near = loaded.family.budget_tokens(loaded.cfg, loaded.settings) or []
        near = [t for t in near if (low or 1) <= t <= (high or top)]
    counts = token_counts(top, near, window, step, low, high)
    staircase = measure(loaded.cfg, counts, batch, backend, threads, rounds, warmup, log=log, graph=graph)
    result = {"family": loaded.family.name, "checkpoint": str(checkpoint), **staircase.to_dict(),
              "snapped": {str(t): snap(staircase, t) for t in snap_tokens or []}}
    with staged_outdir(Path(outdir)) as stage:
        marks = [{"tokens_before": [int(t) for t in result["snapped"]], "tokens_after": list(result["snapped"].values())}]
        result["plot"] = STAIRCASE_PLOT if plot(result, stage / STAIRCASE_PLOT, marks,
                                                f"{loaded.family.name}: latency vs tokens") else None
        write_json_atomic(stage / STAIRCASE_JSON, result)
    return result
