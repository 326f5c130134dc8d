"""Export recipes: YAML files that hold an export's settings; CLI flags override them.

Family settings are typed by the families' schema (``Setting``), under ``settings:`` or, as a
shorthand, at the top level (``NAME: value``); the other keys are typed here.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import VitedgeError
from .families import settings_by_name
from .reading import read_yaml

RECIPE_KEYS = {
    "family", "arch", "num_heads", "img_size", "opset", "batch_size", "dynamic_batch",
    "settings", "validation", "dynamic_resolution", "transform",
}


def load_recipe(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    recipe = read_yaml(path, "recipe") or {}
    if not isinstance(recipe, dict):
        raise VitedgeError(f"recipe {path} must be a mapping of settings")
    schema = settings_by_name()
    unknown = set(recipe) - RECIPE_KEYS - set(schema)
    if unknown:
        raise VitedgeError(f"recipe {path} has unknown key(s) {', '.join(sorted(unknown))}; known: "
                           f"{', '.join(sorted(RECIPE_KEYS))} and the families' settings (see 'vitedge families')")
    for key, value in [*recipe.items(), *_nested(recipe, "validation")]:
        expected = _TYPES.get(key)
        if expected is not None and value is not None and not expected[1](value):
            raise VitedgeError(f"recipe {path}: '{key}' must be {expected[0]}, got {value!r}")
    for key, value in [*((k, v) for k, v in recipe.items() if k in schema), *_nested(recipe, "settings")]:
        if key in schema and value is not None:
            try:
                schema[key].check(value)
            except VitedgeError:
                raise VitedgeError(f"recipe {path}: '{key}' must be {schema[key].describe()}, got {value!r}") from None
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
    "dynamic_batch": _BOOLEAN,
    "settings": _MAPPING, "validation": _MAPPING,
    "transform": ("a preset name, 'key=value,...' text or a mapping", lambda v: isinstance(v, (str, dict))),
    "thresholds": ("a mapping of numbers", lambda v: isinstance(v, dict) and all(x is None or _number(x) for x in v.values())),
}


def merge(recipe: dict, overrides: dict) -> dict:
    """Recipe values with every non-None override on top; family settings given at the top level
    (recipe shorthand, ``NAME: value``) go into ``settings`` and win over the recipe's."""
    schema = settings_by_name()
    given = {k: v for k, v in overrides.items() if v is not None and k != "settings"}
    settings = {**recipe.get("settings", {}), **{k: v for k, v in recipe.items() if k in schema},
                **{k: v for k, v in given.items() if k in schema}, **(overrides.get("settings") or {})}
    merged = {k: v for k, v in {**recipe, **given}.items() if k not in schema}
    merged["settings"] = settings
    return merged
