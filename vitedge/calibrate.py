"""Calibrate per-block token budgets of a halting model (A-ViT) on real images.

A-ViT decides per image how many tokens run in each block; a static graph needs a constant
count. ``calibrate`` runs the reference model on calibration images (Fashion-MNIST's
*train* split, never the test images that validation uses), records the live tokens per
block, and picks budgets: a quantile of those counts (class token added, rounded up to a
multiple of 8), or the largest quantile that meets a FLOPs target. The result is a small
JSON file meant to be committed (``calibration/<model>-avit-budgets.json``) and passed to
``vitedge export --budgets FILE``.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path

from .artifact import write_json_atomic
from .backbone import dense_flops
from .data import InputSpec, check_source, load_dataset
from .errors import VitedgeError
from .reading import read_json
from .schema import BUDGETS, check
from .load import LoadedModel, load_model
from .recipe import load_recipe, merge

BUDGETS_KIND = "vitedge-token-budgets"
DEFAULT_QUANTILE = 0.99
DEFAULT_LIMIT = 2000


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _require_avit(loaded: LoadedModel) -> None:
    if loaded.family.name != "avit":
        raise VitedgeError(f"token budgets are calibrated for halting models (family 'avit'); this checkpoint is '{loaded.family.name}'")


def with_budgets(loaded: LoadedModel, budgets: list[int], quantile: float | None = None) -> LoadedModel:
    """``loaded`` with constant token budgets in its settings and plan (the reference model is unchanged);
    ``quantile``, when the budgets were calibrated just now, is recorded as ``budget_quantile``."""
    _require_avit(loaded)
    overrides = {**loaded.settings, "token_budgets": budgets}
    if quantile is not None:
        overrides["budget_quantile"] = quantile
    settings = loaded.family.resolve_settings(loaded.cfg, overrides)
    return dataclasses.replace(loaded, settings=settings, plan=loaded.family.token_plan(loaded.cfg, settings))


def measure_live_patches(loaded: LoadedModel, data: str = "fashion-mnist", limit: int | None = DEFAULT_LIMIT,
                         batch_size: int = 100):
    """Live patch tokens per block and image [images, depth] of the reference model on calibration images."""
    import torch

    from .families.avit import live_patch_counts

    _require_avit(loaded)
    dataset = load_dataset(data, limit, split="train")
    spec = InputSpec(loaded.cfg.img_size, loaded.cfg.in_chans, tuple(loaded.mean), tuple(loaded.std))
    with torch.inference_mode():
        counts = live_patch_counts(loaded.model, (images for images, _ in dataset.batches(spec, batch_size)))
    return counts, dataset.name


def choose_budgets(loaded: LoadedModel, counts, quantile: float | None = None, flops_ratio: float | None = None):
    """Budgets for a quantile, or for the largest quantile whose FLOPs ratio to dense is at most ``flops_ratio``.

    Returns (budgets, quantile used).
    """
    from .families.avit import budgets_from_counts, check_quantile

    tokens = loaded.cfg.num_patches + 1
    if flops_ratio is None:
        quantile = check_quantile(DEFAULT_QUANTILE if quantile is None else quantile)
        return budgets_from_counts(counts, quantile, tokens), quantile
    if quantile is not None:
        raise VitedgeError("give a quantile or a FLOPs target, not both")
    if not 0.0 < flops_ratio <= 1.0:
        raise VitedgeError(f"FLOPs target must be a ratio to dense in (0, 1], got {flops_ratio:g}")

    def ratio(q: float) -> float:
        return with_budgets(loaded, budgets_from_counts(counts, q, tokens)).plan.flops(loaded.cfg) / dense_flops(loaded.cfg)

    low, high = 1.0 / len(counts), 1.0
    if ratio(low) > flops_ratio:
        raise VitedgeError(f"FLOPs target {flops_ratio:g} is below what any quantile reaches ({ratio(low):.3f}); raise it")
    if ratio(high) <= flops_ratio:
        return budgets_from_counts(counts, high, tokens), high
    for _ in range(30):  # budgets are a step function of q: bisect to the largest q that meets the target
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) <= flops_ratio else (low, middle)
    return budgets_from_counts(counts, low, tokens), round(low, 6)


def calibrate(
    checkpoint,
    output_file,
    data: str = "fashion-mnist",
    quantile: float | None = None,
    flops_ratio: float | None = None,
    limit: int | None = DEFAULT_LIMIT,
    family: str | None = None,
    num_heads: int | None = None,
    settings: dict | None = None,
    recipe=None,
    log=_stderr,
) -> dict:
    """checkpoint → budgets file (JSON): live tokens per block on ``data`` and the chosen budgets.

    ``recipe`` is an export recipe (family, num_heads, settings such as the gates), so that
    calibration sees the model the export will build. Raises VitedgeError on bad input before
    anything is written; the file lands atomically.
    """
    from .families.avit import check_quantile, halting_summary

    if quantile is not None:
        check_quantile(quantile)
    check_source(data, limit)
    output_file = Path(output_file)
    if not output_file.parent.is_dir():
        raise VitedgeError(f"output folder {output_file.parent} does not exist")
    options = merge(load_recipe(recipe), {"family": family, "num_heads": num_heads, "settings": settings})
    loaded = load_model(checkpoint, family=options.get("family"), arch=options.get("arch"), settings=options["settings"],
                        img_size=options.get("img_size"), num_heads=options.get("num_heads"))
    _require_avit(loaded)
    log(f"measuring live tokens per block on {data} (train split{f', {limit} images' if limit else ''})")
    counts, source = measure_live_patches(loaded, data, limit)
    budgets, used = choose_budgets(loaded, counts, quantile, flops_ratio)
    budgeted = with_budgets(loaded, budgets)
    cfg = loaded.cfg
    result = {
        "kind": BUDGETS_KIND,
        "family": "avit",
        "checkpoint": {"path": str(loaded.checkpoint.path), "sha256": loaded.checkpoint.sha256},
        "arch": cfg.to_dict(),
        "settings": {k: v for k, v in loaded.settings.items() if k != "token_budgets"},
        "data": {"source": source, "split": "train", "images": int(len(counts))},
        "quantile": used,
        "flops_ratio_target": flops_ratio,
        "token_budgets": budgets,
        "flops": {"dense": dense_flops(cfg), "static": budgeted.plan.flops(cfg),
                  "ratio": round(budgeted.plan.flops(cfg) / dense_flops(cfg), 4)},
        "halting": halting_summary(counts, cfg.num_patches),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(output_file, result)
    log(f"budgets {budgets} (quantile {used:g}, FLOPs {result['flops']['ratio']:.3f} of dense), "
        f"mean depth {result['halting']['mean_depth']:.2f} of {cfg.depth} blocks -> {output_file}")
    return result


def read_budgets(path, loaded: LoadedModel) -> list[int]:
    """The budgets in a calibration file, checked against the model they are for."""
    content = read_json(path, "budgets file")
    if not isinstance(content, dict) or content.get("kind") != BUDGETS_KIND or "token_budgets" not in content:
        raise VitedgeError(f"{path} is not a vitedge budgets file; write one with 'vitedge calibrate'")
    check(content, BUDGETS, path, "budgets file")
    _require_avit(loaded)
    cfg = loaded.cfg
    arch = content.get("arch") or {}
    tokens = cfg.num_patches + 1
    theirs = (arch.get("depth"), (arch.get("img_size", 0) // max(1, arch.get("patch_size", 1))) ** 2 + 1, arch.get("embed_dim"))
    if theirs != (cfg.depth, tokens, cfg.embed_dim):
        raise VitedgeError(
            f"{path} holds budgets for a model with {theirs[0]} blocks, {theirs[1]} tokens, {theirs[2]} channels; "
            f"this one has {cfg.depth}, {tokens}, {cfg.embed_dim}: calibrate this model"
        )
    sha = (content.get("checkpoint") or {}).get("sha256")
    if sha != loaded.checkpoint.sha256:
        raise VitedgeError(f"{path} was calibrated for another checkpoint (sha256 differs from {loaded.checkpoint.path}); "
                           "re-run 'vitedge calibrate' on this one")
    gates = {k: (content.get("settings") or {}).get(k) for k in ("gate_scale", "gate_center")}
    if gates != {k: loaded.settings[k] for k in gates}:
        raise VitedgeError(f"{path} was calibrated with gates {gates}, this export uses "
                           f"gate_scale {loaded.settings['gate_scale']:g}, gate_center {loaded.settings['gate_center']:g}; re-calibrate")
    return list(content["token_budgets"])


__all__ = ["calibrate", "choose_budgets", "measure_live_patches", "read_budgets", "with_budgets"]
