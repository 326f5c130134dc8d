"""vitedge.tokens: the selection primitives, checked against plain torch formulations."""

from __future__ import annotations

import torch

from vitedge.tokens import class_attention, drop_selected, gather_tokens, patch_positions, top_tokens


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
