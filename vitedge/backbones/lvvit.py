"""LV-ViT (Jiang et al., NeurIPS 2021), the official TokenLabeling layout (``tlt/models/lvvit.py``).

Differences from a timm ViT, all read off the weights except ``skip_lam``:

- the patch embedding is a conv stem (``PatchEmbed4_2``): ``patch_embed.conv1`` (7x7, stride 2,
  no bias) + ``bn1`` + ReLU, ``conv2`` / ``bn2`` and ``conv3`` / ``bn3`` (3x3) + ReLU, then
  ``patch_embed.proj`` with kernel and stride ``patch_size / 2``; 64 stem channels (128 for
  LV-ViT-L's ``4_2_128``);
- no qkv bias, MLP ratio 3, ``nn.LayerNorm`` with its default eps 1e-5;
- each residual branch is divided by ``skip_lam`` (2 for LV-ViT-S/M, 3 for L, 1 for T), a
  constructor argument the weights do not record;
- ``aux_head`` scores every patch token; the eval logits are the class head's plus a weight
  times the max over patches of the aux head (0.5 in LV-ViT and DynamicViT's ``dylvvit``,
  0.25 in SuperViT's ``super_lvvit``): ``VisionTransformer.aux_weight``.

For export the stem's BatchNorms are folded into their convolutions (``FoldedConvStem``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import VitedgeError
from .vit import ViTConfig, infer_config as vit_infer_config

SIGNATURE_KEY = "patch_embed.conv1.weight"

# (embed_dim, depth) -> (heads, skip_lam) of the released models (lvvit_t/s/m/l in tlt/models/lvvit.py).
RELEASED = {(240, 12): (4, 1.0), (384, 16): (6, 2.0), (512, 20): (8, 2.0), (768, 24): (12, 3.0)}
# Every LV-ViT the token-pruning repos build on (S and M) uses 2; other shapes default to it.
DEFAULT_SKIP_LAM = 2.0


def matches(state_dict: dict[str, torch.Tensor]) -> bool:
    return SIGNATURE_KEY in state_dict


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> ViTConfig:
    """The LV-ViT config of an official checkpoint: the conv stem fixes the patch size and input channels."""
    stem_keys = [f"patch_embed.{name}.{p}" for name in ("conv1", "conv2", "conv3") for p in ("weight",)]
    stem_keys += [f"patch_embed.bn{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias", "running_mean", "running_var")]
    missing = [k for k in stem_keys if k not in state_dict]
    if missing:
        raise VitedgeError(f"checkpoint has an LV-ViT conv stem without {', '.join(missing[:3])}; "
                           "expected the TokenLabeling PatchEmbed4_2 layout (conv1..3, bn1..3, proj)")
    conv1 = state_dict["patch_embed.conv1.weight"]
    proj = state_dict["patch_embed.proj.weight"]
    if proj.shape[1] != conv1.shape[0]:
        raise VitedgeError(f"patch_embed.proj takes {proj.shape[1]} channels but the stem gives {conv1.shape[0]}")
    embed_dim = proj.shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    heads, skip_lam = RELEASED.get((embed_dim, depth), (None, DEFAULT_SKIP_LAM))
    cfg = vit_infer_config(
        state_dict, num_heads or heads, patch_size=2 * proj.shape[-1], in_chans=conv1.shape[1],
        backbone="lvvit", stem_channels=conv1.shape[0], skip_lam=skip_lam,
        aux_head="aux_head.weight" in state_dict, norm_eps=1e-5,
    )
    if cfg.layer_scale or not cfg.class_token or cfg.dist_token or cfg.fc_norm or cfg.no_embed_class:
        raise VitedgeError("checkpoint mixes an LV-ViT conv stem with timm ViT variant keys; it fits neither layout")
    return cfg


class ConvStem(nn.Module):
    """TokenLabeling's ``PatchEmbed4_2``: three conv + BN + ReLU layers, then the patch projection."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.patch_size % 2:
            raise VitedgeError(f"LV-ViT's stem halves the input first; patch size {cfg.patch_size} is odd")
        width = cfg.stem_channels
        self.conv1 = nn.Conv2d(cfg.in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.proj = nn.Conv2d(width, cfg.embed_dim, kernel_size=cfg.patch_size // 2, stride=cfg.patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class FoldedConvStem(nn.Module):
    """The eval-mode stem with every BatchNorm folded into the conv before it (one Conv per layer in ONNX)."""

    def __init__(self, stem: ConvStem):
        super().__init__()
        self.conv1 = fuse_conv_bn_eval(stem.conv1.eval(), stem.bn1.eval())
        self.conv2 = fuse_conv_bn_eval(stem.conv2.eval(), stem.bn2.eval())
        self.conv3 = fuse_conv_bn_eval(stem.conv3.eval(), stem.bn3.eval())
        self.relu = nn.ReLU()
        self.proj = stem.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.proj(x).flatten(2).transpose(1, 2)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Swap every ``ConvStem`` in ``model`` for its folded twin, in place; returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvStem):
                setattr(parent, name, FoldedConvStem(child))
    return model


def conv_stem_flops(cfg: ViTConfig) -> int:
    """Multiply-accumulates x2 of the stem's convolutions at ``cfg.img_size``."""
    half = math.ceil(cfg.img_size / 2)
    width = cfg.stem_channels
    convs = half * half * width * (cfg.in_chans * 49 + 2 * width * 9)
    proj = cfg.num_patches * cfg.embed_dim * width * (cfg.patch_size // 2) ** 2
    return 2 * (convs + proj)
