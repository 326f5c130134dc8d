"""DynamicViT (Rao et al., NeurIPS 2021): a learned predictor scores tokens before pruning blocks.

Eval semantics of the official code (raoyongming/DynamicViT): before each pruning block
(3, 6, 9 for depth 12) the predictor ``score_predictor.{s}`` scores the current patch tokens
(local features next to the mean of the live tokens' global features, an MLP, log-softmax
over keep/drop); the top ``int(num_patches * keep_rate ** (s + 1))`` by keep log-probability
stay, in score order; the class token always stays and the rest are dropped.

The reference follows that code (argsort, policy-weighted mean); the static form uses a
constant-K TopK, a flat Gather, and the predictor's first output layer split into its local
and global halves (the global half once per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import ViTConfig, VisionTransformer
from ..rewrite import rewrites
from ..tokens import gather_tokens, patch_positions, record_topk_margin, top_tokens
from . import (
    BlockTokens,
    Family,
    TokenPlan,
    check_keep_rate,
    block_list_setting,
    check_prune_blocks,
    default_prune_blocks,
    family,
    keep_rate_candidates,
    keep_rate_setting,
    ONE,
)


class PredictorLG(nn.Module):
    """The official token-score predictor; parameter names match ``score_predictor.{s}.*``."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities [B, N, 2] of (keep, drop); ``policy`` [B, N, 1] weights the global mean."""
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, global_part = x[..., :half], x[..., half:]
        if policy is None:
            global_mean = global_part.mean(dim=1, keepdim=True)
        else:
            global_mean = (global_part * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local, global_mean.expand_as(local)], dim=-1))


def kept_counts(num_patches: int, keep_rate: float, steps: int) -> list[int]:
    """Patch tokens kept after each pruning step, as the official code rounds (int, not ceil)."""
    return [int(num_patches * keep_rate ** (step + 1)) for step in range(steps)]


class DynamicViT(VisionTransformer):
    def __init__(self, cfg: ViTConfig, keep_rate: float, prune_blocks: list[int]):
        super().__init__(cfg)
        self.prune_blocks = list(prune_blocks)
        self.keep_rate = keep_rate
        self.score_predictor = nn.ModuleList(PredictorLG(cfg.embed_dim) for _ in prune_blocks)
        self.kept = kept_counts(cfg.num_patches, keep_rate, len(prune_blocks))

    def select(self, step: int, x: torch.Tensor, positions: torch.Tensor):
        """Reference selection, as the official eval code: argsort of the keep score, policy mean."""
        patches = x[:, 1:]
        policy = torch.ones_like(patches[..., :1])
        score = self.score_predictor[step](patches, policy)[..., 0]
        record_topk_margin(score, self.kept[step])
        # stable: on exact ties the lower index wins, as ONNX TopK (the static form) decides
        index = torch.argsort(score, dim=1, descending=True, stable=True)[:, : self.kept[step]]
        x = torch.cat([x[:, :1], gather_tokens(patches, index)], dim=1)
        return x, gather_tokens(positions, index)

    def forward_tokens(self, images):
        x = self.embed(images)
        positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
        kept = []
        for i, block in enumerate(self.blocks):
            if i in self.prune_blocks:
                x, positions = self.select(self.prune_blocks.index(i), x, positions)
                kept.append(positions)
            x = block(x)
        return self.classify(x), kept


class StaticDynamicViT(DynamicViT):
    """Same weights; constant-K TopK on the keep score and a plain mean for the global feature."""

    def __init__(self, model: DynamicViT, plan: TokenPlan):
        super().__init__(model.cfg, model.keep_rate, model.prune_blocks)
        self.load_state_dict(model.state_dict())
        self.kept = [step["kept_patches"] for step in plan.selections]

    @staticmethod
    def keep_score(predictor: PredictorLG, patches: torch.Tensor) -> torch.Tensor:
        """The predictor's keep log-probability [B, N], without building [local, global mean] per token.

        The first ``out_conv`` Linear sees every token's local half next to the same global
        mean, so it splits into the local half's product (per token, half the width) plus the
        global half's product (once per image, bias included). Same function as
        ``predictor(patches)[..., 0]``, with half that layer's multiply-adds and no
        Expand/Concat over all tokens: the predictor is the one part of DynamicViT that runs
        as narrow, poorly used GEMMs.
        """
        features = predictor.in_conv(patches)
        half = features.shape[-1] // 2
        local, global_mean = features[..., :half], features[..., half:].mean(dim=1, keepdim=True)
        first = predictor.out_conv[0]
        hidden = F.linear(local, first.weight[:, :half]) + F.linear(global_mean, first.weight[:, half:], first.bias)
        return predictor.out_conv[1:](hidden)[..., 0]

    def select(self, step: int, x: torch.Tensor, positions: torch.Tensor):
        patches = x[:, 1:]
        score = self.keep_score(self.score_predictor[step], patches)
        index = top_tokens(score, self.kept[step])
        x = torch.cat([x[:, :1], gather_tokens(patches, index)], dim=1)
        return x, gather_tokens(positions, index)


@rewrites(DynamicViT)
def _static_dynamicvit(model: DynamicViT, plan: TokenPlan) -> StaticDynamicViT:
    return StaticDynamicViT(model, plan)


def predictor_flops(dim: int, tokens: int) -> int:
    macs = tokens * (dim * dim + dim * dim // 2 + (dim // 2) * (dim // 4) + (dim // 4) * 2)
    return 2 * macs


@family("dynamicvit")
class DynamicViTFamily(Family):
    summary = "learned predictor keeps the top rho^s of patch tokens before blocks 3/6/9"
    paper = "Rao et al., DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification, NeurIPS 2021"
    signature_keys = ("score_predictor.",)
    # dylvvit.py: LV-ViT-S prunes before blocks 4/8/12 of 16 (the quarters default_prune_blocks gives)
    backbone_features = frozenset({"layer_scale", "no_embed_class", "lvvit"})

    settings = (
        keep_rate_setting(0.7, ONE, "one base keep rate rho; the predictor keeps rho, rho^2, rho^3 of the patch tokens"),
        block_list_setting("prune_blocks", "blocks whose input the predictor prunes (default: depth/4, /2, 3/4)"),
    )

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        rate = overrides.get("keep_rate", 0.7)
        return {
            "keep_rate": check_keep_rate(rate),
            "prune_blocks": check_prune_blocks(overrides.get("prune_blocks") or default_prune_blocks(cfg.depth), cfg.depth),
        }

    def reference(self, cfg: ViTConfig, settings: dict) -> DynamicViT:
        return DynamicViT(cfg, settings["keep_rate"], settings["prune_blocks"])

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        return keep_rate_candidates()

    def budget_tokens(self, cfg: ViTConfig, settings: dict) -> list[int]:
        return [1 + k for k in kept_counts(cfg.num_patches, settings["keep_rate"], len(settings["prune_blocks"]))]

    def with_budget_tokens(self, cfg: ViTConfig, settings: dict, limits: list[int]) -> dict:
        """The largest base rate rho (4 decimals, never below the given one) whose kept counts
        int(N rho^s) + 1 all stay within ``limits``: one knob moves every step together."""
        steps, rate = len(settings["prune_blocks"]), settings["keep_rate"]
        best = rate
        for i in range(1, 10001):
            trial = round(rate + i * 1e-4, 4)
            if trial > 1.0:
                break
            if any(1 + k > limit for k, limit in zip(kept_counts(cfg.num_patches, trial, steps), limits)):
                break
            best = trial
        return self.resolve_settings(cfg, {**settings, "keep_rate": best})

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        kept = kept_counts(cfg.num_patches, settings["keep_rate"], len(settings["prune_blocks"]))
        tokens = cfg.sequence_length
        blocks, selections, extra = [], [], 0
        for i in range(cfg.depth):
            if i in settings["prune_blocks"]:
                step = settings["prune_blocks"].index(i)
                extra += predictor_flops(cfg.embed_dim, tokens - 1)
                tokens = kept[step] + 1
                selections.append({"block": i, "kept_patches": kept[step], "tokens_after": tokens})
            blocks.append(BlockTokens(tokens, tokens))
        return TokenPlan(tuple(blocks), tuple(selections), extra)
