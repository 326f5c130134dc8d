"""EViT (Liang et al., ICLR 2022): keep the most attended tokens, fuse the rest into one.

Eval semantics of the official code (youweiliang/evit): at each pruning block, between
attention and MLP, the class token's head-averaged attention scores the other tokens; the
top ``ceil(keep_rate * (N - 1))`` stay (highest first) and the others are fused into a single
token, their sum weighted by that attention, appended last, where it competes at the next
pruning block like any token: 197 → 140 → 100 → 72 for DeiT-S at keep 0.7. Checkpoints
use plain timm keys.

The static form fixes every ``k`` at rewrite time (a constant TopK K) and computes the fused
token as a product of the attention row (selected entries zeroed) with the tokens, instead
of gathering a data-dependent complement.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backbone import Block, ViTConfig, VisionTransformer
from ..rewrite import rewrites
from ..tokens import class_attention, drop_selected, gather_tokens, patch_positions, record_topk_margin, top_tokens
from . import (
    BlockTokens,
    Family,
    TokenPlan,
    blocks_and_keep_rates,
    block_list_setting,
    default_prune_blocks,
    family,
    keep_rate_candidates,
    keep_rate_setting,
    ONE_OR_LIST,
    Setting,
)

FUSED_POSITION = -1


def kept_count(keep_rate: float, tokens: int) -> int:
    """Patch tokens kept out of ``tokens`` (class token included), as the official code rounds."""
    return math.ceil(keep_rate * (tokens - 1))


class EViTBlock(Block):
    """A block that drops inattentive tokens between its attention and its MLP."""

    def __init__(self, cfg: ViTConfig, block_index: int, keep_rate: float, fuse_token: bool):
        super().__init__(cfg)
        self.block_index = block_index
        self.keep_rate = keep_rate
        self.fuse_token = fuse_token

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, attn = self.attn.forward_with_attn(self.norm1(x))
        x = x + self.ls1(attn_out)
        x, positions = self.select(x, class_attention(attn), positions)
        return x + self.ls2(self.mlp(self.norm2(x))), positions

    def select(self, x, scores, positions):
        keep = kept_count(self.keep_rate, x.shape[1])
        patches = x[:, 1:]
        record_topk_margin(scores, keep)
        if keep >= patches.shape[1]:
            return x, positions
        index = top_tokens(scores, keep)
        kept = [x[:, :1], gather_tokens(patches, index)]
        kept_positions = [gather_tokens(positions, index)]
        if self.fuse_token:
            dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, index, False)
            complement = torch.argsort(dropped.to(torch.int8), dim=1, descending=True, stable=True)
            complement = complement[:, : patches.shape[1] - keep]
            weights = gather_tokens(scores, complement).unsqueeze(-1)
            kept.append((gather_tokens(patches, complement) * weights).sum(dim=1, keepdim=True))
            kept_positions.append(torch.full_like(positions[:, :1], FUSED_POSITION))
        return torch.cat(kept, dim=1), torch.cat(kept_positions, dim=1)


class StaticEViTBlock(nn.Module):
    """EViTBlock with a constant ``keep`` and a scatter-free-of-reduction fuse."""

    def __init__(self, block: EViTBlock, keep: int):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.ls1, self.ls2 = block.ls1, block.ls2
        self.keep = keep
        self.fuse_token = block.fuse_token

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, attn = self.attn.forward_with_attn(self.norm1(x))
        x = x + self.ls1(attn_out)
        if self.keep >= x.shape[1] - 1:
            return x + self.ls2(self.mlp(self.norm2(x))), positions
        scores = class_attention(attn)
        index = top_tokens(scores, self.keep)
        patches = x[:, 1:]
        kept = [x[:, :1], gather_tokens(patches, index)]
        kept_positions = [gather_tokens(positions, index)]
        if self.fuse_token:
            weights = drop_selected(scores, index).unsqueeze(1)
            kept.append(weights @ patches)
            kept_positions.append(torch.full_like(positions[:, :1], FUSED_POSITION))
        x = torch.cat(kept, dim=1)
        return x + self.ls2(self.mlp(self.norm2(x))), torch.cat(kept_positions, dim=1)


class EViT(VisionTransformer):
    def __init__(self, cfg: ViTConfig, keep_rates: list[float], prune_blocks: list[int], fuse_token: bool = True):
        rates = dict(zip(prune_blocks, keep_rates))
        super().__init__(
            cfg, lambda i: EViTBlock(cfg, i, rates[i], fuse_token) if i in rates else Block(cfg)
        )
        self.prune_blocks = list(prune_blocks)

    def forward_tokens(self, images):
        x = self.embed(images)
        positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
        kept = []
        for i, block in enumerate(self.blocks):
            if i in self.prune_blocks:
                x, positions = block(x, positions)
                kept.append(positions)
            else:
                x = block(x)
        return self.classify(x), kept


@rewrites(EViTBlock)
def _static_evit_block(block: EViTBlock, plan: TokenPlan) -> StaticEViTBlock:
    step = next(s for s in plan.selections if s["block"] == block.block_index)
    return StaticEViTBlock(block, step["kept_patches"])


@family("evit")
class EViTFamily(Family):
    summary = "keep top class-attention tokens, fuse the rest into one (constant k per block)"
    paper = "Liang et al., Not All Patches are What You Need (EViT), ICLR 2022"
    backbone_features = frozenset({"layer_scale", "no_embed_class"})  # scores with the class token's attention

    settings = (
        keep_rate_setting(0.7, ONE_OR_LIST, "share of the tokens kept at each pruning block: one rate, or one per block"),
        block_list_setting("prune_blocks", "blocks that drop tokens before their MLP (default: depth/4, /2, 3/4)"),
        Setting("fuse_token", bool, "fuse the dropped tokens into one, weighted by class attention", True),
    )

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        blocks, rates = blocks_and_keep_rates(
            overrides.get("prune_blocks") or default_prune_blocks(cfg.depth), overrides.get("keep_rate", 0.7), cfg.depth
        )
        return {
            "keep_rate": rates,
            "prune_blocks": blocks,
            "fuse_token": bool(overrides.get("fuse_token", True)),
        }

    def reference(self, cfg: ViTConfig, settings: dict) -> EViT:
        return EViT(cfg, settings["keep_rate"], settings["prune_blocks"], settings["fuse_token"])

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        return keep_rate_candidates()

    def budget_tokens(self, cfg: ViTConfig, settings: dict) -> list[int]:
        return [step["tokens_after"] for step in self.token_plan(cfg, settings).selections]

    def with_budget_tokens(self, cfg: ViTConfig, settings: dict, limits: list[int]) -> dict:
        """Per-block keep rates that keep as many patches as ``limits`` allow (class and fused
        token included), each rate the midpoint of its ceil interval so it rounds back exactly."""
        tokens, rates = cfg.num_patches + 1, []
        for limit in limits:
            keep = min(tokens - 1, limit - 1 - (1 if settings["fuse_token"] else 0))
            if limit >= tokens or keep >= tokens - 1:
                rates.append(1.0)
                continue
            rate = round((keep - 0.5) / (tokens - 1), 4)
            rates.append(rate if kept_count(rate, tokens) == keep else (keep - 0.5) / (tokens - 1))
            tokens = 1 + keep + (1 if settings["fuse_token"] else 0)
        return self.resolve_settings(cfg, {**settings, "keep_rate": rates})

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        rates = dict(zip(settings["prune_blocks"], settings["keep_rate"]))
        tokens = cfg.num_patches + 1
        blocks, selections = [], []
        for i in range(cfg.depth):
            if i in rates:
                keep = kept_count(rates[i], tokens)
                after = 1 + keep + (1 if settings["fuse_token"] and keep < tokens - 1 else 0)
                selections.append({"block": i, "kept_patches": keep, "tokens_after": after})
                blocks.append(BlockTokens(tokens, after))
                tokens = after
            else:
                blocks.append(BlockTokens(tokens, tokens))
        return TokenPlan(tuple(blocks), tuple(selections))
