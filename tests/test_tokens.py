"""vitedge.tokens: the selection primitives, checked against plain torch formulations."""

from __future__ import annotations

import math

import pytest
import torch

from vitedge.tokens import (
    best_match_margin,
    class_attention,
    drop_selected,
    gather_tokens,
    margins_recorded,
    nearest_margin,
    patch_positions,
    record_margin,
    record_per_image,
    record_topk_margin,
    recording_margins,
    score_scale,
    threshold_margin,
    top_tokens,
    topk_margin,
)


def test_class_attention_is_head_mean_of_the_class_row_without_itself():
    attn = torch.rand(2, 3, 5, 5)
    expected = torch.stack([attn[b, :, 0, 1:].mean(0) for b in range(2)])
    assert torch.allclose(class_attention(attn), expected)
    assert class_attention(attn).shape == (2, 4)


def test_top_tokens_highest_first():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7], [5.0, -1.0, 2.0, 3.0]])
    assert top_tokens(scores, 2).tolist() == [[1, 3], [0, 3]]
    assert top_tokens(scores, 4).tolist() == [[1, 3, 2, 0], [0, 3, 2, 1]]


def test_gather_tokens_matches_advanced_indexing():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    index = torch.tensor([[6, 0, 2], [1, 1, 3], [5, 4, 0]])
    expected = torch.stack([x[b, index[b]] for b in range(3)])
    assert torch.equal(gather_tokens(x, index), expected)
    positions = patch_positions(3, 7)
    assert torch.equal(gather_tokens(positions, index), index)


def test_drop_selected_zeroes_exactly_the_selected_entries():
    weights = torch.arange(1.0, 9.0).reshape(2, 4)
    out = drop_selected(weights, torch.tensor([[0, 2], [3, 1]]))
    assert out.tolist() == [[0.0, 2.0, 0.0, 4.0], [5.0, 0.0, 7.0, 0.0]]
    assert weights[0, 0] == 1.0  # not in place


def test_patch_positions():
    positions = patch_positions(2, 4)
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_topk_margin_is_the_gap_at_the_keep_boundary():
    scores = torch.tensor([[0.9, 0.1, 0.7, 0.3], [2.0, 2.0, 1.0, -1.0]])
    assert topk_margin(scores, 2).tolist() == pytest.approx([0.4, 1.0])
    assert topk_margin(scores, 1).tolist() == pytest.approx([0.2, 0.0])  # an exact tie: margin 0
    assert topk_margin(scores, 3).tolist() == pytest.approx([0.2, 2.0])
    # nothing left out / nothing kept: no choice was made
    assert topk_margin(scores, 4).tolist() == topk_margin(scores, 0).tolist() == [math.inf, math.inf]


def test_topk_margin_agrees_with_sorting():
    torch.manual_seed(1)
    scores = torch.randn(5, 30)
    ordered = scores.sort(dim=1, descending=True).values
    for k in (1, 7, 29):
        assert torch.equal(topk_margin(scores, k), ordered[:, k - 1] - ordered[:, k])


def test_best_match_margin():
    scores = torch.tensor([[[0.2, 0.9, 0.85], [0.5, -0.1, 0.4]], [[-math.inf, -math.inf, -math.inf], [1.0, 1.0, 0.0]]])
    margin = best_match_margin(scores)
    assert margin[0].tolist() == pytest.approx([0.05, 0.1])
    assert margin[1, 1] == 0.0
    assert best_match_margin(torch.ones(2, 3, 1)).tolist() == [[math.inf] * 3] * 2


def test_threshold_margin_is_the_nearest_distance_to_the_threshold():
    cumulative = torch.tensor([[0.2, 0.985, 1.3], [0.0, 0.5, 0.99]])
    assert threshold_margin(cumulative, 0.99).tolist() == pytest.approx([0.005, 0.0])


def test_nearest_margin():
    values = torch.tensor([[0.0, 0.4, 0.7, 1.0]])
    # 0.5: nearest 0.4 (0.1), then 0.7 (0.2): margin 0.1; 0.85: halfway between 0.7 and 1.0: margin 0
    assert nearest_margin(torch.tensor([[0.5]]), values).tolist() == pytest.approx([0.1])
    assert nearest_margin(torch.tensor([[0.5, 0.85]]), values).tolist() == pytest.approx([0.0], abs=1e-6)


def test_score_scale_ignores_masked_scores():
    scores = torch.tensor([[-math.inf, 0.5, -2.0], [0.0, 0.0, 0.0]])
    scale = score_scale(scores)
    assert scale[0] == 2.0 and 0 < scale[1] <= torch.finfo(torch.float32).tiny


def test_margins_are_recorded_only_when_asked_and_in_order():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    assert not margins_recorded()
    record_topk_margin(scores, 1)  # no recording open: a no-op
    with recording_margins() as outer:
        assert margins_recorded()
        record_topk_margin(scores, 1)
        with recording_margins() as inner:
            record_margin(torch.tensor([0.25]), scores, swaps_only=False)
        record_topk_margin(scores, 2)
    assert not margins_recorded()
    assert [m.gap.item() for m in outer] == [1.0, 1.0] and all(m.swaps_only for m in outer)
    assert [m.gap.item() for m in inner] == [0.25] and not inner[0].swaps_only
    assert outer[0].scale.item() == 3.0 and outer[0].dtype == torch.float32


def test_per_image_recordings_stack_into_one_margin_per_selection():
    per_image = []
    for gaps in ([0.1, 0.2], [0.3, 0.4], [0.5, 0.6]):  # three images, two selections each
        with recording_margins() as image:
            for gap in gaps:
                record_margin(torch.tensor([gap]), torch.tensor([[gap]]))
        per_image.append(image)
    with recording_margins() as batch:
        record_per_image(per_image)
    assert len(batch) == 2
    assert batch[0].gap.tolist() == pytest.approx([0.1, 0.3, 0.5])
    assert batch[1].scale.tolist() == pytest.approx([0.2, 0.4, 0.6])
