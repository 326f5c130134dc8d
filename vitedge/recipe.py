"""Export recipes: YAML files that hold an export's settings; CLI flags override them."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import VitedgeError

RECIPE_KEYS = {
    "family", "arch", "num_heads", "img_size", "opset", "batch_size", "dynamic_batch",
    "settings", "keep_rate", "validation",
}


def load_recipe(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise VitedgeError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VitedgeError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise VitedgeError(f"recipe {path} must be a mapping of settings")
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise VitedgeError(f"recipe {path} has unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(RECIPE_KEYS))}")
    for key, value in [*recipe.items(), *_nested(recipe, "settings"), *_nested(recipe, "validation")]:
        kind = _TYPES.get(key)
        if kind is not None and value is not None and not _is(value, kind):
            raise VitedgeError(f"recipe {path}: '{key}' must be {kind}, got {value!r}")
    return recipe


# What each value must be, so a mistyped value is one clear line rather than a crash mid-export.
_TYPES = {
    "family": "a string", "arch": "a string", "num_heads": "an integer", "img_size": "an integer",
    "opset": "an integer", "batch_size": "an integer", "dynamic_batch": "true or false",
    "settings": "a mapping", "validation": "a mapping", "thresholds": "a mapping of numbers",
    "keep_rate": "a number or a list of numbers", "prune_blocks": "a list of integers", "fuse_token": "true or false",
}


def _nested(recipe: dict, key: str) -> list:
    value = recipe.get(key)
    return list(value.items()) if isinstance(value, dict) else []


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is(value, kind: str) -> bool:
    if kind == "a string":
        return isinstance(value, str)
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == "a mapping":
        return isinstance(value, dict)
    if kind == "a mapping of numbers":
        return isinstance(value, dict) and all(v is None or _number(v) for v in value.values())
    if kind == "a list of integers":
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return _number(value) or (isinstance(value, list) and all(_number(v) for v in value))  # keep_rate


def merge(recipe: dict, overrides: dict) -> dict:
    """Recipe values with every non-None override on top; ``keep_rate`` goes into settings."""
    merged = {**recipe, **{k: v for k, v in overrides.items() if v is not None and k != "settings"}}
    settings = {**recipe.get("settings", {}), **(overrides.get("settings") or {})}
    if "keep_rate" in merged:
        settings["keep_rate"] = merged.pop("keep_rate")
    merged["settings"] = settings
    return merged
