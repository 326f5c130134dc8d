"""vitedge.recipe: YAML recipes, their validation, and how command-line flags override them."""

from __future__ import annotations

import pytest
from support import REPO, read_json

from vitedge.backbone import arch_config
from vitedge.errors import VitedgeError
from vitedge.families import get_family, settings_by_name
from vitedge.recipe import RECIPE_KEYS, load_recipe, merge

SHIPPED = sorted((REPO / "export_recipes").glob("*.yaml"))


def test_no_recipe_is_empty():
    assert load_recipe(None) == {}


def test_recipe_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("family: evit\nkeep_rate: [0.5, 0.7, 0.9]\nsettings:\n  fuse_token: false\n")
    assert load_recipe(path) == {"family": "evit", "keep_rate": [0.5, 0.7, 0.9], "settings": {"fuse_token": False}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert load_recipe(empty) == {}


@pytest.mark.parametrize("text, message", [
    ("family: evit\n  keep_rate: [0.7\n", "is not valid YAML"),
    ("- family\n- evit\n", "must be a mapping of settings"),
    ("family: evit\nkeep_ratio: 0.7\n", r"unknown key\(s\) keep_ratio; known: "),
])
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(VitedgeError, match=message):
        load_recipe(path)


@pytest.mark.parametrize("line, message", [
    ("opset: x", "'opset' must be an integer, got 'x'"),
    ("batch_size: 2.5", "'batch_size' must be an integer"),
    ("img_size: big", "'img_size' must be an integer"),
    ("num_heads: true", "'num_heads' must be an integer"),
    ("family: [evit]", "'family' must be a string"),
    ("dynamic_batch: 'no'", "'dynamic_batch' must be true or false"),
    ("keep_rate: [0.7, fast]", "'keep_rate' must be a number or a list of numbers"),
    ("settings: [1]", "'settings' must be a mapping"),
    ("settings: {prune_blocks: '3,6'}", "'prune_blocks' must be a list of whole numbers"),
    ("settings: {fuse_token: 1}", "'fuse_token' must be true or false"),
    ("validation: {thresholds: [1, 2]}", "'thresholds' must be a mapping of numbers"),
    ("validation: {thresholds: {min_top1_agreement: high}}", "'thresholds' must be a mapping of numbers"),
])
def test_mistyped_values(tmp_path, line, message):
    path = tmp_path / "typo.yaml"
    path.write_text(f"family: evit\n{line}\n")
    with pytest.raises(VitedgeError, match=message):
        load_recipe(path)


def test_well_typed_values(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("family: evit\nopset: 18\nkeep_rate: 1\ndynamic_batch: false\n"
                    "settings: {prune_blocks: [2, 5, 8], fuse_token: true}\n"
                    "validation: {thresholds: {max_abs_logit_diff: null, min_top1_agreement: 1}}\n")
    assert load_recipe(path)["settings"]["prune_blocks"] == [2, 5, 8]


def test_missing_recipe(tmp_path):
    with pytest.raises(VitedgeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_flags_win_over_the_recipe():
    recipe = {"family": "evit", "opset": 17, "keep_rate": 0.5, "settings": {"fuse_token": False, "keep_rate": 0.4}}
    merged = merge(recipe, {"family": None, "opset": 18, "keep_rate": 0.7, "settings": None})
    assert merged["family"] == "evit"  # None flags do not override
    assert merged["opset"] == 18
    assert merged["settings"] == {"fuse_token": False, "keep_rate": 0.7}
    assert "keep_rate" not in merged


def test_recipe_keep_rate_goes_into_settings_and_beats_recipe_settings():
    merged = merge({"keep_rate": 0.5, "settings": {"keep_rate": 0.4}}, {})
    assert merged["settings"] == {"keep_rate": 0.5}
    merged = merge({}, {"settings": {"prune_blocks": [2, 4, 6]}})
    assert merged["settings"] == {"prune_blocks": [2, 4, 6]}


def test_flag_overrides_recipe_in_a_real_export(dynamicvit_artifact):
    """The DynamicViT session artifact: recipe keep_rate 0.5 / opset 17 / thresholds, flag --keep-rate 0.7."""
    meta = read_json(dynamicvit_artifact / "vitedge.json")
    assert meta["settings"]["keep_rate"] == 0.7
    assert meta["arch"]["num_heads"] == 2 and meta["opset"] == 17  # recipe values without a flag
    assert meta["validation"] == {"min_top1_agreement": 0.99, "min_kept_agreement": 0.98, "max_abs_logit_diff": 0.0005}
    assert [s["kept_patches"] for s in meta["token_budgets"]["selections"]] == [34, 24, 16]  # 0.7, not 0.5


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert set(recipe) <= RECIPE_KEYS | set(settings_by_name())  # settings may sit at the top level
    fam = get_family(recipe["family"])
    cfg = arch_config(recipe.get("arch", "vit_fmnist"))
    if "img_size" in recipe:
        cfg = cfg.with_img_size(recipe["img_size"])
    settings = fam.resolve_settings(cfg, merge(recipe, {})["settings"])
    plan = fam.token_plan(cfg, settings)
    if recipe.get("arch") == "deit_small":
        expected = {"evit": [140, 100, 72], "dynamicvit": [138, 97, 68], "evovit": [99, 99],
                    "tome": [197 - 13 * (i + 1) for i in range(12)]}[recipe["family"]]
        assert [s["tokens_after"] for s in plan.selections] == expected
