"""Export recipes: YAML files that hold an export's settings; CLI flags override them."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import VitedgeError
from .reading import read_yaml

RECIPE_KEYS = {
    "family", "arch", "num_heads", "img_size", "opset", "batch_size", "dynamic_batch",
    "settings", "keep_rate", "validation", "dynamic_resolution",
}


def load_recipe(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    recipe = read_yaml(path, "recipe") or {}
    if not isinstance(recipe, dict):
        raise VitedgeError(f"recipe {path} must be a mapping of settings")
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise VitedgeError(f"recipe {path} has unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(RECIPE_KEYS))}")
    for key, value in [*recipe.items(), *_nested(recipe, "settings"), *_nested(recipe, "validation")]:
        expected = _TYPES.get(key)
        if expected is not None and value is not None and not expected[1](value):
            raise VitedgeError(f"recipe {path}: '{key}' must be {expected[0]}, got {value!r}")
    return recipe


def _number(value) -> bool:
    """A finite int or float (YAML's .nan and .inf would switch checks off or overflow sizes)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nested(recipe: dict, key: str) -> list:
    value = recipe.get(key)
    return list(value.items()) if isinstance(value, dict) else []


# What each value must be, so a mistyped value is one clear line rather than a crash mid-export.
_STRING = ("a string", lambda v: isinstance(v, str))
_INTEGER = ("an integer", _integer)
_BOOLEAN = ("true or false", lambda v: isinstance(v, bool))
_MAPPING = ("a mapping", lambda v: isinstance(v, dict))
_TYPES = {
    "family": _STRING, "arch": _STRING, "dynamic_resolution": ("a 'MIN:MAX' string such as '224:1024'", lambda v: isinstance(v, str)),
    "num_heads": _INTEGER, "img_size": _INTEGER, "opset": _INTEGER, "batch_size": _INTEGER,
    "dynamic_batch": _BOOLEAN, "fuse_token": _BOOLEAN,
    "settings": _MAPPING, "validation": _MAPPING,
    "thresholds": ("a mapping of numbers", lambda v: isinstance(v, dict) and all(x is None or _number(x) for x in v.values())),
    "keep_rate": ("a number or a list of numbers", lambda v: _number(v) or (isinstance(v, list) and all(map(_number, v)))),
    "prune_blocks": ("a list of integers", lambda v: isinstance(v, list) and all(map(_integer, v))),
    "merge_count": ("an integer or a list of integers", lambda v: _integer(v) or (isinstance(v, list) and all(map(_integer, v)))),
    "inflection": ("a number", _number),
    "prop_attn": _BOOLEAN,
    "gate_scale": ("a number", _number), "gate_center": ("a number", _number),
}


def merge(recipe: dict, overrides: dict) -> dict:
    """Recipe values with every non-None override on top; ``keep_rate`` goes into settings."""
    merged = {**recipe, **{k: v for k, v in overrides.items() if v is not None and k != "settings"}}
    settings = {**recipe.get("settings", {}), **(overrides.get("settings") or {})}
    if "keep_rate" in merged:
        settings["keep_rate"] = merged.pop("keep_rate")
    merged["settings"] = settings
    return merged
