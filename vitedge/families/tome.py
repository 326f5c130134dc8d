"""ToMe (Bolya et al., ICLR 2023): merge the r most similar tokens in every block.

Eval semantics of the official timm patch (facebookresearch/ToMe, ``tome/merge.py`` and
``tome/patch/timm.py``), which apply to plain DeiT weights with no extra parameters:

- in every block, between attention and MLP, the keys averaged over heads are the similarity
  metric; tokens are split alternately into a (even positions, the class token first) and b
  (odd positions); each a token finds its most cosine-similar b token; the class token is
  protected (its scores are -inf); the r a tokens with the highest best-match score are merged
  into their b token, the others stay;
- r is clamped to half of the non-class tokens; the new order is the unmerged a tokens in
  their original order, then every b token;
- merges are size-weighted averages (``merge_wavg``: sum of x * size over sum of size) and
  the sizes carry on; with proportional attention every later attention adds log(size) of
  each key to its logits;
- the per-block schedule is ``parse_r``: a constant r, a list per block (padded with zeros),
  or r with an inflection (-1: the paper's decreasing schedule, from 2r down to 0);
- on other timm ViTs (``apply_patch`` reads ``cls_token`` / ``dist_token``): a distillation
  token is protected too (never a destination) and stays second; without a class token nothing
  is protected and the unmerged tokens stay in score order; MAE's global average pool is
  size-weighted over the original patches (``tome/patch/mae.py``). The official timm patch drops
  LayerScale (its ``ToMeBlock.forward`` has no ``ls1``/``ls2``); vitedge keeps it.

The static form merges with constant r per block (taken from the plan): a constant-K TopK
picks the merged a tokens, their destinations form a 0/1 assignment matrix, and one MatMul
adds every merged token into its b token (no ScatterElements with a reduction, which
TensorRT 8.x lacks or gets wrong). Each merging block exports ``assignment_<block>`` [B, P]
(int32): for every original patch, the index of the token that holds it after the block:
the argmax over tokens of ToMe's ``source`` matrix (``trace_source``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone import Block, ViTConfig, VisionTransformer
from ..errors import VitedgeError
from ..rewrite import rewrites
from ..tokens import best_match_margin, gather_tokens, margins_recorded, record_margin, top_tokens, topk_margin
from . import ONE_OR_LIST, Alias, BlockTokens, Family, Setting, TokenPlan, family

PAPER_MERGE_COUNT = 13  # ToMe DeiT-S r=13 (79.4 % top-1), 196 patch tokens
PAPER_PATCHES = 196


def merge_schedule(depth: int, merge_count, inflection: float = 0.0) -> list[int]:
    """Requested merges per block, as the official ``parse_r`` computes them."""
    if isinstance(merge_count, (list, tuple)):
        return list(merge_count) + [0] * (depth - len(merge_count))
    low = int(merge_count * (1.0 - inflection))
    high = 2 * merge_count - low
    step = (high - low) / (depth - 1) if depth > 1 else 0.0
    return [int(low + step * i) for i in range(depth)]


def mergeable(tokens: int, protected: int = 1) -> int:
    """Most tokens one block can merge: half of the unprotected (non-class, non-distillation) tokens."""
    return (tokens - protected) // 2


def merges_per_block(tokens: int, schedule: list[int], protected: int = 1) -> list[tuple[int, int]]:
    """(tokens in, tokens merged) per block, each r clamped as the official code clamps it."""
    out = []
    for requested in schedule:
        merged = max(0, min(requested, mergeable(tokens, protected)))
        out.append((tokens, merged))
        tokens -= merged
    return out


# --- reference: the official eval code's mechanism, as small functions ----------------------

@dataclass
class Matching:
    """One block's bipartite matching, indices into the a side (class token = 0) and b side."""

    unmerged: torch.Tensor  # [B, Ta - r] a tokens that stay, ascending
    merged: torch.Tensor  # [B, r] a tokens merged away
    destination: torch.Tensor  # [B, r] the b token each merged a token goes into
    distill_token: bool = False  # b's first token is a protected distillation token


def bipartite_soft_matching(metric: torch.Tensor, r: int, distill_token: bool = False, class_token: bool = True) -> Matching:
    """Official ``bipartite_soft_matching`` with a protected class token (and distillation token).

    Without a class token nothing is protected and the unmerged a tokens stay in score order
    (the official code sorts them back only to keep the class token first).

    The edge order is a stable argsort, so on exact ties the lower index is merged, as the
    static form's TopK decides (the official argsort is unstable there).
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -math.inf
        if distill_token:
            scores[:, :, 0] = -math.inf
        best, best_index = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        merged, unmerged = order[:, :r], order[:, r:]
        if margins_recorded():  # which a tokens merge (r-th vs (r+1)-th edge), and where each goes (best vs second)
            destination_gap = best_match_margin(scores).gather(1, merged).amin(dim=1)
            record_margin(torch.minimum(topk_margin(best, r), destination_gap), scores)
        if class_token:
            unmerged = unmerged.sort(dim=1).values
        return Matching(unmerged, merged, best_index.gather(1, merged), distill_token)


def merge_tokens(x: torch.Tensor, matching: Matching, mode: str) -> torch.Tensor:
    """Official ``merge``: unmerged a tokens, then every b token with its merged a tokens reduced in
    (a distillation token, b's first, goes right after the class token)."""
    a, b = x[:, ::2], x[:, 1::2]
    channels = x.shape[-1]
    merged = gather_tokens(a, matching.merged)
    index = matching.destination.unsqueeze(-1).expand(-1, -1, channels)
    b = b.scatter_reduce(1, index, merged, reduce=mode)
    unmerged = gather_tokens(a, matching.unmerged)
    if matching.distill_token:
        return torch.cat([unmerged[:, :1], b[:, :1], unmerged[:, 1:], b[:, 1:]], dim=1)
    return torch.cat([unmerged, b], dim=1)


def merge_weighted_average(x: torch.Tensor, size: torch.Tensor | None, matching: Matching):
    """Official ``merge_wavg``: merged tokens are size-weighted means; returns (x, size)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge_tokens(x * size, matching, "sum")
    size = merge_tokens(size, matching, "sum")
    return x / size, size


def merge_source(source: torch.Tensor, matching: Matching) -> torch.Tensor:
    """Official ``merge_source``: the [B, tokens, original tokens] 0/1 map, merged with amax."""
    return merge_tokens(source, matching, "amax")


def source_assignment(source: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """For every original patch, the index of the token that holds it: [B, P]."""
    return source[:, :, prefix:].argmax(dim=1)


def proportional_attention(attn, x: torch.Tensor, size: torch.Tensor | None, fused: bool = False):
    """Attention with log(size) added to every key's logits; returns (output, keys averaged over heads)."""
    q, k, v = attn.qkv_heads(x)
    bias = None if size is None else size.log()[:, None, None, :, 0]
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = logits.softmax(dim=-1) @ v
    return attn.merge_heads(out), k.mean(dim=1)


class ToMeBlock(Block):
    """A block that merges up to ``merge_count`` tokens between its attention and its MLP."""

    def __init__(self, cfg: ViTConfig, merge_count: int, prop_attn: bool):
        super().__init__(cfg)
        self.merge_count = merge_count
        self.prop_attn = prop_attn
        self.distill_token = cfg.dist_token
        self.class_token = cfg.class_token

    def forward(self, x, size=None, source=None):
        """Returns (x, size, source); ``source`` is traced only when one is passed in."""
        out, metric = proportional_attention(self.attn, self.norm1(x), size if self.prop_attn else None, self.attn.fused)
        x = x + self.ls1(out)
        distill = self.distill_token
        r = min(self.merge_count, mergeable(x.shape[1], int(self.class_token) + distill))
        if r > 0:
            matching = bipartite_soft_matching(metric, r, distill, self.class_token)
            if source is not None:
                source = merge_source(source, matching)
            x, size = merge_weighted_average(x, size, matching)
        return x + self.ls2(self.mlp(self.norm2(x))), size, source


class ToMe(VisionTransformer):
    def __init__(self, cfg: ViTConfig, schedule: list[int], prop_attn: bool = True):
        super().__init__(cfg, lambda i: ToMeBlock(cfg, schedule[i], prop_attn))
        self.schedule = list(schedule)
        self.prop_attn = prop_attn

    def forward_tokens(self, images):
        x = self.embed(images)
        batch, tokens = x.shape[0], x.shape[1]
        source = torch.eye(tokens, device=x.device, dtype=x.dtype).expand(batch, -1, -1)
        size, assignments = None, []
        for block in self.blocks:
            before = x.shape[1]
            x, size, source = block(x, size, source)
            if x.shape[1] < before:
                assignments.append(source_assignment(source, self.cfg.num_prefix_tokens))
        return self.classify(x, size), assignments

    def forward(self, images):
        """Logits only; no source tracing (what eager inference runs)."""
        x = self.embed(images)
        size = None
        for block in self.blocks:
            x, size, _ = block(x, size)
        return self.classify(x, size)


# --- static form ---------------------------------------------------------------------------

def static_merge(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int, merge_with: str = "matmul",
                 prefix: int = 1):
    """One block's ToMe merge with a constant ``r``: returns (x, size, token_map).

    ``token_map`` [B, T] is the new index of every input token. The class token never takes
    part in the matching (it is the a side's first row, always unmerged), so it is left out of
    the scores instead of masked with -inf. ``merge_with="scatter"`` adds merged tokens with a
    reducing ScatterElements (the official op; not TensorRT-legal, kept for comparison).
    ``prefix=2``: a distillation token (b's first) is protected too, and stays second; ``prefix=0``
    (no class token): every token takes part and the unmerged ones stay in score order.
    """
    batch, tokens, channels = x.shape
    metric = metric / (metric * metric).sum(dim=-1, keepdim=True).sqrt()  # not norm(): ReduceL2 stops ORT's shape inference
    a_start, b_start = (2 if prefix else 0), (3 if prefix == 2 else 1)
    a, b = metric[:, a_start::2], metric[:, b_start::2]  # a without the class token, b without the distillation token
    num_a, num_b = a.shape[1], b.shape[1]
    # TopK 1 rather than max(): ORT's shape inference cannot follow an opset-18 ReduceMax
    best, best_index = (t.squeeze(-1) for t in torch.topk(a @ b.transpose(-1, -2), 1, dim=-1))
    if prefix:
        merged = top_tokens(best, r)  # [B, r], highest first; ties: lower index, as the reference
        # the unmerged a tokens in their original order: the smallest keys, the merged ones' keys raised past them
        order_key = torch.arange(num_a, device=x.device, dtype=x.dtype).expand(batch, -1)
        order_key = order_key.scatter(1, merged, torch.full_like(best[:, :r], float(num_a)))
        unmerged = torch.topk(order_key, num_a - r, dim=1, largest=False).indices if num_a > r else merged[:, :0]
    else:  # no class token: the unmerged a tokens in score order, as the official code leaves them
        order = top_tokens(best, num_a)
        merged, unmerged = order[:, :r], order[:, r:]
    destination = best_index.gather(1, merged)  # 2-D: one GatherElements

    if size is None:
        size = torch.ones_like(x[..., :1])
    weighted = torch.cat([x * size, size], dim=-1)  # merge x * size and size in one product
    wb = weighted[:, b_start::2]
    # a tokens are gathered from ``weighted`` at their positions: no strided copy of the a side
    unmerged_at, merged_at = 2 * unmerged + a_start, 2 * merged + a_start
    if merge_with == "scatter":
        index = destination.unsqueeze(-1).expand(-1, -1, channels + 1)
        wb = wb.scatter_reduce(1, index, gather_tokens(weighted, merged_at), reduce="sum")
    else:
        # [B, num_b, r] assignment of the merged tokens to their b tokens
        assign = (torch.arange(num_b, device=x.device).unsqueeze(-1) == destination.unsqueeze(1)).to(x.dtype)
        wb = wb + assign @ gather_tokens(weighted, merged_at)
    kept = gather_tokens(weighted, unmerged_at)
    out = torch.cat([weighted[:, :prefix], kept, wb] if prefix else [kept, wb], dim=1)
    size = out[..., channels:]
    kept_a = num_a - r
    positions = [
        torch.cat([unmerged_at, merged_at], dim=1),
        (2 * torch.arange(num_b, device=x.device) + b_start).expand(batch, -1),
    ]
    new_index = [
        (prefix + torch.arange(kept_a, device=x.device)).expand(batch, -1),
        prefix + kept_a + destination,
        (prefix + kept_a + torch.arange(num_b, device=x.device)).expand(batch, -1),
    ]
    if prefix > 1:  # the distillation token keeps its place; the class token's 0 is the zeros below
        positions.append(torch.arange(1, prefix, device=x.device).expand(batch, -1))
        new_index.append(torch.arange(1, prefix, device=x.device).expand(batch, -1))
    positions, new_index = torch.cat(positions, dim=1), torch.cat(new_index, dim=1)
    token_map = torch.zeros(batch, tokens, dtype=new_index.dtype, device=x.device).scatter(1, positions, new_index)
    return out[..., :channels] / size, size, token_map


class StaticToMe(ToMe):
    """Same weights; every block's r a constant from the plan, merges by assignment MatMul."""

    def __init__(self, model: ToMe, plan: TokenPlan, merge_with: str = "matmul"):
        super().__init__(model.cfg, model.schedule, model.prop_attn)
        self.load_state_dict(model.state_dict())
        self.merges = [b.attention - b.mlp for b in plan.blocks]
        self.merge_with = merge_with

    def forward_tokens(self, images):
        x = self.embed(images)
        prefix = self.cfg.num_prefix_tokens
        assignment = torch.arange(prefix, x.shape[1], device=x.device).expand(x.shape[0], -1)
        size, assignments = None, []
        for block, r in zip(self.blocks, self.merges):
            out, metric = proportional_attention(block.attn, block.norm1(x), size if self.prop_attn else None)
            x = x + block.ls1(out)
            if r:
                x, size, token_map = static_merge(x, size, metric, r, self.merge_with, prefix)
                assignment = token_map.gather(1, assignment)
                assignments.append(assignment)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return self.classify(x, size), assignments

    def forward(self, images):
        return self.forward_tokens(images)[0]


@rewrites(ToMe)
def _static_tome(model: ToMe, plan: TokenPlan) -> StaticToMe:
    return StaticToMe(model, plan)


def merge_flops(cfg: ViTConfig, tokens: int, merged: int) -> int:
    """The matching scores and the assignment product of one merge (FLOPs)."""
    num_a, num_b = (tokens - 1) // 2, tokens // 2
    head_dim = cfg.embed_dim // cfg.num_heads
    return 2 * (num_a * num_b * head_dim + num_b * merged * (cfg.embed_dim + 1))


# --- the family ----------------------------------------------------------------------------

def default_merge_count(cfg: ViTConfig) -> int:
    """The paper's DeiT-S r=13 at 196 patches, scaled to the patch count."""
    return max(1, round(PAPER_MERGE_COUNT * cfg.num_patches / PAPER_PATCHES))


def _merge_count_value(value, what: str = "merge_count") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise VitedgeError(f"{what} must be a whole number of tokens >= 0 (r, tokens merged per block), got {value!r}")
    return int(value)


@family("tome")
class ToMeFamily(Family):
    summary = "bipartite soft matching merges r tokens per block (size-weighted, proportional attention)"
    paper = "Bolya et al., Token Merging: Your ViT but Faster (ToMe), ICLR 2023"
    kept_order_matters = True  # assignment_<block> is a map per patch, compared element-wise
    # The official timm patch drops LayerScale (it rewrites Block.forward without ls1/ls2);
    # vitedge keeps it. MAE's global pool is size-weighted as tome/patch/mae.py does it.
    backbone_features = frozenset({"layer_scale", "no_embed_class", "avg_pool", "fc_norm", "dist_token", "no_class_token"})

    settings = (
        Setting("merge_count", int, "tokens merged per block (r): one for every block, or one per block "
                "(default: the paper's r=13 at 196 patches, scaled)", shape=ONE_OR_LIST, minimum=0, label="r {}",
                aliases=(Alias("--merge-count", help="Tokens merged per block (the family's merge_count, ToMe's r)."),
                         Alias("--merge-counts", many=True, help="Merge counts to try, comma-separated."))),
        Setting("inflection", float, "schedule shape: 0 constant r, -1 decreasing, +1 increasing", 0.0,
                minimum=-1.0, maximum=1.0),
        Setting("prop_attn", bool, "proportional attention (log token size added to the attention logits)", True),
    )

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        count = overrides.get("merge_count", default_merge_count(cfg))
        if isinstance(count, (list, tuple)):
            count = [_merge_count_value(r) for r in count]
            if len(count) > cfg.depth:
                raise VitedgeError(f"merge_count lists {len(count)} blocks; this model has {cfg.depth}")
        else:
            count = _merge_count_value(count)
        inflection = overrides.get("inflection", 0.0)
        if isinstance(count, list) and inflection:
            raise VitedgeError("inflection applies to one merge_count, not to a list per block")
        prop_attn = overrides.get("prop_attn", True)
        limit = mergeable(cfg.sequence_length, cfg.num_prefix_tokens)
        largest = max(merge_schedule(cfg.depth, count, float(inflection)), default=0)
        if largest > limit:
            raise VitedgeError(
                f"merge_count asks to merge {largest} tokens in one block, but a block can merge at most "
                f"{limit} of the {cfg.num_patches} patch tokens (half); use merge_count <= {limit}"
            )
        return {"merge_count": count, "inflection": float(inflection), "prop_attn": prop_attn}

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        """Constant r from 0 (dense) up to the r that leaves about one token per block at the end."""
        most = max(1, cfg.num_patches // cfg.depth)
        counts = sorted({round(most * step / 4) for step in range(5)})
        return [{"merge_count": count} for count in counts]

    def reference(self, cfg: ViTConfig, settings: dict) -> ToMe:
        schedule = merge_schedule(cfg.depth, settings["merge_count"], settings["inflection"])
        return ToMe(cfg, schedule, settings["prop_attn"])

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        schedule = merge_schedule(cfg.depth, settings["merge_count"], settings["inflection"])
        blocks, selections, extra = [], [], 0
        prefix = cfg.num_prefix_tokens
        for i, (tokens, merged) in enumerate(merges_per_block(cfg.sequence_length, schedule, prefix)):
            blocks.append(BlockTokens(tokens, tokens - merged))
            if merged:
                extra += merge_flops(cfg, tokens, merged)
                selections.append({
                    "block": i, "merged": merged, "requested": schedule[i], "kept_patches": tokens - merged - prefix,
                    "tokens_after": tokens - merged, "output": f"assignment_{i}",
                })
        return TokenPlan(tuple(blocks), tuple(selections), extra)
