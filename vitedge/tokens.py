"""Token-selection primitives shared by the families, as small pure functions.

Each works both on a reference model (where ``k`` may come from a runtime shape) and on a
static one (where ``k`` is a Python int, so it exports as a constant TopK K).

The reference models also report each selection's *decision margin* per image: how far its
scores were from deciding otherwise (see docs/fidelity.md). A static graph computes the same
scores in another rounding order, so where that margin is within float rounding of zero it
may legitimately keep other tokens. Margins are collected only inside ``recording_margins()``;
``forward_tokens`` keeps its outputs, so exported graphs are unaffected.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

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


# --- decision margins ------------------------------------------------------------------------


def topk_margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``scores`` [B, N]: the k-th highest minus the (k+1)-th highest score [B].

    Zero where the two are equal (a tie that any rounding may decide); +inf where nothing is
    left out (k >= N) or nothing kept (k = 0), so no choice was made.
    """
    if k <= 0 or k >= scores.shape[1]:
        return torch.full(scores.shape[:1], torch.inf, dtype=scores.dtype, device=scores.device)
    top = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True).values
    return top[:, k - 1] - top[:, k]


def best_match_margin(scores: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores`` [..., M]: the best minus the second-best value [...] (+inf for M < 2)."""
    if scores.shape[-1] < 2:
        return torch.full(scores.shape[:-1], torch.inf, dtype=scores.dtype, device=scores.device)
    top = torch.topk(scores, 2, dim=-1, largest=True, sorted=True).values
    return top[..., 0] - top[..., 1]


def threshold_margin(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row of ``values`` [B, N]: the smallest distance of a value to ``threshold`` [B]."""
    return (values - threshold).abs().amin(dim=1)


def nearest_margin(points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row: how close a point of ``points`` [B, P] came to picking another nearest value of
    ``values`` [B, V]: the smallest (second-nearest − nearest distance) over the points [B]."""
    distance = (points.unsqueeze(2) - values.unsqueeze(1)).abs()
    return best_match_margin(-distance).amin(dim=1)


def score_scale(scores: torch.Tensor) -> torch.Tensor:
    """Largest finite |score| per image [B] (≥ the smallest normal float): what the rounding
    error of those scores is proportional to."""
    flat = scores.reshape(scores.shape[0], -1).abs()
    flat = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    return flat.amax(dim=1).clamp(min=torch.finfo(scores.dtype).tiny)


@dataclass
class Margin:
    """One selection's decision margin per image, with the scale and dtype of the scores it compared."""

    gap: torch.Tensor  # [B], in the units the selection compares; 0 is an exact tie
    scale: torch.Tensor  # [B], max |score| (``score_scale``)
    dtype: torch.dtype
    # True where a near-tie can only exchange kept tokens (top-k, merges), never change how many
    # are live; False for a threshold (A-ViT's halting) or a draw (ATS), where it can.
    swaps_only: bool = True


_RECORDERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("margin_recorders", default=())


@contextmanager
def recording_margins():
    """Collect the ``Margin`` of every selection a reference model makes inside the block, in order."""
    records: list[Margin] = []
    token = _RECORDERS.set(_RECORDERS.get() + (records,))
    try:
        yield records
    finally:
        _RECORDERS.reset(token)


def margins_recorded() -> bool:
    """True inside ``recording_margins()`` (so a reference computes margins only when asked)."""
    return bool(_RECORDERS.get())


def record_margin(gap: torch.Tensor, scores: torch.Tensor, swaps_only: bool = True) -> None:
    """Add one selection's margin ``gap`` [B] over ``scores`` [B, ...] to the innermost recording."""
    recorders = _RECORDERS.get()
    if recorders:
        gap = gap.detach().to(scores.dtype)
        recorders[-1].append(Margin(gap, score_scale(scores.detach()), scores.dtype, swaps_only))


def record_topk_margin(scores: torch.Tensor, k: int) -> None:
    """``record_margin`` of keeping the top ``k`` of ``scores`` [B, N]."""
    if margins_recorded():
        record_margin(topk_margin(scores, k), scores)


def record_per_image(per_image: list[list[Margin]]) -> None:
    """Record one ``Margin`` per selection from per-image recordings (a reference that runs
    images alone, each image's selections recorded in order)."""
    recorders = _RECORDERS.get()
    if recorders:
        recorders[-1].extend(
            Margin(torch.cat([m.gap for m in step]), torch.cat([m.scale for m in step]), step[0].dtype, step[0].swaps_only)
            for step in zip(*per_image)
        )
