"""Token-selection primitives shared by the families, as small pure functions.

Each works both on a reference model (where ``k`` may come from a runtime shape) and on a
static one (where ``k`` is a Python int, so it exports as a constant TopK K).
"""

from __future__ import annotations

import torch


def class_attention(attn: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the class token to every other token: [B, H, N, N] → [B, N-1]."""
    return attn[:, :, 0, 1:].mean(dim=1)


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, highest first (TopK, sorted)."""
    return torch.topk(scores, k, dim=1, largest=True, sorted=True).indices


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [B, k] of ``x`` [B, N, C] (or [B, N]) per batch element.

    Expressed as one flat ``Gather`` over B*N rows rather than ``GatherElements`` with an
    index expanded over channels: fewer bytes of int64 index and a faster kernel in ORT and
    TensorRT.
    """
    batch, tokens = x.shape[0], x.shape[1]
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * tokens
    flat_index = (index + offsets).reshape(-1)
    rows = x.reshape(batch * tokens, *x.shape[2:]).index_select(0, flat_index)
    return rows.reshape(batch, index.shape[1], *x.shape[2:])


def drop_selected(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``weights`` [B, N] with the entries at ``index`` set to zero (plain ScatterElements, no reduction)."""
    return weights.scatter(1, index, torch.zeros_like(index, dtype=weights.dtype))


def patch_positions(batch: int, num_patches: int, device=None) -> torch.Tensor:
    """Original patch index of every patch token, to follow tokens through selections."""
    return torch.arange(num_patches, device=device).unsqueeze(0).expand(batch, -1)
