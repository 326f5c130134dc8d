"""ATS, Adaptive Token Sampling (Fayyaz et al., ECCV 2022): sample tokens by their significance.

Eval semantics of the official code (adaptivetokensampling/ATS, ``ats_block.py``, DeiT-S
config: ATS in blocks 3..11, K = 197, ``DROP_TOKENS: True``), per image as in a batch of one:

- every attention (ATS blocks and plain ones) uses the official ``softmax_with_policy``:
  ``(exp(a - max) + eps / N) / (sum exp(a - max) + eps)``, eps = 1e-6, logits ``(q @ kᵀ) * scale``;
- significance of patch token j: ``Σ_heads attn[class → j] · ‖v_j‖`` (v over all heads),
  normalised to sum 1, sorted ascending, cumulated; the CDF is rescaled to [0, 1] by its
  min and max, so the least significant token sits at 0 and can never be drawn;
- K − 1 evenly spaced points from the smallest non-zero CDF value to 1; each picks the token
  whose CDF value is nearest (the first on ties); duplicates are removed by comparing the
  sorted picks with their right neighbour, the last one with the padding value 1 (so a last
  pick at sorted position 1 is dropped too, as in the official code);
- the block keeps the class token and the picked tokens in ascending significance order:
  their attention rows (over all keys of the block) go through ``proj``, are added to the
  block input rows and go through the MLP. The classifier reads the class token.

The official code pads a batch to its largest token count (so one image's result depends on
its batch), requires K equal to the live token count, and fails once fewer than two patch
tokens remain. vitedge's reference runs each image alone; with K < N it draws K − 1 points
(the paper's definition, which the official code equals at K = N); blocks with fewer than two
patch tokens keep them.

The static form keeps ``min(K, slots)`` slots per ATS block with a validity mask instead of
removing duplicates: masked slots hold copies of the class token and are invisible as keys
(a −32 logit bias: at most e^-32 of the class token's weight; no eps share),
excluded from the significance sort, the CDF normalisation and the draw, and every count is
a constant (TopK, ArgMin, CumSum, Where, Gather; no NonZero/Unique).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Attention, Block, ViTConfig, VisionTransformer
from ..errors import VitedgeError
from ..rewrite import rewrites
from ..tokens import gather_tokens, margins_recorded, nearest_margin, patch_positions, record_margin, record_per_image, recording_margins
from . import (
    BlockTokens,
    Family,
    TokenPlan,
    check_keep_rate,
    ONE_OR_LIST,
    Setting,
    block_list_setting,
    check_prune_blocks,
    family,
    keep_rate_candidates,
    keep_rate_setting,
)

SOFTMAX_EPS = 1e-6  # softmax_with_policy's eps
NONZERO_SHIFT = 1e8  # create_ys: zero CDF values are pushed this far before taking the minimum
MIN_TOKENS = 8  # the official sampler never samples fewer than 8 tokens
MASKED = -1  # kept_tokens entry of a masked slot
MASKED_CDF = -1e8  # where a masked slot sits on the CDF axis: never the nearest to a point in [0, 1]


def default_ats_blocks(depth: int) -> list[int]:
    """Blocks 3..11 for depth 12 (the official DeiT-S setup); from a quarter of the depth on otherwise."""
    return list(range(depth // 4, depth))


# ---------------------------------------------------------------- the mechanism, as pure functions


def attention_logits(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q @ kᵀ) * scale`` [B, H, N, N] (the official order: scale after the product) and v [B, H, N, d]."""
    q, k, v = attn.qkv_heads(x)
    return (q @ k.transpose(-2, -1)) * attn.scale, v


def row_max(x: torch.Tensor, dim: int = -1, largest: bool = True) -> torch.Tensor:
    """Max (or min) along ``dim``, kept: a TopK of 1 (the same values as ReduceMax/ReduceMin).

    Written this way before the check could prove the shapes of opset-18 reductions
    (vitedge.shape_inference); kept so that the exported graph, and with it the validated
    float results of the bundled model, stay as they are."""
    return x.topk(1, dim=dim, largest=largest).values


# Logit of a masked key. exp(MASKED_LOGIT - row max) underflows to exactly 0 in float32 (and
# float16) like -inf would, but a finite constant survives FP16 conversion and shape inference.
MASKED_LOGIT = -1e4
# Logit bias of a masked key in the static form, whose masked slots are copies of the class token
# (a live key): a masked key's logit is the class token's minus 32, so its weight is at most e^-32
# (1.3e-14) of a live one, and all masked keys together move a probability by at most
# 196 e^-32 = 2.5e-12, below float32's resolution at 1. MASKED_LOGIT's -1e4 sends the exponent
# below float32's normal range, where ONNX Runtime's exp kernel takes its slow denormal path
# (4x the softmax time over those entries, measured); -32 keeps it in range.
MASKED_KEY_BIAS = -32.0


def policy_softmax(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The official ``softmax_with_policy`` over the live keys of each image.

    ``valid`` [B, N] marks live slots; masked ones get no weight and no eps share, so the
    result on the live keys is that of the image alone (N = its live token count).
    """
    if valid is None:
        weights = (logits - row_max(logits)).exp()
        return (weights + SOFTMAX_EPS / logits.shape[-1]) / (weights.sum(dim=-1, keepdim=True) + SOFTMAX_EPS)
    keys = valid[:, None, None, :]
    logits = logits.masked_fill(~keys, MASKED_LOGIT)
    weights = (logits - row_max(logits)).exp()
    live = valid.sum(dim=1, dtype=logits.dtype).reshape(-1, 1, 1, 1)
    share = torch.where(keys, SOFTMAX_EPS / live, torch.zeros_like(live))
    return (weights + share) / (weights.sum(dim=-1, keepdim=True) + SOFTMAX_EPS)


def significance(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_heads attn[class → j] · ‖v_j‖ over the patch tokens [B, N-1], not yet normalised."""
    batch, heads, tokens, dim = v.shape
    v_norm = v.transpose(1, 2).reshape(batch, tokens, heads * dim).square().sum(dim=2).sqrt()  # sqrt(Σ v²), not ReduceL2: see row_max
    return (attn[:, :, 0].sum(dim=1) * v_norm)[:, 1:]


def sample_points(cdf: torch.Tensor, start_candidates: torch.Tensor, points: int) -> torch.Tensor:
    """``points`` evenly spaced values from the smallest non-zero CDF value to 1 [B, points].

    Written as the official ``create_ys`` computes them (linspace rescaled), so the float32
    values are the same; ``start_candidates`` holds the CDF with the excluded entries already
    at ``NONZERO_SHIFT``.
    """
    span = points - 1
    grid = torch.linspace(0, 1, points, device=cdf.device) * span
    steps = torch.arange(points, device=cdf.device, dtype=cdf.dtype)
    start = row_max(start_candidates, dim=1, largest=False)
    return start + (grid - start * steps) / span


def nearest(points: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """For each point, the index of the nearest CDF value (the first on ties) [B, P]."""
    return (points.unsqueeze(2) - cdf.unsqueeze(1)).abs().argmin(dim=2)


def duplicate_picks(sorted_picks: torch.Tensor, last_pad: torch.Tensor | int = 1) -> torch.Tensor:
    """True where a sorted pick equals its right neighbour; the last one is compared with ``last_pad``.

    The official ``get_unique_indices`` pads the shifted picks with 1, in the image's own
    numbering of sorted positions; ``last_pad`` is that 1 in the caller's numbering.
    """
    pad = torch.as_tensor(last_pad, dtype=sorted_picks.dtype, device=sorted_picks.device)
    pad = pad.expand(sorted_picks.shape[0], 1)
    return sorted_picks == torch.cat([sorted_picks[:, 1:], pad], dim=1)


def sampling_margin(steps: torch.Tensor, cdf: torch.Tensor, points: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """How near the draw came to picking other tokens [B], in CDF units: the smallest gap between
    a point's nearest and second-nearest CDF value, and the smallest step difference between
    neighbours in the significance order of which one is picked and the other not (a swap of
    the two there moves the pick to the other token). ``steps``: the sorted scores in CDF units."""
    picked = torch.zeros_like(cdf, dtype=torch.bool).scatter(1, picks, True)
    swaps = picked[:, 1:] != picked[:, :-1]
    order_gap = torch.where(swaps, steps[:, 1:] - steps[:, :-1], torch.full_like(steps[:, 1:], torch.inf)).amin(dim=1)
    return torch.minimum(nearest_margin(points, cdf), order_gap)


def sample_tokens(attn: torch.Tensor, v: torch.Tensor, points: int) -> torch.Tensor:
    """Reference sampler for one image: indices of the sampled patch tokens, ascending significance [n]."""
    patches = attn.shape[-1] - 1
    if patches < 2:  # nothing to sample from (the official code divides by zero here)
        record_margin(torch.full(attn.shape[:1], torch.inf), attn[:, 0, 0], swaps_only=False)
        return torch.arange(patches, device=attn.device)
    scores = significance(attn, v)
    scores = scores / scores.sum(dim=1, keepdim=True)
    sorted_scores, order = torch.sort(scores, dim=1, stable=True)
    cdf = sorted_scores.cumsum(dim=1)
    low, high = cdf.min(dim=1, keepdim=True).values, cdf.max(dim=1, keepdim=True).values
    cdf = (cdf - low) / (high - low)
    ys = sample_points(cdf, cdf + (cdf == 0).to(cdf.dtype) * NONZERO_SHIFT, points)
    picks = torch.sort(nearest(ys, cdf), dim=1).values
    if margins_recorded():
        record_margin(sampling_margin(sorted_scores / (high - low), cdf, ys, picks), cdf, swaps_only=False)
    unique = picks[~duplicate_picks(picks)]
    return order[0, unique]


# ---------------------------------------------------------------- reference model (per image)


class ATSPlainBlock(Block):
    """A non-sampling block of an ATS model: the official policy softmax, optionally over live slots."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        logits, v = attention_logits(self.attn, self.norm1(x))
        x = x + self.attn.merge_heads(policy_softmax(logits, valid) @ v)
        return x + self.mlp(self.norm2(x))


class ATSBlock(Block):
    """Attention, then keep the class token and the tokens drawn by inverse-transform sampling."""

    def __init__(self, cfg: ViTConfig, block_index: int, num_tokens: int):
        super().__init__(cfg)
        self.block_index = block_index
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image (batch 1, any live token count): the block output and the kept positions."""
        logits, v = attention_logits(self.attn, self.norm1(x))
        attn = policy_softmax(logits)
        picked = sample_tokens(attn, v, self.num_tokens - 1)
        rows = torch.cat([picked.new_zeros(1), picked + 1])
        out = self.attn.merge_heads(attn[:, :, rows] @ v)
        x = x[:, rows] + out
        return x + self.mlp(self.norm2(x)), positions[:, picked]


def slots_after(num_tokens: int, slots: int) -> int:
    """Static slots (class token included) after an ATS block with budget K on ``slots`` slots."""
    return min(num_tokens, slots)


class ATSViT(VisionTransformer):
    """The reference: each image runs alone, so its token count shrinks as duplicates go."""

    def __init__(self, cfg: ViTConfig, prune_blocks: list[int], num_tokens: list[int]):
        budgets = dict(zip(prune_blocks, num_tokens))
        super().__init__(cfg, lambda i: ATSBlock(cfg, i, budgets[i]) if i in budgets else ATSPlainBlock(cfg))
        self.prune_blocks = list(prune_blocks)
        self.num_tokens = list(num_tokens)

    def kept_widths(self) -> list[int]:
        slots, widths = self.cfg.num_patches + 1, []
        for k in self.num_tokens:
            slots = slots_after(k, slots)
            widths.append(slots - 1)
        return widths

    def forward_image(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(image)
        positions = patch_positions(1, x.shape[1] - 1, x.device)
        kept = []
        for block in self.blocks:
            if isinstance(block, ATSBlock):
                x, positions = block(x, positions)
                kept.append(positions)
            else:
                x = block(x)
        return self.classify(x), kept

    def forward_tokens(self, images):
        """Logits and, per ATS block, the kept patch indices padded with −1 to the static slot count."""
        logits, kept, margins = [], [[] for _ in self.prune_blocks], []
        widths = self.kept_widths()
        for image in images.split(1):
            with recording_margins() if margins_recorded() else nullcontext([]) as image_margins:
                image_logits, image_kept = self.forward_image(image)
            margins.append(image_margins)
            logits.append(image_logits)
            for step, positions in enumerate(image_kept):
                kept[step].append(F.pad(positions, (0, widths[step] - positions.shape[1]), value=MASKED))
        record_per_image(margins)
        return torch.cat(logits), [torch.cat(k) for k in kept]


# ---------------------------------------------------------------- static form (K masked slots)


def static_policy_softmax(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``policy_softmax`` (the same up to float rounding) with two cheaper passes over [B, H, N, N].

    Masked keys get ``MASKED_KEY_BIAS`` added (an Add) instead of ``MASKED_LOGIT`` written (a
    Where): live logits are unchanged (+ 0), and since a masked slot holds a copy of the class
    token (``StaticATSBlock``), its logit sits 32 below the class token's, its weight at most e^-32 of
    the class token's: the live keys' probabilities move by at most 2.5e-12. The row max is a
    ReduceMax instead of a TopK of 1: the same values, without ONNX Runtime's TopK kernel.
    """
    if valid is None:
        weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        return (weights + SOFTMAX_EPS / logits.shape[-1]) / (weights.sum(dim=-1, keepdim=True) + SOFTMAX_EPS)
    keys = valid[:, None, None, :]
    logits = logits + torch.where(keys, 0.0, MASKED_KEY_BIAS)
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    live = valid.sum(dim=1, dtype=logits.dtype).reshape(-1, 1, 1, 1)
    share = torch.where(keys, SOFTMAX_EPS / live, torch.zeros_like(live))
    return (weights + share) / (weights.sum(dim=-1, keepdim=True) + SOFTMAX_EPS)


class StaticATSPlainBlock(nn.Module):
    """ATSPlainBlock with ``static_policy_softmax``."""

    def __init__(self, block: ATSPlainBlock):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        logits, v = attention_logits(self.attn, self.norm1(x))
        x = x + self.attn.merge_heads(static_policy_softmax(logits, valid) @ v)
        return x + self.mlp(self.norm2(x))


def static_significance(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``significance`` with ‖v‖ summed in v's own [B, H, N, d] layout (per head, then over the
    heads) as ``v * v``: no transposed copy of v and a Mul instead of a Pow; the same norm up to
    float summation order."""
    v_norm = (v * v).sum(dim=3).sum(dim=1).sqrt()
    return (attn[:, :, 0].sum(dim=1) * v_norm)[:, 1:]


def sample_slots(attn, v, valid, points: int, out_slots: int):
    """Static sampler: for ``out_slots`` patch slots, the input patch slot each takes and whether it is live.

    ``valid`` [B, S] marks live input slots (slot 0, the class token, always is). Masked
    slots sort first (key −1) and carry zero significance, so the live tokens' sorted order,
    CDF values and nearest points are those of the image alone, only shifted by the number of
    masked slots. Unique picks come first in ascending order, duplicates after them masked.
    """
    patch_valid = valid[:, 1:]
    scores = static_significance(attn, v).masked_fill(~patch_valid, 0.0)
    total = scores.sum(dim=1, keepdim=True)
    scores = scores / torch.where(total > 0, total, torch.ones_like(total))
    keys = torch.where(patch_valid, scores, torch.full_like(scores, -1.0))
    slots = keys.shape[1]
    keys, order = torch.topk(keys, slots, dim=1, largest=False, sorted=True)
    live = keys >= 0
    cdf = keys.clamp(min=0).cumsum(dim=1)
    low = row_max(torch.where(live, cdf, torch.full_like(cdf, NONZERO_SHIFT)), dim=1, largest=False)
    high = cdf[:, -1:]
    span = high - low
    cdf = (cdf - low) / torch.where(span > 0, span, torch.ones_like(span))
    start_candidates = torch.where(live & (cdf != 0), cdf, torch.full_like(cdf, NONZERO_SHIFT))
    ys = sample_points(cdf, start_candidates, points)
    picks = nearest(ys, torch.where(live, cdf, torch.full_like(cdf, MASKED_CDF)))
    # Sort the picks (values < 2^24, exact in float32; TopK on float is what every runtime has).
    picks = torch.topk(picks.to(torch.float32), points, dim=1, largest=False, sorted=True).values.to(torch.int64)
    masked_count = slots - live.sum(dim=1, keepdim=True)
    keep = ~duplicate_picks(picks, masked_count + 1) & live.gather(1, picks)
    sentinel = torch.full_like(picks, slots)
    chosen = torch.topk(torch.where(keep, picks, sentinel).to(torch.float32), out_slots, dim=1, largest=False, sorted=True)
    chosen = chosen.values.to(torch.int64)
    chosen_live = chosen < slots
    slot_index = order.gather(1, chosen.clamp(max=slots - 1))
    return slot_index, chosen_live


class StaticATSBlock(nn.Module):
    """ATSBlock on constant slots: sampled tokens first, duplicates kept as masked slots."""

    def __init__(self, block: ATSBlock, out_slots: int):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.points = block.num_tokens - 1
        self.out_slots = out_slots

    def forward(self, x, valid, positions):
        logits, v = attention_logits(self.attn, self.norm1(x))
        attn = static_policy_softmax(logits, valid)
        slot_index, slot_live = sample_slots(attn, v, valid, self.points, self.out_slots - 1)
        # a masked slot takes a copy of the class token: a live key, which bounds its weight (static_policy_softmax)
        rows = torch.cat([torch.zeros_like(slot_index[:, :1]), torch.where(slot_live, slot_index + 1, 0)], dim=1)
        heads_out = (attn @ v).transpose(1, 2).flatten(2)
        if self.out_slots == x.shape[1]:  # every slot stays (K = N): proj and residual on all rows, one gather
            x = gather_tokens(x + self.attn.proj(heads_out), rows)
        else:
            x = gather_tokens(x, rows) + self.attn.proj(gather_tokens(heads_out, rows))
        x = x + self.mlp(self.norm2(x))
        valid = torch.cat([valid[:, :1], slot_live], dim=1)
        positions = torch.where(slot_live, gather_tokens(positions, slot_index), torch.full_like(slot_index, MASKED))
        return x, valid, positions


class StaticATSViT(nn.Module):
    """The ATS model with every token count constant: a validity mask travels with the slots."""

    def __init__(self, model: ATSViT, plan: TokenPlan):
        super().__init__()
        self.cfg = model.cfg
        self.patch_embed, self.cls_token, self.pos_embed = model.patch_embed, model.cls_token, model.pos_embed
        self.norm, self.head = model.norm, model.head
        slots = {step["block"]: step["tokens_after"] for step in plan.selections}
        self.blocks = nn.ModuleList(
            StaticATSBlock(block, slots[i]) if isinstance(block, ATSBlock) else StaticATSPlainBlock(block)
            for i, block in enumerate(model.blocks)
        )

    embed = VisionTransformer.embed
    classify = VisionTransformer.classify

    def forward_tokens(self, images):
        x = self.embed(images)
        positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
        valid, kept = None, []
        for block in self.blocks:
            if isinstance(block, StaticATSBlock):
                if valid is None:
                    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                x, valid, positions = block(x, valid, positions)
                kept.append(positions)
            else:
                x = block(x, valid)
        return self.classify(x), kept

    def forward(self, images):
        return self.forward_tokens(images)[0]


@rewrites(ATSViT)
def _static_ats(model: ATSViT, plan: TokenPlan) -> StaticATSViT:
    return StaticATSViT(model, plan)


# ---------------------------------------------------------------- the family


def check_num_tokens(value, tokens: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise VitedgeError(f"ATS num_tokens (K) must be a whole number of tokens, got {value!r}")
    value = int(value)
    if value > tokens:
        raise VitedgeError(
            f"ATS num_tokens K={value} is larger than the model's {tokens} tokens (class token included); "
            f"use K <= {tokens} ({tokens} = sample from all tokens, as the official K=197 at 224 px)"
        )
    if value < MIN_TOKENS:
        raise VitedgeError(f"ATS num_tokens K={value} is below the official minimum of {MIN_TOKENS}; use {MIN_TOKENS}..{tokens}")
    return value


@family("ats")
class ATSFamily(Family):
    summary = "inverse-transform sampling of tokens by class attention x value norm (K slots per block, duplicates masked)"
    paper = "Fayyaz et al., Adaptive Token Sampling for Efficient Vision Transformers (ATS), ECCV 2022"
    signature_keys = ("attn.out_zero_mask",)

    def default_thresholds(self, settings: dict) -> dict:
        """Inverse-transform sampling is discontinuous in the scores: a score gap at float rounding
        moves a sampling point across a CDF step (1-2 images in 10,000 here), and that image then
        keeps another token in every later block. Top-1 agreement stays the gate."""
        return {"min_top1_agreement": 0.995, "min_kept_agreement": 0.99}

    settings = (
        block_list_setting("prune_blocks", "blocks that sample tokens (default: from a quarter of the depth on)"),
        Setting("num_tokens", int, "token slots K sampled per block, class token included: one, or one per block "
                "(default: every token)", shape=ONE_OR_LIST),
        keep_rate_setting(None, ONE_OR_LIST, "instead of num_tokens: K as this share of all tokens (at least 8)"),
    )

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        blocks = check_prune_blocks(overrides.get("prune_blocks") or default_ats_blocks(cfg.depth), cfg.depth)
        tokens = cfg.num_patches + 1
        if overrides.get("keep_rate") is not None:  # a share of all tokens, rounded, at least 8 (official)
            rates = overrides["keep_rate"]
            rates = list(rates) if isinstance(rates, (list, tuple)) else [rates] * len(blocks)
            budget = [max(MIN_TOKENS, round(check_keep_rate(r) * tokens)) for r in rates]
        else:
            budget = overrides.get("num_tokens", tokens)
        budget = list(budget) if isinstance(budget, (list, tuple)) else [budget] * len(blocks)
        if len(budget) != len(blocks):
            raise VitedgeError(f"{len(budget)} ATS token budgets given for {len(blocks)} ATS blocks {blocks}")
        given_order = [int(b) for b in overrides.get("prune_blocks") or blocks]  # budgets pair with blocks as given
        by_block = dict(zip(given_order, (check_num_tokens(k, tokens) for k in budget)))
        return {"prune_blocks": blocks, "num_tokens": [by_block[b] for b in blocks]}

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        """K as a share of all tokens: the only static speed knob ATS has (docs/ats.md)."""
        return keep_rate_candidates((1.0, 0.8, 0.6, 0.5, 0.4))

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
        """Drop the sampler's ``out_zero_mask`` buffers (all zeros: the base of its scatter-add padding)."""
        state, dropped = {}, []
        for key, value in state_dict.items():
            if key.endswith(".out_zero_mask"):
                if torch.count_nonzero(value):
                    raise VitedgeError(f"{key} is not all zeros; an ATS checkpoint holds zeros there (damaged checkpoint?)")
                dropped.append(key)
            else:
                state[key] = value
        return state, dropped

    def reference(self, cfg: ViTConfig, settings: dict) -> ATSViT:
        return ATSViT(cfg, settings["prune_blocks"], settings["num_tokens"])

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        budgets = dict(zip(settings["prune_blocks"], settings["num_tokens"]))
        slots = cfg.num_patches + 1
        blocks, selections = [], []
        for i in range(cfg.depth):
            if i in budgets:
                after = slots_after(budgets[i], slots)
                blocks.append(BlockTokens(slots, after))
                selections.append({"block": i, "num_tokens": budgets[i], "kept_patches": after - 1, "tokens_after": after})
                slots = after
            else:
                blocks.append(BlockTokens(slots, slots))
        return TokenPlan(tuple(blocks), tuple(selections))
