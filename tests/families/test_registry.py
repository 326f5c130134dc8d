"""The family registry and the setting validators every family shares."""

from __future__ import annotations

import pytest
import torch

from vitedge.backbone import ARCHS
from vitedge.errors import VitedgeError
from vitedge.families import (
    _REGISTRY,
    Family,
    aliases,
    available_families,
    check_keep_rate,
    check_prune_blocks,
    default_prune_blocks,
    detect_family,
    family,
    get_family,
    blocks_and_keep_rates,
    parse_assignment,
    settings_by_name,
)


def test_builtin_families_are_registered():
    assert {"deit", "evit", "dynamicvit"} <= set(available_families())
    for name in ("deit", "evit", "dynamicvit"):
        fam = get_family(name)
        assert fam.name == name and fam.summary and fam.paper


def test_unknown_family_names_the_available_ones():
    with pytest.raises(VitedgeError, match=r"unknown family 'no-such-family'; available: .*dynamicvit.*evit.*tome"):
        get_family("no-such-family")


def test_decorator_registers_a_new_family():
    @family("test-only")
    class TestOnly(Family):
        summary = "for this test"

    try:
        assert "test-only" in available_families()
        assert isinstance(get_family("test-only"), TestOnly)
        with pytest.raises(VitedgeError, match="takes no settings"):
            get_family("test-only").resolve_settings(ARCHS["vit_fmnist"], {"keep_rate": 0.7})
    finally:
        _REGISTRY.pop("test-only")


def test_detect_family_by_signature_keys(evit_state, dynamicvit_state):
    assert detect_family(dynamicvit_state) == "dynamicvit"
    assert detect_family(evit_state) is None  # plain timm keys: could be deit or evit


def test_deit_is_dense_and_takes_no_settings():
    deit = get_family("deit")
    cfg = ARCHS["vit_fmnist"]
    plan = deit.token_plan(cfg, deit.resolve_settings(cfg, {}))
    assert [(b.attention, b.mlp) for b in plan.blocks] == [(50, 50)] * 12
    assert plan.selections == ()
    with pytest.raises(VitedgeError, match="family 'deit' takes no settings"):
        deit.resolve_settings(cfg, {"keep_rate": 0.7})


def test_default_prune_blocks():
    assert default_prune_blocks(12) == [3, 6, 9]
    assert default_prune_blocks(24) == [6, 12, 18]


@pytest.mark.parametrize("value", [0, 0.0, -1, 1.5, 1.0000001, float("nan"), "x", None])
def test_check_keep_rate_rejects(value):
    with pytest.raises(VitedgeError, match="keep rate must be"):
        check_keep_rate(value)


def test_check_keep_rate_accepts():
    assert check_keep_rate(1) == 1.0
    assert check_keep_rate("0.25") == 0.25
    with pytest.raises(VitedgeError, match="not one this model was trained for"):
        check_keep_rate(0.6, allowed=(0.5, 0.7, 1.0))


def test_blocks_and_keep_rates():
    assert blocks_and_keep_rates([3, 6, 9], 0.7, 12) == ([3, 6, 9], [0.7, 0.7, 0.7])
    assert blocks_and_keep_rates([3, 9], (0.5, 0.6), 12) == ([3, 9], [0.5, 0.6])
    with pytest.raises(VitedgeError, match="1 keep rates given for 2 pruning blocks"):
        blocks_and_keep_rates([3, 9], [0.5], 12)
    with pytest.raises(VitedgeError, match="keep rate must be in"):
        blocks_and_keep_rates([3, 9], [0.5, 2.0], 12)


def test_keep_rates_follow_their_blocks_when_blocks_are_unsorted():
    assert blocks_and_keep_rates([9, 3, 6], [0.5, 0.7, 0.9], 12) == ([3, 6, 9], [0.7, 0.9, 0.5])


@pytest.mark.parametrize("blocks", [[], [-1, 3], [3, 12], [3, 3, 6]])
def test_check_prune_blocks_rejects(blocks):
    with pytest.raises(VitedgeError, match="prune blocks"):
        check_prune_blocks(blocks, 12)


def test_check_prune_blocks_sorts():
    assert check_prune_blocks([9, 3, 6], 12) == [3, 6, 9]


def test_reference_models_are_built_per_family():
    cfg = ARCHS["vit_fmnist"]
    for name in ("deit", "evit", "dynamicvit"):
        fam = get_family(name)
        model = fam.reference(cfg, fam.resolve_settings(cfg, {})).eval()
        with torch.no_grad():
            logits, kept = model.forward_tokens(torch.zeros(1, 1, 28, 28))
        assert logits.shape == (1, 10)
        assert len(kept) == len(fam.token_plan(cfg, fam.resolve_settings(cfg, {})).selections)


def test_only_families_without_token_count_constants_serve_a_resolution_range():
    """A pruning family's TopK K comes from the token count, so its graph is tied to one size."""
    agnostic = {name for name in available_families() if get_family(name).resolution_agnostic}
    assert {"deit", "castling"} <= agnostic
    assert not agnostic & {"evit", "dynamicvit"}


def test_keep_rate_families_offer_a_grid_to_tune_and_the_others_their_trained_setting():
    cfg = ARCHS["vit_fmnist"]
    for name in ("evit", "dynamicvit", "evovit", "ats"):
        fam = get_family(name)
        grid = fam.tuning_candidates(cfg, fam.resolve_settings(cfg, {}))
        rates = [c["keep_rate"] for c in grid]
        assert rates == sorted(rates, reverse=True) and rates[0] == 1.0 and len(rates) >= 5
        for candidate in grid:
            fam.resolve_settings(cfg, candidate)  # every candidate is a valid setting
    assert get_family("deit").tuning_candidates(cfg, {}) == [{}]


# ---------------------------------------------------------------- the settings schema


def test_every_family_declares_its_settings_once_with_help_and_one_meaning_per_name():
    cfg = ARCHS["vit_fmnist"]
    by_name = {}
    for name in available_families():
        fam = get_family(name)
        declared = [s.name for s in fam.settings]
        assert len(declared) == len(set(declared)), name
        assert set(fam.resolve_settings(cfg, {})) <= set(declared), name  # nothing resolved that is not declared
        for setting in fam.settings:
            assert setting.help and setting.type in (int, float, bool), (name, setting.name)
            by_name.setdefault(setting.name, set()).add(setting.type)
            if setting.default is not None:
                assert setting.check(setting.default) == setting.default  # the default passes its own check
    assert all(len(types) == 1 for types in by_name.values()), by_name  # --set parses a name one way
    assert set(settings_by_name()) == set(by_name)
    flags = [a.flag for name in available_families() for s in get_family(name).settings for a in s.aliases]
    assert set(aliases()) == set(flags) and all(f.startswith("--") for f in flags)


@pytest.mark.parametrize("setting, text, value", [
    ("keep_rate", "0.7", 0.7), ("keep_rate", "0.5,0.7", [0.5, 0.7]), ("prune_blocks", "3,6,9", [3, 6, 9]),
    ("prune_blocks", "4", [4]), ("fuse_token", "false", False), ("merge_count", "8", 8),
    ("token_budgets", "none", None), ("budget_quantile", "1", 1.0),
])
def test_command_line_values_are_typed_by_the_schema(setting, text, value):
    assert parse_assignment(f"{setting}={text}") == (setting, value)


@pytest.mark.parametrize("text, message", [
    ("keep_ratio=0.7", "unknown setting 'keep_ratio'; the families' settings are: "),
    ("keep_rate", "--set takes NAME=VALUE"),
    ("keep_rate=fast", "keep rate must be a number or a list of numbers in (0, 1], got 'fast'"),
    ("keep_rate=1.5", "keep rate must be in (0, 1], got 1.5"),
    ("prune_blocks=3,x", "prune_blocks must be a list of whole numbers >= 0, got 'x'"),
    ("fuse_token=maybe", "fuse_token must be true or false, got 'maybe'"),
    ("merge_count=2.5", "merge_count must be a whole number"),
    ("budget_quantile=", "budget_quantile needs a value"),
])
def test_bad_command_line_values(text, message):
    with pytest.raises(VitedgeError) as caught:
        parse_assignment(text)
    assert message in str(caught.value)


def test_labels_follow_the_schema_order_and_formats():
    supervit, avit, tome = get_family("supervit"), get_family("avit"), get_family("tome")
    assert supervit.label({"keep_rate": 0.7, "resolution": 224}) == "224 px keep 0.7"
    assert supervit.label({"keep_rate": 0.5, "resolution": 28}, compact=True) == "28px-keep0.5"
    assert avit.label({"token_budgets": None}) == "masked" and avit.label({"budget_quantile": 1.0}) == "q 1"
    assert tome.label({"merge_count": [2, 4], "prop_attn": False}) == "r 2,4 prop_attn=false"
    assert get_family("deit").label({}) == "default"


NEW_KNOB = '''
import json, sys
from click.testing import CliRunner
from vitedge.families import Alias, Setting
from vitedge.families.deit import DeiT

# The one line a new knob needs (docs/architecture.md), here on the dense family:
DeiT.settings = (Setting("demo_gain", float, "a knob this test adds", 1.0, minimum=0.0, label="gain {}",
                         aliases=(Alias("--demo-gain"), Alias("--demo-gains", many=True))),)

from vitedge.cli import main  # noqa: E402  (the CLI reads the schema when it is built)

for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, args)
    print(json.dumps({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}))
'''


def test_a_new_setting_is_one_schema_line(tmp_path):
    """A setting added to a family class shows in ``vitedge families``, types ``--set``, its flags and
    recipes, reaches vitedge.json, and labels tune's candidates; nothing else is edited."""
    import json
    import os
    import subprocess
    import sys

    from support import REPO, read_json

    model = str(REPO / "models" / "fmnist-deit.safetensors")
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("family: deit\nsettings: {demo_gain: loud}\n")
    fast = ["--no-validate"]
    runs = [
        ["families"],
        ["export", model, "-o", str(tmp_path / "set"), "--set", "demo_gain=2.5", *fast],
        ["export", model, "-o", str(tmp_path / "flag"), "--demo-gain", "3", *fast],
        ["export", model, "-o", str(tmp_path / "bad"), "--set", "demo_gain=-1", *fast],
        ["export", model, "-o", str(tmp_path / "unknown"), "--set", "demo_gane=1", *fast],
        ["export", model, "-o", str(tmp_path / "recipe"), "--recipe", str(recipe), *fast],
        ["tune", model, "-o", str(tmp_path / "tune"), "--latency-budget-ms", "1000000", "--demo-gains", "2",
         "--limit", "16", "--iterations", "2", "--warmup", "0", "--threads", "1"],
    ]
    proc = subprocess.run([sys.executable, "-c", NEW_KNOB, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    families, set_, flag, bad, unknown, typo, tune = (json.loads(line) for line in proc.stdout.splitlines())
    assert any(line.split()[0] == "demo_gain" and "a knob this test adds" in line and "--demo-gain" in line
               for line in families["stdout"].splitlines())
    assert set_["code"] == 0 and read_json(tmp_path / "set" / "vitedge.json")["settings"] == {"demo_gain": 2.5}
    assert flag["code"] == 0 and read_json(tmp_path / "flag" / "vitedge.json")["settings"] == {"demo_gain": 3.0}
    for result, message in ((bad, "demo_gain must be >= 0, got -1"), (unknown, "unknown setting 'demo_gane'"),
                            (typo, "'demo_gain' must be a number >= 0, got 'loud'")):
        errors = [line for line in result["stderr"].splitlines() if line.startswith("vitedge: error:")]
        assert result["code"] == 2 and len(errors) == 1 and message in errors[0], result
    assert not any((tmp_path / name).exists() for name in ("bad", "unknown", "recipe"))
    assert tune["code"] == 0, tune["stderr"][-1000:]
    summary = read_json(tmp_path / "tune" / "tune.json")
    assert [c["label"] for c in summary["candidates"]] == ["gain 2"] and summary["chosen"]["settings"] == {"demo_gain": 2.0}
