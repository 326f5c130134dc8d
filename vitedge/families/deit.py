"""Dense DeiT / ViT: no adaptivity. The baseline every family is measured against."""

from __future__ import annotations

from ..backbone import ViTConfig, VisionTransformer
from . import BlockTokens, Family, TokenPlan, family


@family("deit")
class DeiT(Family):
    summary = "dense ViT/DeiT, every token through every block (the baseline)"
    paper = "Touvron et al., Training data-efficient image transformers (DeiT), ICML 2021"
    resolution_agnostic = True
    backbone_features = frozenset({"lvvit", "no_class_token", "dist_token", "avg_pool", "fc_norm", "layer_scale",
                                   "no_embed_class"})

    def reference(self, cfg: ViTConfig, settings: dict) -> VisionTransformer:
        return VisionTransformer(cfg)

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        tokens = cfg.sequence_length
        return TokenPlan(tuple(BlockTokens(tokens, tokens) for _ in range(cfg.depth)))
