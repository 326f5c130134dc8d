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
    return recipe


def merge(recipe: dict, overrides: dict) -> dict:
    """Recipe values with every non-None override on top; ``keep_rate`` goes into settings."""
    merged = {**recipe, **{k: v for k, v in overrides.items() if v is not None and k != "settings"}}
    settings = {**recipe.get("settings", {}), **(overrides.get("settings") or {})}
    if "keep_rate" in merged:
        settings["keep_rate"] = merged.pop("keep_rate")
    merged["settings"] = settings
    return merged
