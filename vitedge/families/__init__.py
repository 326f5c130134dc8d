"""The family registry: each adaptive-ViT family registers itself here with ``@family``.

A family bundles what vitedge needs to know about one paper: its settings (keep rates,
pruning blocks) and their defaults, how its official checkpoints are laid out, its
reference model (the paper's eval semantics) and the token counts that its static rewrite
fixes per block. Adding a family is one new module and one line in ``_FAMILY_MODULES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbone import ViTConfig, block_flops, stem_head_flops
from ..errors import VitedgeError

_FAMILY_MODULES = ("deit", "evit", "dynamicvit", "castling", "evovit", "supervit", "tome", "avit", "ats")

_REGISTRY: dict[str, type[Family]] = {}


@dataclass(frozen=True)
class BlockTokens:
    """Tokens that one block's attention and MLP see (EViT drops between the two)."""

    attention: int
    mlp: int


@dataclass(frozen=True)
class TokenPlan:
    """Constant token counts of a static model: the budgets recorded in vitedge.json."""

    blocks: tuple[BlockTokens, ...]
    selections: tuple[dict, ...] = ()  # one per pruning step: {"block": i, "kept_patches": k, ...}
    extra_flops: int = 0  # selection machinery (predictors) not in the blocks

    def flops(self, cfg: ViTConfig) -> int:
        blocks = sum(block_flops(cfg, b.attention, b.mlp) for b in self.blocks)
        return stem_head_flops(cfg) + blocks + self.extra_flops

    def to_dict(self) -> dict:
        return {
            "tokens_per_block": [{"attention": b.attention, "mlp": b.mlp} for b in self.blocks],
            "selections": list(self.selections),
        }


class Family:
    """Base class; subclasses override what differs. ``settings`` are the family's knobs."""

    name: str = ""  # set by @family
    summary: str = ""
    paper: str = ""
    signature_keys: tuple[str, ...] = ()  # key substrings only this family's checkpoints have
    linear_attention: bool = False  # True: the graph must hold no tensor quadratic in the tokens
    # True where no constant in the static graph depends on the token count (no TopK K, no
    # budgets), so one graph can serve a range of input resolutions.
    resolution_agnostic: bool = False
    kept_order_matters: bool = False  # True: its token outputs are per-patch maps, compared element-wise, not as sets
    # Op types (A-ViT's "Sigmoid") or tensor-name substrings (e.g. "score_predictor") that seed the
    # token-scoring path `vitedge quantize` keeps in float, besides every TopK and its scoring subgraph.
    selection_hint: tuple[str, ...] = ()

    def resolve_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        """Defaults merged with ``overrides``, validated; raises VitedgeError on bad values."""
        if overrides:
            raise VitedgeError(f"family '{self.name}' takes no settings (got {', '.join(overrides)})")
        return {}

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
        """Map an official checkpoint onto our keys (timm's ``checkpoint_filter_fn``).

        Returns the state dict and the keys deliberately dropped (training-only parameters).
        """
        return dict(state_dict), []

    def config_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint as ``infer_config`` reads it (timm keys), for layouts without ``attn.qkv``."""
        return state_dict

    def reference(self, cfg: ViTConfig, settings: dict) -> nn.Module:
        raise NotImplementedError

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        raise NotImplementedError

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        """Settings overrides that ``vitedge tune`` tries, cheapest last; the trained setting alone by default."""
        return [{}]

    # Settings that ``vitedge tune`` resolves on calibration images before exporting a candidate
    # (A-ViT's "budget_quantile" → "token_budgets"); a candidate with none of them needs no data.
    calibrated_settings: tuple[str, ...] = ()

    def calibrate_candidates(self, model: nn.Module, cfg: ViTConfig, candidates: list[dict],
                             images: np.ndarray) -> list[dict]:
        """Candidates (full settings) with their data-dependent settings resolved on ``images``
        (normalised NCHW calibration images, never the ones accuracy is measured on); ``model``
        is the loaded reference. Unchanged by default."""
        return candidates

    def default_thresholds(self, settings: dict) -> dict:
        """Validation thresholds these settings call for, when the recipe gives none (A-ViT budgets)."""
        return {}

    def budget_tokens(self, cfg: ViTConfig, settings: dict) -> list[int] | None:
        """Tokens the blocks see after each budgeted step of these settings (what
        ``vitedge tune --snap-budgets`` may raise to the top of its latency step); None where
        the settings fix no token budget."""
        return None

    def with_budget_tokens(self, cfg: ViTConfig, settings: dict, limits: list[int]) -> dict:
        """Settings whose ``budget_tokens`` are as large as possible but at most ``limits``
        (one per step) and never below those of ``settings``."""
        raise VitedgeError(f"family '{self.name}' has no token budget to set")

    def kept_summary(self, reference_kept: list) -> dict:
        """Statistics of the reference's kept tokens [images, k] per selection for the validation
        report (A-ViT: blocks run per token, live tokens per block); none by default."""
        return {}


def family(name: str):
    """Class decorator that registers a Family subclass under ``name``."""

    def register(cls: type[Family]) -> type[Family]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def _load_all() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def get_family(name: str) -> Family:
    _load_all()
    if name not in _REGISTRY:
        raise VitedgeError(f"unknown family '{name}'; available: {', '.join(available_families())}")
    return _REGISTRY[name]()


def available_families() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def detect_family(state_dict: dict) -> str | None:
    """The family whose signature keys a state dict carries, if any (used in error messages)."""
    _load_all()
    for name, cls in _REGISTRY.items():
        keys = cls().signature_keys
        if keys and any(any(sig in key for sig in keys) for key in state_dict):
            return name
    return None


KEEP_RATE_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def keep_rate_candidates(rates=KEEP_RATE_GRID) -> list[dict]:
    """One keep rate for every pruning block, the grid ``vitedge tune`` searches for keep-rate families."""
    return [{"keep_rate": rate} for rate in rates]


def default_prune_blocks(depth: int) -> list[int]:
    """Blocks 3, 6, 9 for the usual depth 12; the same quarters of the depth otherwise."""
    return [depth // 4, depth // 2, 3 * depth // 4]


def check_setting_names(family_name: str, overrides: dict, allowed: set[str]) -> None:
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise VitedgeError(
            f"family '{family_name}' has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(allowed))}"
        )


def blocks_and_keep_rates(blocks, rate, depth: int) -> tuple[list[int], list[float]]:
    """Pruning blocks in increasing order, each with its keep rate.

    ``rate`` is one keep rate for every block or a list paired with ``blocks`` as given, so
    ``blocks=[9, 3], rate=[0.5, 0.7]`` gives block 3 the rate 0.7.
    """
    ordered = check_prune_blocks(blocks, depth)
    rates = list(rate) if isinstance(rate, (list, tuple)) else [rate] * len(ordered)
    if len(rates) != len(ordered):
        raise VitedgeError(f"{len(rates)} keep rates given for {len(ordered)} pruning blocks {ordered}")
    by_block = dict(zip((int(b) for b in blocks), (check_keep_rate(r) for r in rates)))
    return ordered, [by_block[b] for b in ordered]


def check_keep_rate(value, allowed: tuple[float, ...] | None = None) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise VitedgeError(f"keep rate must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < rate <= 1.0:
        raise VitedgeError(f"keep rate must be in (0, 1], got {rate:g}")
    if allowed is not None and rate not in allowed:
        raise VitedgeError(f"keep rate {rate:g} is not one this model was trained for; use one of {allowed}")
    return rate


def check_prune_blocks(blocks, depth: int) -> list[int]:
    try:
        blocks = [int(b) for b in blocks]
    except (TypeError, ValueError):
        raise VitedgeError(f"prune blocks must be a list of block indices, got {blocks!r}") from None
    if not blocks or min(blocks) < 0 or max(blocks) >= depth or len(set(blocks)) != len(blocks):
        raise VitedgeError(f"prune blocks {blocks} must be distinct block indices in 0..{depth - 1}")
    return sorted(blocks)
