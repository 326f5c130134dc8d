"""The family registry: each adaptive-ViT family registers itself here with ``@family``.

A family bundles what vitedge needs to know about one paper: its settings (a schema of
``Setting`` declarations: type, default, range, help, label, CLI aliases), how its official
checkpoints are laid out, its reference model (the paper's eval semantics) and the token
counts that its static rewrite fixes per block. Adding a family is one new module and one
line in ``_FAMILY_MODULES``; adding a knob is one ``Setting`` line in its family.
"""

from __future__ import annotations

import importlib
import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbone import ViTConfig
from .. import backbones
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
        return backbones.flops(cfg, [(b.attention, b.mlp) for b in self.blocks]) + self.extra_flops

    def to_dict(self) -> dict:
        return {
            "tokens_per_block": [{"attention": b.attention, "mlp": b.mlp} for b in self.blocks],
            "selections": list(self.selections),
        }


@dataclass(frozen=True)
class Alias:
    """A CLI flag for one setting, kept from before ``--set``: ``--keep-rate 0.7`` is ``--set keep_rate=0.7``.

    ``many``: comma-separated values, one candidate each (``tune``, ``export-bundle``: ``--keep-rates
    0.5,0.7``). ``from_file``: the value comes from a file written by ``vitedge calibrate``.
    """

    flag: str
    many: bool = False
    from_file: bool = False
    help: str = ""


ONE, LIST, ONE_OR_LIST = "one", "list", "one or list"
_KINDS = {float: ("a number", "numbers"), int: ("a whole number", "whole numbers"), bool: ("true or false", "true/false values")}


@dataclass(frozen=True)
class Setting:
    """One knob of a family, declared once. It types and range-checks values wherever they come
    from (``resolve_settings``, recipes, ``--set``), documents the knob (``vitedge families``),
    labels ``vitedge tune`` candidates and bundle variants, and names its CLI aliases.

    ``default`` None means "derived by the family from the model" (e.g. pruning blocks from the
    depth); ``none_means`` makes None itself a valid value (A-ViT's masked graph). ``shape`` is
    ONE value, a LIST, or ONE_OR_LIST (one for every block, or one per block). ``label`` is a
    format string for the value ("keep {}"); ``choices_from`` names the setting that lists this
    one's allowed values (a bundle spans them by default).
    """

    name: str
    type: type
    help: str
    default: object = None
    shape: str = ONE
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    none_means: str = ""
    label: str = ""
    choices_from: str = ""
    aliases: tuple[Alias, ...] = ()
    what: str = ""  # how messages name it, when not by its name ("keep rate")

    @property
    def noun(self) -> str:
        return self.what or self.name

    def describe(self) -> str:
        """What a value must be, e.g. "a number or a list of numbers in (0, 1]"."""
        one, many = _KINDS[self.type]
        kind = {ONE: one, LIST: f"a list of {many}", ONE_OR_LIST: f"{one} or a list of {many}"}[self.shape]
        bounds = self.bounds()
        where = (" in " if bounds[:1] in "([" else " ") + bounds if bounds else ""
        return f"{kind}{where}" + (" or none" if self.none_means else "")

    def bounds(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        if self.maximum is None:
            return f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        if self.minimum is None:
            return f"<= {self.maximum:g}"
        return f"{'(' if self.exclusive_minimum else '['}{self.minimum:g}, {self.maximum:g}]"

    def check(self, value):
        """``value`` typed as declared (ints accepted for numbers, tuples for lists); raises VitedgeError."""
        if value is None and self.none_means:
            return None
        if isinstance(value, (list, tuple)):
            if self.shape == ONE:
                raise VitedgeError(f"{self.noun} takes one value, got the list {list(value)}: {self.help}")
            return [self._scalar(v) for v in value]
        if self.shape == LIST:
            raise VitedgeError(f"{self.noun} must be {self.describe()}, got {value!r}")
        return self._scalar(value)

    def _scalar(self, value):
        wrong_type = isinstance(value, bool) != (self.type is bool) or not isinstance(value, (int, float)) or (
            self.type is int and isinstance(value, float) and not value.is_integer())
        if wrong_type:
            raise VitedgeError(f"{self.noun} must be {self.describe()}, got {value!r}")
        value = self.type(value)
        if self.type is not bool:
            low_fails = self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum)
            high_fails = self.maximum is not None and value > self.maximum
            if low_fails or high_fails or (self.type is float and not math.isfinite(value)):
                bounds = self.bounds() or "finite"
                raise VitedgeError(f"{self.noun} must be {'in ' if bounds[0] in '([' else ''}{bounds}, got {value:g}")
        return value

    def parse(self, text: str):
        """A value from command-line text: "0.7", "3,6,9" (lists comma-separated), "true", "none"."""
        text = text.strip()
        if self.none_means and text.lower() in ("none", "null"):
            return None
        parts = [part.strip() for part in text.split(",")] if self.shape != ONE else [text]
        values = [self._parse_scalar(part) for part in parts if part]
        if not values:
            raise VitedgeError(f"{self.noun} needs a value ({self.describe()})")
        value = values if self.shape == LIST or len(values) > 1 else values[0]
        return self.check(value)

    def _parse_scalar(self, text: str):
        if self.type is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise VitedgeError(f"{self.noun} must be true or false, got {text!r}")
            return lowered in ("true", "1", "yes")
        try:
            number = float(text)
        except ValueError:
            raise VitedgeError(f"{self.noun} must be {self.describe()}, got {text!r}") from None
        return int(number) if self.type is int and number.is_integer() else number

    def format(self, value) -> str:
        """The value as a label shows it: 0.7, 3,6,9, true."""
        if value is None:
            return self.none_means or "none"
        if isinstance(value, (list, tuple)):
            return ",".join(self.format(v) for v in value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return f"{value:g}" if isinstance(value, float) else str(value)

    def label_for(self, value) -> str:
        if value is None and self.none_means:
            return self.none_means.split(" (")[0]
        return self.label.format(self.format(value)) if self.label else f"{self.name}={self.format(value)}"


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
    # Backbone variants (``ViTConfig.features`` names: "layer_scale", "lvvit", ...) that the
    # family's reference handles beyond a DeiT with a class token; others are refused at load.
    backbone_features: frozenset[str] = frozenset()

    settings: tuple[Setting, ...] = ()  # the schema: every knob, declared once

    def check_settings(self, overrides: dict) -> dict:
        """``overrides`` with every name known and every value typed and in range (None: not given)."""
        if overrides and not self.settings:
            raise VitedgeError(f"family '{self.name}' takes no settings (got {', '.join(overrides)})")
        schema = {s.name: s for s in self.settings}
        check_setting_names(self.name, overrides, set(schema))
        checked = {}
        for name, value in overrides.items():
            if value is None and not schema[name].none_means:
                continue
            checked[name] = schema[name].check(value)
        return checked

    def resolve_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        """Defaults merged with ``overrides``, validated; raises VitedgeError on bad values.

        The schema checks names, types and ranges; ``combine_settings`` adds what depends on the
        model or on several settings at once."""
        return self.combine_settings(cfg, self.check_settings(overrides))

    def combine_settings(self, cfg: ViTConfig, given: dict) -> dict:
        """The settings from checked ``given`` values: the family's cross-field rules; defaults by default."""
        return {s.name: given.get(s.name, s.default) for s in self.settings}

    def label(self, overrides: dict, compact: bool = False) -> str:
        """A candidate's label from the settings it sets, in schema order: "224 px keep 0.7".

        ``compact`` joins the parts without spaces for folder names: "224px-keep0.7"."""
        schema = {s.name: s for s in self.settings}
        parts = [schema[name].label_for(overrides[name]) for name in schema if name in overrides]
        parts += [f"{name}={value}" for name, value in overrides.items() if name not in schema]
        if compact:
            return "-".join(part.replace(" ", "") for part in parts) or "default"
        return " ".join(parts) or "default"

    # Settings a variant bundle spans, one static graph per combination (``vitedge export-bundle``);
    # each one's ``choices_from`` gives the values it spans by default. Empty: no bundles.
    bundle_axes: tuple[str, ...] = ()
    # What a bundle's user feeds every variant, after the common preprocessing (SuperViT: a resize in the graph).
    bundle_input_note: str = ""

    def describe_input(self, cfg: ViTConfig, settings: dict) -> dict:
        """Extra fields of vitedge.json's "input" for these settings (e.g. a resize inside the graph)."""
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

    def pending_calibration(self, settings: dict) -> dict:
        """The calibrated settings in ``settings`` not yet resolved on data; all that are given, by default."""
        return {k: settings[k] for k in self.calibrated_settings if settings.get(k) is not None}

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


def settings_by_name() -> dict[str, Setting]:
    """Every family's settings by name, for parsing ``--set`` and typing recipes before the family is known.

    Families that share a name share its meaning and type (a test holds them to it); the widest
    declared shape wins, so that each family's own check decides."""
    _load_all()
    merged: dict[str, Setting] = {}
    for cls in _REGISTRY.values():
        for setting in cls.settings:
            known = merged.get(setting.name)
            if known is None or (known.shape != setting.shape and setting.shape == ONE_OR_LIST):
                merged[setting.name] = setting
            elif known.shape != setting.shape and known.shape != ONE_OR_LIST:
                merged[setting.name] = dataclasses.replace(known, shape=ONE_OR_LIST)
    return merged


def aliases() -> dict[str, tuple[Setting, Alias]]:
    """Every family's CLI alias by flag (``--keep-rate`` → keep_rate), for the commands that take settings."""
    found: dict[str, tuple[Setting, Alias]] = {}
    merged = settings_by_name()
    for cls in _REGISTRY.values():
        for setting in cls.settings:
            for alias in setting.aliases:
                found.setdefault(alias.flag, (merged[setting.name], alias))
    return found


def parse_assignment(text: str) -> tuple[str, object]:
    """``"keep_rate=0.7"`` → ("keep_rate", 0.7), typed by the settings schema; VitedgeError otherwise."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise VitedgeError(f"--set takes NAME=VALUE (e.g. --set keep_rate=0.7), got {text!r}")
    known = settings_by_name()
    if name not in known:
        raise VitedgeError(f"unknown setting '{name}'; the families' settings are: {', '.join(sorted(known))} "
                           "(see 'vitedge families')")
    return name, known[name].parse(value)


def candidate_grid(values: dict[str, list]) -> list[dict]:
    """Every combination of the listed values, in the order given: {a: [1, 2], b: [x]} → [{a: 1, b: x}, {a: 2, b: x}]."""
    names = list(values)
    return [dict(zip(names, combination)) for combination in itertools.product(*(values[n] for n in names))]


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


def keep_rate_setting(default: float, shape: str, help: str, **extra) -> Setting:
    """The keep rate several families share: a share in (0, 1], labelled "keep 0.7", flags --keep-rate(s)."""
    return Setting(
        "keep_rate", float, help, default, shape, minimum=0.0, maximum=1.0, exclusive_minimum=True, label="keep {}",
        what="keep rate",
        aliases=(Alias("--keep-rate", help="Token keep rate in (0, 1] (the family's keep_rate setting)."),
                 Alias("--keep-rates", many=True, help="Keep rates to try, comma-separated (the family's keep_rate).")),
        **extra,
    )


def block_list_setting(name: str, help: str, minimum: int = 0) -> Setting:
    """Block indices (pruning or split blocks); the default comes from the model's depth."""
    return Setting(name, int, help, shape=LIST, minimum=minimum)


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
