"""Backbones: the networks a token mechanism runs on, each with its official key layout.

- ``vit``: timm's ``VisionTransformer`` in its variants (DeiT, DeiT distilled, DeiT-III,
  AugReg, MAE), the default;
- ``lvvit``: LV-ViT (zihangJiang/TokenLabeling), conv stem, ``skip_lam``, ``aux_head``;
- ``levit``: LeViT in Evo-LeViT's layout (BatchNorm everywhere, three shrinking stages), its own
  model class ``levit.LeViT`` and config ``levit.LeViTConfig`` (a ``ViTConfig`` with stage fields).

Each module reads its config off a state dict (``infer_config``) and counts FLOPs; for the ViTs
the model class is ``vit.VisionTransformer`` with the parts the config selects, so every family
subclass runs on every backbone its ``Family.backbone_features`` allows.
"""

from __future__ import annotations

import torch

from ..errors import VitedgeError
from . import levit, lvvit, vit
from . import torchvision_vit  # torchvision / SWAG layouts, renamed to timm keys
from .vit import ViTConfig

# What each name in ``ViTConfig.features`` means, for the messages of a refused pair.
FEATURE_NAMES = {
    "lvvit": "the LV-ViT backbone (conv stem, skip_lam, aux_head)",
    "levit": "the LeViT backbone (BatchNorm conv stem, shrinking attention stages, Evo-LeViT layout)",
    "no_class_token": "no class token",
    "dist_token": "a distillation token (DeiT distilled)",
    "avg_pool": "global average pooling (MAE / global_pool='avg')",
    "fc_norm": "fc_norm after pooling",
    "layer_scale": "LayerScale (ls1/ls2.gamma, DeiT-III)",
    "no_embed_class": "a position table over the patches only (no_embed_class, DeiT-III)",
}


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> ViTConfig:
    """The config of whichever backbone's layout ``state_dict`` has."""
    if levit.matches(state_dict):
        return levit.infer_config(state_dict, num_heads)
    if lvvit.matches(state_dict):
        return lvvit.infer_config(state_dict, num_heads)
    return vit.infer_config(state_dict, num_heads)


def adapt_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone key renames every family shares (DeiT-III's ``gamma_1`` → timm's ``ls1.gamma``;
    torchvision's and SWAG's ViTs → timm keys; Evo-LeViT's ``stage_blocks.*`` duplicates checked
    against ``blocks.*`` and dropped)."""
    if levit.matches(state_dict):
        return levit.deduplicate_stage_blocks(state_dict)
    return vit.remap_layer_scale(torchvision_vit.to_timm_keys(state_dict))


def prepare_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """Backbone parts that export in a simpler eval form (LV-ViT's stem and LeViT's BatchNorms folded), in place."""
    return levit.fold_batch_norms(lvvit.fold_batch_norms(model))


def dense_flops(cfg: ViTConfig) -> int:
    """FLOPs of the dense model of ``cfg``, whichever backbone it is."""
    return levit.dense_flops(cfg) if levit.is_levit(cfg) else vit.dense_flops(cfg)


def flops(cfg: ViTConfig, tokens_per_block: list[tuple[int, int]]) -> int:
    """FLOPs of ``cfg``'s backbone with (attention, MLP) tokens per block; LeViT's stages count their
    own widths and ignore the MLP count (its blocks drop no tokens between the two)."""
    if levit.is_levit(cfg):
        return levit.flops(cfg, [attention for attention, _ in tokens_per_block])
    return vit.flops(cfg, tokens_per_block)


def check_support(family_name: str, cfg: ViTConfig, supported: frozenset[str]) -> None:
    """Raise one line if ``cfg`` uses a backbone feature the family's official code does not handle."""
    missing = sorted(cfg.features - supported)
    if missing:
        wants = "; ".join(FEATURE_NAMES[name] for name in missing)
        allowed = ", ".join(FEATURE_NAMES[name] for name in sorted(supported)) or "nothing else"
        raise VitedgeError(
            f"family '{family_name}' does not support this backbone: {wants}; it runs on DeiT/timm ViTs "
            f"with a class token and token pooling, plus {allowed}"
        )


__all__ = ["FEATURE_NAMES", "ViTConfig", "adapt_state_dict", "check_support", "dense_flops", "flops", "infer_config", "levit", "lvvit",
           "prepare_for_export", "vit"]
