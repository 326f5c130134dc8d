"""The family registry and the setting validators every family shares."""

from __future__ import annotations

import pytest
import torch

from vitedge.backbone import ARCHS
from vitedge.errors import VitedgeError
from vitedge.families import (
    _REGISTRY,
    Family,
    available_families,
    check_keep_rate,
    check_prune_blocks,
    default_prune_blocks,
    detect_family,
    family,
    get_family,
    blocks_and_keep_rates,
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
