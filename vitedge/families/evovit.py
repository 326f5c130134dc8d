"""Evo-ViT (Xu et al., AAAI 2022): slow-fast token evolution, global class attention with an EMA.

Eval semantics of the official DeiT code (YifanXu74/Evo-ViT, ``deit/evo_deit.py``,
``EvoVisionTransformer.forward_features`` with ``stage_wise_prune`` and ``prunecls=False``):

- Every block scores the patch tokens by the class token's attention summed over heads,
  ``a_i = sum_h attn[:, h, 0, 1:]``. Block 0 sets the global score ``s = a_0``; later blocks
  accumulate it, ``s = (1 - t_i) * s + t_i * a_i`` with the per-block ``tradeoff`` t
  (official: 1 for blocks 1-3, so ``s`` is just the latest row there, 0.5 from block 4 on).
- At blocks 4 and 8, before the block, the patch tokens and their scores are sorted by
  ``s``, descending; the class token and the first ``int(196 * 0.5) = 98`` ("slow" tokens) go
  through the blocks of that stage, the other 98 are placeholders that keep their values.
  Inside a stage the EMA updates only the first 98 scores; the rest keep theirs.
- After the last block of a stage (7 and 11) the updated tokens are written back over the
  first 99 positions; the DeiT code has no fast update of the placeholders.
- The output is ``head(norm(mean of all 196 patch tokens))``: the class token is not pooled
  and not classified (``head_cls`` / ``norm_cls`` serve a training-only loss).

Checkpoints keep the official parameter names, which this module's models use as they are:
``qks.i.qk`` (q and k, [2C, C]), ``vs.i.v``, ``norms.i`` (the pre-attention norm),
``projs.i``, ``blocks.i.norm2`` / ``blocks.i.mlp``.

The static form fixes the slow-token counts: the sort is a TopK with K = all patches (a
constant), the slow tokens a prefix of the sorted tokens, and the write-back a Concat of the
updated prefix with the untouched placeholders, so the graph holds no scatter at all. q, k and
v run as one fused projection (the two official weights concatenated).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import Mlp, ViTConfig, VisionTransformer, _init_weights
from ..errors import VitedgeError
from ..rewrite import rewrites
from ..tokens import gather_tokens, patch_positions, record_topk_margin, top_tokens
from . import (
    ONE_OR_LIST,
    BlockTokens,
    Family,
    Setting,
    TokenPlan,
    block_list_setting,
    blocks_and_keep_rates,
    family,
    keep_rate_candidates,
    keep_rate_setting,
)

TRAINING_ONLY_PREFIXES = ("head_cls.", "norm_cls.")
OFFICIAL_TRADEOFF = 0.5  # the EMA coefficient of the official models from block 4 on


def default_split_blocks(depth: int) -> list[int]:
    """Blocks 4 and 8 for the usual depth 12: the same thirds of the depth otherwise."""
    return [depth // 3, 2 * depth // 3]


def slow_count(keep_rate: float, num_patches: int) -> int:
    """Slow (updated) patch tokens of ``num_patches``, as the official code rounds (int, down)."""
    return int(num_patches * keep_rate)


def default_tradeoff(depth: int, first_split: int, tradeoff: float = OFFICIAL_TRADEOFF) -> list[float]:
    """Official per-block EMA coefficients: 1 (latest row only) before the first split, then ``tradeoff``."""
    return [1.0] * first_split + [float(tradeoff)] * (depth - first_split)


def head_class_attention(attn: torch.Tensor) -> torch.Tensor:
    """Attention of the class token to the patch tokens, summed over heads: [B, H, N, N] → [B, N-1]."""
    return attn[:, :, 0, 1:].sum(dim=1)


def ema(scores: torch.Tensor, row: torch.Tensor, tradeoff: float) -> torch.Tensor:
    return (1 - tradeoff) * scores + tradeoff * row


class QKAttention(nn.Module):
    """The official ``qks.i``: q and k from one projection, returns the softmax map [B, H, N, N]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
        self.qk = nn.Linear(cfg.embed_dim, cfg.embed_dim * 2, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k = self.qk(x).reshape(batch, tokens, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)


class VProjection(nn.Module):
    """The official ``vs.i``: v split into heads, [B, H, N, d]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.v = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return self.v(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)


class MlpBlock(nn.Module):
    """The official ``blocks.i``: only the MLP half of a transformer block (``norm2``, ``mlp``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


class EvoViT(VisionTransformer):
    """Reference model: the official eval forward, written without in-place writes."""

    def __init__(self, cfg: ViTConfig, keep_rates: list[float], split_blocks: list[int], tradeoff: list[float]):
        super().__init__(cfg, lambda i: MlpBlock(cfg))
        self.qks = nn.ModuleList(QKAttention(cfg) for _ in range(cfg.depth))
        self.vs = nn.ModuleList(VProjection(cfg) for _ in range(cfg.depth))
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.embed_dim, eps=1e-6) for _ in range(cfg.depth))
        self.projs = nn.ModuleList(nn.Linear(cfg.embed_dim, cfg.embed_dim) for _ in range(cfg.depth))
        self.apply(_init_weights)
        self.keep_rates = list(keep_rates)
        self.split_blocks = list(split_blocks)
        self.tradeoff = list(tradeoff)
        self.slow = [slow_count(rate, cfg.num_patches) for rate in keep_rates]

    def stage_ends(self) -> list[int]:
        """Last block of each stage, after which the slow tokens are written back (7 and 11)."""
        return [b - 1 for b in self.split_blocks[1:]] + [self.cfg.depth - 1]

    def attention(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s attention half: the residual output and the head-summed class attention row."""
        h = self.norms[i](x)
        attn = self.qks[i](h)
        out = (attn @ self.vs[i](h)).transpose(1, 2).reshape(x.shape)
        return x + self.projs[i](out), head_class_attention(attn)

    def sort_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        # stable: on exact ties the lower index wins, as ONNX TopK (the static form) decides
        return torch.argsort(scores, dim=1, descending=True, stable=True)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All 1 + N tokens after the last block and the original patch indices of the slow tokens per stage."""
        x = self.embed(images)
        positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
        scores, full, slow, kept = None, None, 0, []
        ends = self.stage_ends()
        for i, block in enumerate(self.blocks):
            if i in self.split_blocks:
                slow = self.slow[self.split_blocks.index(i)]
                record_topk_margin(scores, slow)
                order = self.sort_tokens(scores)
                scores, positions = gather_tokens(scores, order), gather_tokens(positions, order)
                full = torch.cat([x[:, :1], gather_tokens(x[:, 1:], order)], dim=1)
                x = full[:, : slow + 1]
                kept.append(positions[:, :slow])
            x, row = self.attention(i, x)
            if i == 0:
                scores = row
            elif full is None:
                scores = ema(scores, row, self.tradeoff[i])
            else:
                scores = torch.cat([ema(scores[:, :slow], row, self.tradeoff[i]), scores[:, slow:]], dim=1)
            x = block(x)
            if full is not None and i in ends:
                x = torch.cat([x, full[:, slow + 1 :]], dim=1)
        return x, kept

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens (class token left out), then norm and head."""
        return self.head(self.norm(x[:, 1:].mean(dim=1)))

    def forward_tokens(self, images):
        x, kept = self.forward_features(images)
        return self.classify(x), kept


def fused_qkv(qk: nn.Linear, v: nn.Linear) -> nn.Linear:
    """``qkv = cat(qk, v)``: the timm layout of the same weights (q, k, v rows in that order)."""
    fused = nn.Linear(qk.in_features, qk.out_features + v.out_features, bias=qk.bias is not None)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([qk.weight, v.weight]))
        if qk.bias is not None:
            fused.bias.copy_(torch.cat([qk.bias, v.bias]))
    return fused


class StaticEvoViT(EvoViT):
    """Same weights; constant slow counts, the sort as a TopK with constant K, fused qkv."""

    def __init__(self, model: EvoViT, plan: TokenPlan):
        super().__init__(model.cfg, model.keep_rates, model.split_blocks, model.tradeoff)
        self.load_state_dict(model.state_dict())
        self.slow = [step["kept_patches"] for step in plan.selections]
        self.qkvs = nn.ModuleList(fused_qkv(q.qk, v.v) for q, v in zip(self.qks, self.vs))

    def attention(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One [3C, C] projection instead of the official [2C, C] + [C, C] (one GEMM, same values)."""
        batch, tokens, channels = x.shape
        heads = self.cfg.num_heads
        qkv = self.qkvs[i](self.norms[i](x)).reshape(batch, tokens, 3, heads, channels // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.qks[i].scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return x + self.projs[i](out), head_class_attention(attn)

    def sort_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        return top_tokens(scores, scores.shape[1])  # K = every patch: a constant TopK (sorted, descending)


@rewrites(EvoViT)
def _static_evovit(model: EvoViT, plan: TokenPlan) -> StaticEvoViT:
    return StaticEvoViT(model, plan)


def _check_tradeoff(value, depth: int) -> list[float] | float:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise VitedgeError(f"tradeoff must be a number in [0, 1] or a list of {depth}, got {value!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise VitedgeError(f"tradeoff (the EMA coefficient) must be in [0, 1], got {value!r}")
    if isinstance(value, (list, tuple)):
        if len(values) != depth:
            raise VitedgeError(f"tradeoff list has {len(values)} values; give one per block ({depth}) or a single number")
        return values
    return values[0]


@family("evovit")
class EvoViTFamily(Family):
    summary = "slow-fast token evolution: top class-attention tokens updated, the rest kept as placeholders"
    paper = "Xu et al., Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer, AAAI 2022"
    signature_keys = ("qks.", "vs.0.v.")

    settings = (
        keep_rate_setting(0.5, ONE_OR_LIST, "slow (updated) share of the patch tokens from each split block on"),
        block_list_setting("split_blocks", "blocks where tokens are re-sorted into slow and fast (default: depth/3, 2/3)"),
        Setting("tradeoff", float, "EMA coefficient of the class-attention score: one for the blocks from the first "
                "split on, or one per block", OFFICIAL_TRADEOFF, ONE_OR_LIST, minimum=0.0, maximum=1.0),
    )

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        blocks, rates = blocks_and_keep_rates(
            overrides.get("split_blocks") or default_split_blocks(cfg.depth), overrides.get("keep_rate", 0.5), cfg.depth
        )
        if blocks[0] < 1:
            raise VitedgeError("split block 0 has no class attention to sort by yet; the first split block must be >= 1")
        for block, rate in zip(blocks, rates):
            if slow_count(rate, cfg.num_patches) < 1:
                raise VitedgeError(
                    f"keep rate {rate:g} at block {block} keeps int({cfg.num_patches} x {rate:g}) = 0 patch tokens; "
                    f"use a rate >= 1/{cfg.num_patches}"
                )
        tradeoff = _check_tradeoff(overrides.get("tradeoff", OFFICIAL_TRADEOFF), cfg.depth)
        if not isinstance(tradeoff, list):
            tradeoff = default_tradeoff(cfg.depth, blocks[0], tradeoff)
        return {"keep_rate": rates, "split_blocks": blocks, "tradeoff": tradeoff}

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        """The slow (updated) share of the patch tokens; 1.0 updates every token like a dense block."""
        return keep_rate_candidates((1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3))

    def adapt_state_dict(self, state_dict):
        """The official keys are this model's; the class-token head and norm only serve training."""
        dropped = sorted(k for k in state_dict if k.startswith(TRAINING_ONLY_PREFIXES))
        return {k: v for k, v in state_dict.items() if k not in dropped}, dropped

    def config_state_dict(self, state_dict):
        """Block 0's fused qkv (``cat(qk, v)``), which is what the shape inference reads."""
        view = dict(state_dict)
        for suffix in ("weight", "bias"):
            qk, v = state_dict.get(f"qks.0.qk.{suffix}"), state_dict.get(f"vs.0.v.{suffix}")
            if qk is not None and v is not None:
                view[f"blocks.0.attn.qkv.{suffix}"] = torch.cat([qk, v])
        return view

    def reference(self, cfg: ViTConfig, settings: dict) -> EvoViT:
        return EvoViT(cfg, settings["keep_rate"], settings["split_blocks"], settings["tradeoff"])

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        splits = dict(zip(settings["split_blocks"], settings["keep_rate"]))
        tokens = cfg.num_patches + 1
        blocks, selections = [], []
        for i in range(cfg.depth):
            if i in splits:
                slow = slow_count(splits[i], cfg.num_patches)
                tokens = slow + 1
                selections.append({"block": i, "kept_patches": slow, "tokens_after": tokens,
                                   "placeholders": cfg.num_patches - slow})
            blocks.append(BlockTokens(tokens, tokens))
        return TokenPlan(tuple(blocks), tuple(selections))
