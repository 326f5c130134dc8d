"""Budget search: the most accurate token budget that meets a latency budget, measured.

FLOP ratios do not predict latency well on small batches (see docs/benchmarks.md), so every
candidate the family offers (``Family.tuning_candidates``: keep rates, per-block budgets, ...)
is exported, proven against its reference on labelled images, and timed on the backend at
hand. The winner is the most accurate candidate whose latency statistic meets the budget; the
whole table, its Pareto front and a plot are written beside it.

On ONNX Runtime each candidate is timed in the form that would run: with ``graph`` "auto"
``vitedge optimize`` runs on it and model.ort.onnx is timed where it passed and was faster.

Some settings are resolved from data (``Family.calibrated_settings``: A-ViT's budget quantile
becomes per-block token budgets). Those candidates are calibrated on a calibration set
(``calibration/*.yaml``) that must not be the images accuracy is ranked on.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .artifact import GRAPHS, Artifact, failed_attempt_dir, staged_outdir, write_json_atomic, write_text_atomic
from .calibrate import calibration_images, load_calibrated
from .data import load_dataset
from .errors import BudgetMissed, ValidationFailed, VitedgeError
from .artifact_export import export
from .profile import profile

STATISTICS = ("p50", "p90", "p99", "mean")
BACKENDS = ("ort", "torch")  # those that time a fresh export; a TensorRT engine needs 'vitedge build' per candidate
TUNE_JSON = "tune.json"
TUNE_MD = "tune.md"
TUNE_PLOT = "tune_pareto.png"


@dataclass
class Candidate:
    """One measured point of the search."""

    settings: dict
    label: str = ""
    flops_ratio: float = 0.0
    latency_ms: float | None = None
    latency: dict = field(default_factory=dict)
    accuracy: float | None = None
    top1_agreement: float | None = None
    meets_budget: bool = False
    pareto: bool = False
    error: str | None = None
    graph: str | None = None  # ORT: the graph timed, "portable" (model.onnx) or "optimized" (model.ort.onnx)
    reverted: str | None = None  # a snapped candidate slower than its original: why it is neither chosen nor on the front
    calibrated: dict = field(default_factory=dict)  # settings the calibration images decided (Family.calibrated_settings)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def eligible(candidate: Candidate) -> bool:
    """Measured, and not a snap that its own timing reverted."""
    return candidate.error is None and candidate.reverted is None


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Eligible candidates that no other is both faster than (or as fast) and more accurate than."""
    measured = [c for c in candidates if eligible(c)]
    front = []
    for c in measured:
        dominated = any(
            o is not c and o.latency_ms <= c.latency_ms and o.accuracy >= c.accuracy
            and (o.latency_ms < c.latency_ms or o.accuracy > c.accuracy)
            for o in measured
        )
        if not dominated:
            front.append(c)
    return sorted(front, key=lambda c: c.latency_ms)


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The most accurate candidate that meets the budget; the faster one on a tie."""
    meeting = [c for c in candidates if eligible(c) and c.meets_budget]
    return max(meeting, key=lambda c: (c.accuracy, -c.latency_ms)) if meeting else None


def _check_arguments(latency_budget_ms, backend, statistic, batch, limit, graph) -> None:
    if latency_budget_ms is None or latency_budget_ms <= 0:
        raise VitedgeError(f"latency budget must be > 0 ms, got {latency_budget_ms}")
    if backend not in BACKENDS:
        raise VitedgeError(f"unknown backend '{backend}'; tune runs on: {', '.join(BACKENDS)}")
    if statistic not in STATISTICS:
        raise VitedgeError(f"unknown latency statistic '{statistic}'; use one of {', '.join(STATISTICS)}")
    if batch < 1:
        raise VitedgeError(f"batch must be >= 1, got {batch}")
    if graph not in GRAPHS:
        raise VitedgeError(f"unknown graph '{graph}'; use one of {', '.join(GRAPHS)}")
    if graph == "optimized" and backend != "ort":
        raise VitedgeError("--graph optimized times model.ort.onnx on ONNX Runtime: use --backend ort")
    if limit is not None and limit < 1:
        raise VitedgeError(f"image limit must be positive, got {limit}")


def tune(
    checkpoint,
    outdir,
    latency_budget_ms: float,
    family: str | None = None,
    arch: str | None = None,
    img_size: int | None = None,
    num_heads: int | None = None,
    candidates: list[dict] | None = None,
    backend: str = "ort",
    data: str | None = None,
    limit: int | None = 2000,
    batch: int = 1,
    statistic: str = "p90",
    iterations: int = 50,
    warmup: int = 10,
    threads: int = 2,
    log=_stderr,
    calib: str | None = None,
    settings: dict | None = None,
    shuffle_seed: int | None = None,
    skip_bad_images: bool = False,
    snap_budgets: bool = False,
    keep_candidates: bool = False,
    graph: str = "auto",
    staircase_rounds: int | None = None,
) -> dict:
    """Search the family's token budgets; OUTDIR gets the winning artifact plus tune.json/.md/.png.

    ``candidates`` overrides the family's grid (a list of settings dicts, one per candidate, as
    ``vitedge families`` names them); ``settings`` hold for every candidate.
    Candidates are labelled by the family's schema ("keep 0.5"). Raises BudgetMissed (exit 4,
    OUTDIR untouched) when no candidate meets the budget, naming the fastest one. ``data`` None:
    Fashion-MNIST for grey models, the bundled samples for RGB ones (which hold no labels of
    the model's classes). ``calib`` is the calibration set (a name in calibration/ or a YAML file)
    that data-dependent settings (``Family.calibrated_settings``) are resolved on (None: the
    model's default set); it must not hold the ``data`` images. ``snap_budgets`` measures the
    latency staircase and adds, after each candidate, the same candidate with its token budgets
    raised to the top of their latency step (vitedge.staircase). ``keep_candidates`` keeps every
    candidate's artifact in OUTDIR/candidates/<i>/ (i: its place in ``candidates`` of the summary),
    for a benchmark that times the graphs again without exporting them again. ``graph`` (ORT): time
    model.ort.onnx where ``vitedge optimize`` wrote it for the candidate ("auto": it passed the
    fidelity check on the tuning images and was faster), model.onnx ("portable"), or always the
    optimised graph ("optimized", written even when not faster); the winner's artifact holds it.
    With ``snap_budgets``, each snapped candidate's graph is then timed against its original's in
    one interleaved run, and a snap measurably slower is reverted (``vitedge.staircase.verify_snap``);
    ``staircase_rounds`` (None: the staircase's default) buys a lower noise on a loaded machine.
    """
    _check_arguments(latency_budget_ms, backend, statistic, batch, limit, graph)
    load_dataset(data, limit, shuffle_seed=shuffle_seed, skip_bad=skip_bad_images)  # checks the source and limit first
    loaded = load_calibrated(checkpoint, family=family, arch=arch, img_size=img_size, num_heads=num_heads,
                             settings=settings, calib=calib, log=log)
    data = data or ("fashion-mnist" if loaded.cfg.in_chans == 1 else "samples")
    dataset = load_dataset(data, limit, shuffle_seed=shuffle_seed, skip_bad=skip_bad_images,
                           in_chans=loaded.cfg.in_chans).for_model(loaded.cfg.num_classes)
    if dataset.labels is None:
        raise VitedgeError(f"tune ranks by accuracy and needs labelled images of this model's classes; {data} has none "
                           "(use fashion-mnist for the Fashion-MNIST models, or a folder with one sub-folder per class)")
    overrides = candidates if candidates is not None else loaded.family.tuning_candidates(loaded.cfg, loaded.settings)
    if not overrides:
        raise VitedgeError("no candidates to try; give at least one settings dict")
    labels = [loaded.family.label(o) for o in overrides]
    grid = [{**loaded.settings, **o} for o in overrides]
    resolved = [loaded.family.resolve_settings(loaded.cfg, settings) for settings in grid]  # all valid before any export
    calibrated = [{} for _ in grid]
    calibration = None
    if any(loaded.family.pending_calibration(s) for s in resolved):
        images, calibration = calibration_images(calib, loaded, ranked_data=data)
        log(f"calibrating {loaded.family.name} candidates on {calibration['name']} ({len(images)} images)")
        grid = loaded.family.calibrate_candidates(loaded.model, loaded.cfg, resolved, images)
        calibrated = [{k: v for k, v in after.items() if before.get(k) != v} for before, after in zip(resolved, grid)]
    graphs = grid if calibration is not None else resolved  # what each candidate exports, defaults filled in
    snapping = None
    if snap_budgets:
        from .staircase import DEFAULT_ROUNDS, add_snapped

        grid, calibrated, snapping = add_snapped(loaded.family, loaded.cfg, graphs, calibrated, batch, backend, threads,
                                                 staircase_rounds or DEFAULT_ROUNDS, log=log, graph=graph)
        graphs = grid
        labels = _with_snapped_labels(labels, calibrated)
    grid, labels, calibrated, same_graph = _drop_repeats(grid, labels, graphs, calibrated,
                                                         loaded.family.calibrated_settings)
    for label, first in same_graph.items():
        log(f"{label} gives the same graph as {first}: measured once")
    log(f"tuning {loaded.family.name} for {statistic} <= {latency_budget_ms:g} ms on {backend}, batch {batch}: "
        f"{len(grid)} candidate(s), {len(dataset)} {dataset.name} images each")

    export_options = {"family": loaded.family.name, "arch": arch, "img_size": loaded.cfg.img_size,
                      "num_heads": loaded.cfg.num_heads, "batch_size": batch, "validate_data": data,
                      "validate_limit": limit, "validate_seed": shuffle_seed, "skip_bad_images": skip_bad_images}
    timing = {"backend": backend, "batch": batch, "iterations": iterations, "warmup": warmup, "threads": threads,
              "histogram": False, "graph": graph if backend == "ort" else "auto"}
    results: list[Candidate] = []
    with staged_outdir(Path(outdir)) as stage:
        for index, settings in enumerate(grid):
            folder = stage / "candidates" / str(index)
            candidate = _measure(checkpoint, folder, settings, labels[index], export_options, timing,
                                 statistic, latency_budget_ms, f"[{index + 1}/{len(grid)}]", log)
            candidate.calibrated = calibrated[index]
            results.append(candidate)
        if snapping is not None:
            _verify_snaps(results, snapping["moves"], stage / "candidates", timing, log)
        for point in pareto_front(results):
            point.pareto = True
        chosen = choose(results)
        if chosen is None:
            raise BudgetMissed(_missed_message(results, statistic, latency_budget_ms, backend))
        winner = stage / "candidates" / str(results.index(chosen))
        for item in winner.iterdir():
            if keep_candidates:
                (shutil.copytree if item.is_dir() else shutil.copy2)(str(item), str(stage / item.name))
            else:
                shutil.move(str(item), stage / item.name)
        if not keep_candidates:
            shutil.rmtree(stage / "candidates")
        summary = _summary(loaded.family.name, results, chosen, latency_budget_ms, statistic, backend, batch,
                           threads, dataset)
        if backend == "ort":
            summary["graph"] = graph
        if calibration is not None:
            summary["calibration"] = calibration
        if same_graph:
            summary["same_graph_as"] = same_graph
        summary["plot"] = TUNE_PLOT if plot_pareto(summary, stage / TUNE_PLOT) else None
        markdown = render_markdown(summary)
        if snapping is not None:
            from .staircase import STAIRCASE_PLOT, markdown as staircase_markdown, plot as plot_staircase

            shown = plot_staircase(snapping["staircase"], stage / STAIRCASE_PLOT, [m for m in snapping["moves"] if m],
                                   f"{loaded.family.name}: latency staircase and snapped budgets")
            snapping["plot"] = STAIRCASE_PLOT if shown else None
            summary["snapping"] = snapping
            markdown += staircase_markdown(snapping, snapping["plot"])
        write_json_atomic(stage / TUNE_JSON, summary)
        write_text_atomic(stage / TUNE_MD, markdown)
        keys = ("budget_ms", "statistic", "backend", "chosen", "calibration")
        Artifact(stage).update_report("tune", {k: summary[k] for k in keys if k in summary})
    log(f"chose {chosen.label}: accuracy {chosen.accuracy:.4f}, {statistic} {chosen.latency_ms:.2f} ms "
        f"(budget {latency_budget_ms:g} ms); table in {Path(outdir) / TUNE_MD}")
    return summary


def _with_snapped_labels(labels: list[str], calibrated: list[dict]) -> list[str]:
    """Labels for a grid where each snapped candidate (``snapped_from`` in its record) follows its original."""
    out, originals = [], iter(labels)
    for record in calibrated:
        out.append(f"{out[-1]} snapped" if "snapped_from" in record else next(originals))
    return out


def _drop_repeats(grid: list[dict], labels: list[str], graphs: list[dict], calibrated: list[dict],
                  recorded_only: tuple[str, ...]) -> tuple:
    """The candidates (and their labels) without repeats of an earlier one's graph, and {repeat label: first label}.

    ``graphs`` are the candidates' resolved settings. Two calibrated candidates often resolve to
    the same graph, and keep 0.7 is keep [0.7, 0.7, 0.7]; settings that are only a record
    (``recorded_only``: the calibrated settings, once resolved) do not make a graph different.
    """
    kept, kept_labels, kept_calibrated, firsts, same_graph = [], [], [], {}, {}
    for settings, label, graph, record in zip(grid, labels, graphs, calibrated):
        key = json.dumps({k: v for k, v in graph.items() if k not in recorded_only}, sort_keys=True, default=str)
        if key in firsts:
            same_graph[label] = firsts[key]
            continue
        firsts[key] = label
        kept.append(settings)
        kept_labels.append(label)
        kept_calibrated.append(record)
    return kept, kept_labels, kept_calibrated, same_graph


def _quiet(message: str) -> None:
    """The per-candidate export logs are noise inside a search."""


def _measure(checkpoint, folder, settings, label, export_options, timing, statistic, budget, step, log) -> Candidate:
    """Export one candidate (validated on the tuning images against its reference) and time it."""
    candidate = Candidate(settings=dict(settings), label=label)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an idle multi-thread torch pool spin-waits and slows the timing that follows
    try:
        report = export(checkpoint, folder, settings=settings, log=_quiet, **export_options)
        if timing["backend"] == "ort" and timing["graph"] != "portable":
            _optimize(folder, timing, export_options)
    except ValidationFailed as exc:
        candidate.error = str(exc)
        log(f"{step} {candidate.label}: skipped, {exc}")
        return candidate
    finally:
        torch.set_num_threads(threads)
    metadata = Artifact(folder).metadata
    candidate.settings = metadata["settings"]
    candidate.flops_ratio = metadata["flops"]["ratio"]
    candidate.accuracy = report["validate"]["exported_accuracy"]
    candidate.top1_agreement = report["validate"]["top1_agreement"]
    stats = profile(folder, **timing)
    candidate.graph = stats.get("graph")
    candidate.latency = {k: stats[f"{k}_ms"] for k in STATISTICS}
    candidate.latency_ms = candidate.latency[statistic]
    candidate.meets_budget = candidate.latency_ms <= budget
    log(f"{step} {candidate.label}: FLOPs {candidate.flops_ratio:.3f}, accuracy {candidate.accuracy:.4f}, "
        f"{statistic} {candidate.latency_ms:.2f} ms {'meets' if candidate.meets_budget else 'misses'} the budget"
        + (f" ({candidate.graph} graph)" if candidate.graph else ""))
    return candidate


def _optimize(folder: Path, timing: dict, export_options: dict) -> None:
    """``vitedge optimize`` on one candidate, its fidelity checked on the tuning images. "auto": a
    graph that fails the check is not used (model.onnx is timed); "optimized": the candidate fails."""
    from .optimize import optimize

    try:
        optimize(folder, export_options["validate_data"], export_options["validate_limit"], threads=timing["threads"],
                 force=timing["graph"] == "optimized", log=_quiet, shuffle_seed=export_options["validate_seed"],
                 skip_bad_images=export_options["skip_bad_images"])
    except ValidationFailed:
        shutil.rmtree(failed_attempt_dir(folder), ignore_errors=True)
        if timing["graph"] == "optimized":
            raise


def _runner(folder: Path, candidate: Candidate, timing: dict):
    """A callable that runs the candidate as it was timed: its ORT graph, or its reference in PyTorch."""
    from .profile import ort_runner, torch_runner

    artifact = Artifact(folder)
    meta = artifact.metadata
    if timing["backend"] == "ort":
        return ort_runner(artifact.ort_model(candidate.graph or "portable")[0], timing["batch"], timing["threads"],
                          meta["input"]["shape"][2])
    from .load import reference_from_metadata

    return torch_runner(reference_from_metadata(meta).model, [timing["batch"], *meta["input"]["shape"][1:]],
                        timing["threads"])


def _verify_snaps(results: list[Candidate], moves: list, folders: Path, timing: dict, log) -> None:
    """Time each snapped candidate's graph against its original's in one interleaved run; a snap
    measurably slower is reverted (``Candidate.reverted``). Each move gets its ``verification``."""
    from .staircase import snap_pairs, verify_snap

    for first, second, move in snap_pairs([c.settings if c.error is None else None for c in results], moves):
        if first is None or second is None:
            move["verification"] = {"kept": None, "reason": "not timed: the original or the snapped graph failed validation"}
            continue
        runs = [_runner(folders / str(index), results[index], timing) for index in (first, second)]
        verdict = verify_snap(*runs)
        move["verification"] = {**verdict, "candidates": [first, second]}
        if not verdict["kept"]:
            results[second].reverted = verdict["reason"]
        log(f"{results[second].label}: {verdict['reason']}")


def _missed_message(results, statistic, budget, backend) -> str:
    measured = [c for c in results if eligible(c)]
    if not measured:
        return "no candidate passed validation against its reference; see 'vitedge validate' on a single export"
    fastest = min(measured, key=lambda c: c.latency_ms)
    return (f"no candidate meets {statistic} <= {budget:g} ms on {backend}; the fastest, {fastest.label}, "
            f"takes {fastest.latency_ms:.2f} ms (raise the budget or add cheaper candidates)")


def _summary(family, results, chosen, budget, statistic, backend, batch, threads, dataset) -> dict:
    return {
        "family": family,
        "budget_ms": budget,
        "statistic": statistic,
        "backend": backend,
        "batch": batch,
        "threads": threads,
        "data": {"name": dataset.name, "images": len(dataset)},
        "candidates": [asdict(c) for c in results],
        "chosen": asdict(chosen),
    }


def render_markdown(summary: dict) -> str:
    stat = summary["statistic"]
    lines = [
        f"# Budget search: {summary['family']}, {stat} <= {summary['budget_ms']:g} ms "
        f"({summary['backend']}, batch {summary['batch']}, {summary['threads']} threads)",
        "",
        f"Accuracy on {summary['data']['images']} {summary['data']['name']} images (the exported graph); "
        "every candidate validated against its reference model. Chosen settings: "
        f"`{json.dumps(summary['chosen']['settings'])}`.",
        "",
        f"| settings | FLOPs ratio | accuracy | top-1 agreement | {stat} ms | meets budget | Pareto |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in summary["candidates"]:
        if c["error"]:
            lines.append(f"| {c['label']} | | | | | failed: {c['error']} | |")
            continue
        chosen = " **chosen**" if c["settings"] == summary["chosen"]["settings"] else ""
        verdict = f"{c['reverted']}" if c.get("reverted") else ("yes" if c["meets_budget"] else "no")
        graph = " (model.ort.onnx)" if c.get("graph") == "optimized" else ""
        lines.append(f"| {c['label']}{chosen}{graph} | {c['flops_ratio']:.3f} | {c['accuracy']:.4f} | "
                     f"{c['top1_agreement']:.4f} | {c['latency_ms']:.2f} | {verdict} | "
                     f"{'yes' if c['pareto'] else ''} |")
    calibration = summary.get("calibration")
    if calibration:
        split = f" {calibration['split']}" if calibration["split"] else ""
        lines += ["", f"Calibrated on {calibration['name']} ({calibration['images']} {calibration['source']}{split} "
                  "images, not the images above):", ""]
        lines += [f"- {c['label']}: " + "; ".join(f"{k} {_value(v)}" for k, v in c["calibrated"].items())
                  for c in summary["candidates"] if c["calibrated"]]
    same_graph = summary.get("same_graph_as")
    if same_graph:
        lines += ["", "Not measured again (the same graph as an earlier candidate): "
                  + ", ".join(f"{label} = {first}" for label, first in same_graph.items()) + "."]
    return "\n".join(lines) + "\n"


def _value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else f"{value}"


def plot_pareto(summary: dict, path: Path) -> bool:
    """Accuracy over latency with the Pareto front and the budget; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [c for c in summary["candidates"] if not c["error"]]
    front = sorted((c for c in measured if c["pareto"]), key=lambda c: c["latency_ms"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([c["latency_ms"] for c in measured], [100 * c["accuracy"] for c in measured], color="0.6", label="candidate")
    ax.plot([c["latency_ms"] for c in front], [100 * c["accuracy"] for c in front], "o-", color="C0", label="Pareto front")
    chosen = summary["chosen"]
    ax.scatter([chosen["latency_ms"]], [100 * chosen["accuracy"]], s=120, facecolors="none", edgecolors="C3",
               linewidths=2, label="chosen")
    ax.axvline(summary["budget_ms"], color="C3", linestyle="--", label="budget")
    for c in measured:
        ax.annotate(c["label"], (c["latency_ms"], 100 * c["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{summary['statistic']} latency, ms ({summary['backend']}, batch {summary['batch']})")
    ax.set_ylabel(f"accuracy on {summary['data']['name']}, %")
    ax.set_title(f"{summary['family']}: accuracy vs latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True
