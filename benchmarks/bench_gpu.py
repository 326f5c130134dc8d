"""GPU latency: the official dynamic PyTorch models against vitedge's static ones (issue 17, item 4).

Per family of bench_families.ROWS (DeiT-S shapes; Castling on DeiT-T) and per batch and precision,
one interleaved run times:

  official        the official-style dynamic model (bench_families.official_model), eager
  static          vitedge's static rewrite of the same weights (vitedge.rewrite.to_static), eager
  static+graph    the static model captured once in a torch.cuda.CUDAGraph and replayed: constant
                  token counts make the capture valid
  official+graph  the same capture tried on the official model; a data-dependent shape or a host
                  sync makes it fail, and the failure is recorded as the result
  dense, dense+graph  a dense DeiT of the same shape, eager and replayed: the ratios' base

Timing: CUDA synchronised wall clock around ``--runs`` calls, so the eager rows include the Python
and kernel-launch cost that batch 1 is made of; medians over ``--rounds`` rounds in a rotating
order, 95 % bootstrap intervals of the ratios (rounds resampled, pairs kept). Accuracy beside
every speedup: top-1 agreement and the largest logit difference of each variant against the
official model in fp32 on the same ``--agreement-images`` random images (random weights: no
labels, so agreement is the accuracy that can move). A-ViT's gate is set so that its tokens halt
(bench_families.row_overrides), as in the CPU table.

It never runs in CI. On a lent GPU machine (the device tool), from the repository root:

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --output $OUT/gpu.json

and here, to write the table into docs/benchmarks.md from what came back:

    python benchmarks/bench_gpu.py --render-only --output <files_at>/gpu.json

A CPU smoke run (no graphs, no fp16): python benchmarks/bench_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_families import ROWS, official_model, row_overrides  # noqa: E402
from bench_token_pruning import ratio_ci, write_doc_section  # noqa: E402
from vitedge.backbone import ARCHS  # noqa: E402
from vitedge.families import get_family  # noqa: E402
from vitedge.rewrite import to_static  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output (the static models also return their kept tokens)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def eager_call(model: torch.nn.Module, x: torch.Tensor):
    def call():
        with torch.no_grad():
            return logits_of(model(x))
    return call


def graph_call(model: torch.nn.Module, x: torch.Tensor):
    """Capture one forward of ``model`` on ``x`` in a CUDA graph; the call replays it.

    Raises whatever the capture raises (a host sync, a data-dependent shape): that is the result
    for a model that cannot be captured."""
    static_input = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture: lazy allocations, cuBLAS handles
            model(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = logits_of(model(static_input))

    def call():
        graph.replay()
        return captured
    return call


def timed(calls: dict, rounds: int, runs: int, warmup: int, synchronize) -> dict[str, list[float]]:
    """ms per call for each variant, ``rounds`` rounds of ``runs`` calls, order rotated every round."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    synchronize()
    samples = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        if (index // len(names)) % 2:
            order = order[::-1]
        for name in order:
            synchronize()
            start = time.perf_counter()
            for _ in range(runs):
                calls[name]()
            synchronize()
            samples[name].append((time.perf_counter() - start) * 1000.0 / runs)
    return samples


def agreement(call_on, images: torch.Tensor, expected: torch.Tensor, batch: int) -> dict:
    """Top-1 agreement and largest logit difference of ``call_on(x)`` against ``expected`` over ``images``."""
    outputs = [call_on(images[i:i + batch]).float() for i in range(0, len(images) - batch + 1, batch)]
    got = torch.cat(outputs)
    want = expected[: len(got)]
    return {"top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float((got - want).abs().max()), "images": int(len(got))}


def run_family(name: str, args, device: torch.device) -> dict:
    arch, overrides, label = ROWS[name] if name != "deit" else ("deit_small", {}, "dense DeiT")
    cfg = ARCHS[args.arch or arch]
    family, dense_family = get_family(name), get_family("deit")
    overrides, calibrated = row_overrides(name, cfg, overrides)
    settings = family.resolve_settings(cfg, overrides)
    torch.manual_seed(0)
    reference = family.reference(cfg, settings).eval()
    dense = dense_family.reference(cfg, {}).eval()
    official, official_what = official_model(name, reference)
    static = to_static(reference, family.token_plan(cfg, settings))
    dense_static = to_static(dense, dense_family.token_plan(cfg, {}))
    generator = torch.Generator().manual_seed(1)
    pool = torch.randn(args.agreement_images, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
    with torch.no_grad():
        expected = logits_of(official.to(device).float()(pool.to(device))).float()
    out = {"label": label, "arch": args.arch or arch, "settings": settings, "official_model": official_what, **calibrated,
           "runs": {}}
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for precision in args.precisions:
        dtype = PRECISIONS[precision]
        models = {"static": static, "dense": dense_static, "official": official}  # the official capture last: it may fail
        for model in models.values():
            model.to(device=device, dtype=dtype)
        for batch in args.batches:
            print(f"{name} {precision} batch {batch}", file=sys.stderr, flush=True)
            x = pool[:batch].to(device=device, dtype=dtype)
            calls, failures = {}, {}
            for variant, model in models.items():
                calls[variant] = eager_call(model, x)
                if device.type == "cuda":
                    try:
                        calls[f"{variant}+graph"] = graph_call(model, x)
                    except Exception as exc:  # noqa: BLE001 - the reason a capture fails is the result
                        failures[f"{variant}+graph"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        torch.cuda.synchronize()
            samples = timed(calls, args.rounds, args.runs, args.warmup, synchronize)
            medians = {v: float(np.median(s)) for v, s in samples.items()}
            ratios = {v: {"vs_official": medians[v] / medians["official"],
                          "vs_official_ci95": ratio_ci(samples, v, "official"),
                          "vs_dense": medians[v] / medians["dense"], "vs_dense_ci95": ratio_ci(samples, v, "dense")}
                      for v in samples}
            if "dense+graph" in samples:
                for v in ("static+graph", "official+graph"):
                    if v in samples:
                        ratios[v].update(vs_dense_graph=medians[v] / medians["dense+graph"],
                                         vs_dense_graph_ci95=ratio_ci(samples, v, "dense+graph"))
            fidelity = {v: agreement(lambda images, m=models[v]: eager_call(m, images.to(device=device, dtype=dtype))(),
                                     pool, expected, batch) for v in ("official", "static")}
            if "static+graph" in calls:  # the replay computes what eager does on the captured batch
                with torch.no_grad():
                    eager = calls["static"]().float()
                fidelity["static+graph"] = {"max_abs_diff_vs_static_eager": float((calls["static+graph"]().float() - eager).abs().max())}
            out["runs"][f"{precision}/b{batch}"] = {"precision": precision, "batch": batch, "median_ms": medians,
                                                   "ratios": ratios, "capture_failed": failures, "fidelity": fidelity}
        for model in models.values():
            model.to(device="cpu", dtype=torch.float32)
    return out


def environment(args, device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"date": time.strftime("%Y-%m-%d"), "device": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None, "rounds": args.rounds, "runs": args.runs,
            "warmup": args.warmup, "batches": args.batches, "precisions": args.precisions,
            "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])}


def fmt(ratio: dict, key: str) -> str:
    if key not in ratio:
        return "—"
    low, high = ratio[f"{key}_ci95"]
    return f"{ratio[key]:.3f} [{low:.3f}, {high:.3f}]"


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [BEGIN, "## GPU: official dynamic PyTorch vs vitedge static, eager and CUDA-graph replay (issue 17, item 4)", "",
             f"Measured {env['date']} on {env['device']}, torch {env['torch']}, CUDA {env['cuda']}; "
             f"{env['rounds']} interleaved rounds of {env['runs']} calls per variant, medians, 95 % bootstrap intervals. "
             "Random weights; agreement is top-1 agreement with the official model in fp32 on the same random images. "
             "Reproduce: `python benchmarks/bench_gpu.py` on a GPU machine (never in CI).", "",
             "| model | precision | batch | official eager ms | static eager / official | static+graph / official "
             "| static+graph / dense+graph | official capturable | top-1 agreement official / static |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family in record["families"].values():
        for run in family["runs"].values():
            ratios, fid = run["ratios"], run["fidelity"]
            capturable = "yes" if "official+graph" in run["median_ms"] else (
                "no: " + run["capture_failed"]["official+graph"][:80] if "official+graph" in run["capture_failed"] else "—")
            lines.append(f"| {family['label']} | {run['precision']} | {run['batch']} | {run['median_ms']['official']:.3f} "
                         f"| {fmt(ratios['static'], 'vs_official')} | {fmt(ratios.get('static+graph', {}), 'vs_official')} "
                         f"| {fmt(ratios.get('static+graph', {}), 'vs_dense_graph')} | {capturable} "
                         f"| {fid['official']['top1_agreement']:.3f} / {fid['static']['top1_agreement']:.3f} |")
    lines += ["", END, ""]
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="deit," + ",".join(ROWS), help="comma-separated (default: dense and all eight)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "fp16"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--agreement-images", type=int, default=64)
    parser.add_argument("--arch", choices=sorted(ARCHS), help="one shape for every family (default: the table's)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 run, 1 warm-up, 8 images; nothing written to docs")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the JSON record")
    parser.add_argument("--no-doc", action="store_true", help="write only the JSON, not docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true", help="write the docs section from --output's JSON")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families.split(",") if f != "deit" and f not in ROWS]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from deit, {', '.join(ROWS)}")
    if min(args.batches) < 1 or args.rounds < 1 or args.runs < 1 or args.agreement_images < max(args.batches):
        parser.error("batches, rounds and runs must be >= 1, and --agreement-images at least the largest batch")
    if args.quick:
        args.rounds, args.runs, args.warmup, args.agreement_images = 2, 1, 1, max(8, max(args.batches))
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.render_only:
        if not args.output.is_file():
            sys.exit(f"error: {args.output} does not exist; run the benchmark first")
        write_doc_section(DOC, BEGIN, END, markdown(json.loads(args.output.read_text())), "# Benchmarks\n\n")
        print(f"wrote the GPU section of {DOC}")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run it on a GPU machine, or --device cpu for a smoke run")
    if device.type == "cpu":
        args.precisions = [p for p in args.precisions if p == "fp32"]  # CPU half kernels say nothing about a GPU
    record = {"environment": environment(args, device), "families": {}}
    for name in args.families.split(","):
        try:
            record["families"][name] = run_family(name, args, device)
        except Exception as exc:  # noqa: BLE001 - one family failing on this device is a result; the others still run
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            record.setdefault("failed", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=1))  # after every family: a killed run keeps what it has
    print(markdown(record))
    if not (args.quick or args.no_doc):
        write_doc_section(DOC, BEGIN, END, markdown(record), "# Benchmarks\n\n")


if __name__ == "__main__":
    main()
