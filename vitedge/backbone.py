"""A plain ViT with timm / DeiT parameter names, shared by every family.

Key names follow timm's ``vision_transformer.py`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.i.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` / ``mlp.fc1`` /
``mlp.fc2``, ``norm``, ``head``) so that checkpoints saved by the official code of the
families load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import VitedgeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


@dataclass(frozen=True)
class ViTConfig:
    """The shape of a ViT; everything else (weights, adaptivity) lives elsewhere."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_img_size(self, img_size: int) -> ViTConfig:
        if img_size <= 0 or img_size % self.patch_size:
            raise VitedgeError(
                f"image size {img_size} is not a positive multiple of the patch size "
                f"{self.patch_size}; pick e.g. {max(1, round(img_size / self.patch_size)) * self.patch_size}"
            )
        return replace(self, img_size=img_size)


ARCHS: dict[str, ViTConfig] = {
    "deit_tiny": ViTConfig(embed_dim=192, num_heads=3),
    "deit_small": ViTConfig(embed_dim=384, num_heads=6),
    "deit_base": ViTConfig(embed_dim=768, num_heads=12),
    # The Fashion-MNIST demo size: 28x28 grey images, 7x7 patches of 4 px, 12 blocks.
    "vit_fmnist": ViTConfig(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=12, num_heads=2
    ),
}


def arch_config(name: str) -> ViTConfig:
    try:
        return ARCHS[name]
    except KeyError:
        raise VitedgeError(f"unknown arch '{name}'; known: {', '.join(sorted(ARCHS))}") from None


def default_normalization(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB models, Fashion-MNIST statistics for grey ones."""
    if in_chans == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> ViTConfig:
    """Read a ViT's shape off its weights.

    The head count is not visible in the weights; DeiT uses 64 channels per head, which is
    the default here (at least one head), and ``num_heads`` overrides it.
    """
    required = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "head.weight")
    position_table = largest_position_table(state_dict)
    missing = [k for k in required if k not in state_dict and not (k == "pos_embed" and position_table is not None)]
    if missing:
        raise VitedgeError(
            f"checkpoint is not a ViT with timm/DeiT key names (missing {', '.join(missing)})"
        )
    embed_dim, in_chans, patch, _ = state_dict["patch_embed.proj.weight"].shape
    num_patches = position_table.shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise VitedgeError(
            f"pos_embed holds {num_patches} patch positions, not a square grid; "
            "only square inputs with one class token are supported"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    heads = num_heads or max(1, embed_dim // 64)
    if embed_dim % heads:
        raise VitedgeError(f"embed dim {embed_dim} is not divisible by {heads} heads; pass --num-heads")
    return ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=state_dict["head.weight"].shape[0],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
    )


def largest_position_table(state_dict: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``pos_embed``, or the largest of SuperViT's ``pos_embed_list.{i}`` (one table per input size).

    The largest table fixes the input size a multi-size checkpoint is read at.
    """
    if "pos_embed" in state_dict:
        return state_dict["pos_embed"]
    tables = [v for k, v in state_dict.items() if k.startswith("pos_embed_list.")]
    return max(tables, key=lambda t: t.shape[1]) if tables else None


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize the patch part of a [1, 1+G*G, C] position embedding to a new grid.

    Bicubic, corners not aligned, class token untouched: what timm's
    ``resample_abs_pos_embed`` does, so a model fine-tuned at another size behaves the same.
    """
    if math.isqrt(pos_embed.shape[1] - 1) == grid_size:
        return pos_embed
    return interpolate_pos_embed(pos_embed, grid_size)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_size) -> torch.Tensor:
    """``resample_pos_embed`` without the same-size shortcut, so it traces with a symbolic grid.

    At the trained grid bicubic resampling returns the table itself (the kernel is [0, 1, 0, 0]
    at integer offsets), so a dynamic-resolution graph matches the fixed one there.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patch_pos.shape[1])
    channels = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, old, old, channels).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, channels)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one explicit, exportable path.

    ``fused`` switches to SDPA for the eager reference when no attention map is needed;
    exported graphs always use the explicit matmul-softmax-matmul, like timm's exportable mode.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.fused = False

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, -1))

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and the softmax attention map [B, H, N, N] (families score tokens with it)."""
        q, k, v = self.qkv_heads(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.merge_heads(attn @ v), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            q, k, v = self.qkv_heads(x)
            return self.merge_heads(F.scaled_dot_product_attention(q, k, v))
        return self.forward_with_attn(x)[0]


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Dense DeiT-style ViT: class token, learned position embedding, class-token head."""

    # Set on a copy for dynamic-resolution export: resize the position table to the input's
    # patch grid inside the graph instead of once at load time.
    resample_positions = False

    def __init__(self, cfg: ViTConfig, block_factory=None):
        """``block_factory(index)`` builds block ``index``; families pass their own blocks."""
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        block_factory = block_factory or (lambda index: Block(cfg))
        self.blocks = nn.ModuleList(block_factory(i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def set_fused_attention(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = enabled

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        pos = self.pos_embed
        if getattr(self, "resample_positions", False):  # static twins borrow this method without the attribute
            pos = interpolate_pos_embed(pos, images.shape[-1] // self.cfg.patch_size)
        return torch.cat([cls, x], dim=1) + pos

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)[:, 0])

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and, per token selection, the original patch indices kept (none here).

        Adaptive families override this; ``forward`` stays logits-only for eager use.
        """
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.classify(x), []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def block_flops(cfg: ViTConfig, attn_tokens: int, mlp_tokens: int | None = None) -> int:
    """Multiply-accumulates of one block (x2 for FLOPs), attention on ``attn_tokens``, MLP on ``mlp_tokens``.

    Families that drop tokens between attention and MLP (EViT) pass both counts.
    """
    mlp_tokens = attn_tokens if mlp_tokens is None else mlp_tokens
    dim = cfg.embed_dim
    attention = 4 * attn_tokens * dim * dim + 2 * attn_tokens * attn_tokens * dim
    mlp = 2 * mlp_tokens * dim * cfg.mlp_hidden
    return 2 * (attention + mlp)


def stem_head_flops(cfg: ViTConfig) -> int:
    patch = cfg.num_patches * cfg.embed_dim * cfg.in_chans * cfg.patch_size**2
    return 2 * (patch + cfg.embed_dim * cfg.num_classes)


def dense_flops(cfg: ViTConfig) -> int:
    tokens = cfg.num_patches + 1
    return stem_head_flops(cfg) + cfg.depth * block_flops(cfg, tokens)
