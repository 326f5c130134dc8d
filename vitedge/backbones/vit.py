"""timm's ``VisionTransformer`` as vitedge's backbone, with timm / DeiT parameter names.

Key names follow timm's ``vision_transformer.py`` (``patch_embed.proj``, ``cls_token``,
``dist_token``, ``pos_embed``, ``blocks.i.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``ls1.gamma``
/ ``norm2`` / ``mlp.fc1`` / ``mlp.fc2`` / ``ls2.gamma``, ``norm``, ``fc_norm``, ``head``,
``head_dist``) so that checkpoints saved by the official code of the families load without
renaming. The variants timm builds from one class are one config here: class token or not,
a DeiT distillation token (logits of both heads averaged at eval), global average pooling
with ``fc_norm`` instead of ``norm`` (MAE), LayerScale (DeiT-III), a position table over
the patches only (``no_embed_class``, DeiT-III), qkv with or without bias, any patch and
image size and MLP ratio. LV-ViT's stem, residual scale and auxiliary head plug into the same
class from ``vitedge.backbones.lvvit``.

What a mechanism needs from a backbone: ``embed`` (images → tokens, the prefix tokens first),
``blocks``, ``classify`` (tokens → logits) and the token layout (``cfg.num_prefix_tokens``
tokens precede the patches).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitedgeError

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
    class_token: bool = True
    dist_token: bool = False  # DeiT distilled: a second prefix token with its own head
    global_pool: str = "token"  # "token": the class token's features; "avg": mean of the patch tokens
    fc_norm: bool = False  # the final LayerNorm after pooling (``fc_norm``) instead of before (``norm``)
    layer_scale: bool = False  # DeiT-III / CaiT LayerScale: ``ls1.gamma``, ``ls2.gamma`` per block
    no_embed_class: bool = False  # position table over the patches only, prefix tokens added after it
    norm_eps: float = 1e-6
    backbone: str = "vit"  # "vit" (timm) or "lvvit" (TokenLabeling); see vitedge.backbones
    stem_channels: int = 0  # LV-ViT's conv stem width before the patch projection (0: no stem)
    skip_lam: float = 1.0  # LV-ViT divides each residual branch by this
    aux_head: bool = False  # LV-ViT's per-patch ``aux_head``, its max over patches added to the logits

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: class token, then distillation token."""
        return int(self.class_token) + int(self.dist_token)

    @property
    def sequence_length(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def pos_prefix_tokens(self) -> int:
        """Prefix tokens that have a row in the position table."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def features(self) -> frozenset[str]:
        """The ways this backbone differs from a DeiT (the names families declare support for)."""
        found = {name for name, present in (
            ("lvvit", self.backbone == "lvvit"),
            ("no_class_token", not self.class_token),
            ("dist_token", self.dist_token),
            ("avg_pool", self.global_pool == "avg"),
            ("fc_norm", self.fc_norm),
            ("layer_scale", self.layer_scale),
            ("no_embed_class", self.no_embed_class),
        ) if present}
        return frozenset(found)

    @property
    def uniform_width(self) -> bool:
        """Every block sees tokens of ``embed_dim`` channels (what a token-count timing of one block stack models)."""
        return True

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


# (embed_dim, depth) -> heads of the released ViTs whose heads are not 64 channels wide: ViT-H/14
# (timm vit_huge_patch14, MAE, torchvision vit_h_14 and SWAG: 16 heads of 80).
RELEASED_HEADS = {(1280, 32): 16}


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None, **stem) -> ViTConfig:
    """Read a timm ViT's shape off its weights.

    The head count is not visible in the weights; DeiT uses 64 channels per head, which is
    the default here (at least one head) except for the released shapes in ``RELEASED_HEADS``,
    and ``num_heads`` overrides it. Pooling follows
    timm: ``fc_norm`` present (and no ``norm``) means global average pooling, as MAE's
    fine-tuned models and timm's ``global_pool="avg"`` save it; no class token means average
    pooling too. ``stem`` carries what another backbone's stem fixes (LV-ViT's conv stem).
    """
    required = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "head.weight")
    position_table = largest_position_table(state_dict)
    missing = [k for k in required if k not in state_dict and not (k == "pos_embed" and position_table is not None)]
    if missing:
        raise VitedgeError(
            f"checkpoint is not a ViT with timm/DeiT key names (missing {', '.join(missing)})"
        )
    embed_dim, in_chans, patch, _ = state_dict["patch_embed.proj.weight"].shape
    class_token = "cls_token" in state_dict
    dist_token = "dist_token" in state_dict
    if dist_token and "head_dist.weight" not in state_dict:
        raise VitedgeError("checkpoint has a dist_token but no head_dist; a distilled DeiT saves both")
    prefix = int(class_token) + int(dist_token)
    positions = position_table.shape[1]
    no_embed_class, num_patches = _position_layout(positions, prefix)
    grid = math.isqrt(num_patches)
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    heads = num_heads or RELEASED_HEADS.get((embed_dim, depth)) or max(1, embed_dim // 64)
    if embed_dim % heads:
        raise VitedgeError(f"embed dim {embed_dim} is not divisible by {heads} heads; pass --num-heads")
    fc_norm = "fc_norm.weight" in state_dict
    if fc_norm and "norm.weight" in state_dict:
        raise VitedgeError("checkpoint has both norm and fc_norm; timm models hold one of them")
    stem = {"patch_size": patch, "in_chans": in_chans, **stem}
    return ViTConfig(
        img_size=grid * stem["patch_size"],
        patch_size=stem["patch_size"],
        in_chans=stem["in_chans"],
        num_classes=state_dict["head.weight"].shape[0],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        class_token=class_token,
        dist_token=dist_token,
        global_pool="avg" if fc_norm or not class_token else "token",
        fc_norm=fc_norm,
        layer_scale="blocks.0.ls1.gamma" in state_dict,
        no_embed_class=no_embed_class,
        **{k: v for k, v in stem.items() if k not in ("patch_size", "in_chans")},
    )


def _position_layout(positions: int, prefix: int) -> tuple[bool, int]:
    """(no_embed_class, patch count) of a position table with ``positions`` rows.

    A square table covers the patches only (timm's ``no_embed_class``, DeiT-III); otherwise
    the first ``prefix`` rows belong to the class (and distillation) token. Both cannot hold:
    no two squares > 1 differ by 1 or 2.
    """
    if prefix and math.isqrt(positions) ** 2 == positions:
        return True, positions
    patches = positions - prefix
    if patches > 0 and math.isqrt(patches) ** 2 == patches:
        return False, patches
    tokens = {0: "no prefix token", 1: "a class token", 2: "class and distillation tokens"}[prefix]
    raise VitedgeError(
        f"pos_embed holds {positions} positions: neither a square grid of patches nor {tokens} plus a square grid; "
        "only square inputs are supported"
    )


def largest_position_table(state_dict: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``pos_embed``, or the largest of SuperViT's ``pos_embed_list.{i}`` (one table per input size).

    The largest table fixes the input size a multi-size checkpoint is read at.
    """
    if "pos_embed" in state_dict:
        return state_dict["pos_embed"]
    tables = [v for k, v in state_dict.items() if k.startswith("pos_embed_list.")]
    return max(tables, key=lambda t: t.shape[1]) if tables else None


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int, num_prefix: int = 1) -> torch.Tensor:
    """Resize the patch part of a [1, num_prefix+G*G, C] position embedding to a new grid.

    Bicubic, corners not aligned, prefix rows untouched: what timm's
    ``resample_abs_pos_embed`` does, so a model fine-tuned at another size behaves the same.
    """
    if math.isqrt(pos_embed.shape[1] - num_prefix) == grid_size:
        return pos_embed
    return interpolate_pos_embed(pos_embed, grid_size, num_prefix)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_size, num_prefix: int = 1) -> torch.Tensor:
    """``resample_pos_embed`` without the same-size shortcut, so it traces with a symbolic grid.

    At the trained grid bicubic resampling returns the table itself (the kernel is [0, 1, 0, 0]
    at integer offsets), so a dynamic-resolution graph matches the fixed one there.
    """
    cls_pos, patch_pos = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
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


class LayerScale(nn.Module):
    """timm's LayerScale (DeiT-III): a learned per-channel gain on a residual branch (``gamma``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SkipScale(nn.Module):
    """LV-ViT's ``skip_lam``: each residual branch divided by a constant (no parameters)."""

    def __init__(self, skip_lam: float):
        super().__init__()
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam


def branch_scale(cfg: ViTConfig) -> nn.Module:
    """What scales a block's residual branches: LayerScale, LV-ViT's skip_lam, or nothing."""
    if cfg.layer_scale:
        return LayerScale(cfg.embed_dim)
    if cfg.skip_lam != 1:
        return SkipScale(cfg.skip_lam)
    return nn.Identity()


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
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = branch_scale(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2 = branch_scale(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Dense ViT: prefix tokens, learned position embedding, blocks, pooled head."""

    # Set on a copy for dynamic-resolution export: resize the position table to the input's
    # patch grid inside the graph instead of once at load time.
    resample_positions = False
    # LV-ViT's eval logits add this times the max over patches of ``aux_head`` (the official
    # LV-ViT and DynamicViT use 0.5; SuperViT's family sets 0.25).
    aux_weight = 0.5

    def __init__(self, cfg: ViTConfig, block_factory=None):
        """``block_factory(index)`` builds block ``index``; families pass their own blocks."""
        super().__init__()
        self.cfg = cfg
        if cfg.stem_channels:
            from .lvvit import ConvStem

            self.patch_embed = ConvStem(cfg)
        else:
            self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.dist_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + cfg.pos_prefix_tokens, cfg.embed_dim))
        block_factory = block_factory or (lambda index: Block(cfg))
        self.blocks = nn.ModuleList(block_factory(i) for i in range(cfg.depth))
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.head_dist = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.dist_token else None
        self.aux_head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.aux_head else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        self.apply(_init_weights)

    def set_fused_attention(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = enabled

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions, the prefix tokens (class, distillation) in front."""
        x = self.patch_embed(images)
        pos = self.pos_embed
        if getattr(self, "resample_positions", False):  # static twins borrow this method without the attribute
            pos = interpolate_pos_embed(pos, images.shape[-1] // self.cfg.patch_size, self.cfg.pos_prefix_tokens)
        return add_prefix_and_positions(self, x, pos)

    def classify(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the final tokens, pooled as the backbone's official eval pools them.

        ``size`` [B, T, 1] (ToMe's merged-token sizes) makes average pooling size-weighted over
        the original patches, as ToMe's MAE patch does; token pooling ignores it.
        """
        cfg = self.cfg  # only attributes the config calls for: static twins borrow this method
        prefix = cfg.num_prefix_tokens
        if not cfg.fc_norm:
            x = self.norm(x)
        if cfg.global_pool == "avg":
            patches = x[:, prefix:]
            pooled = patches.mean(dim=1) if size is None else (patches * size[:, prefix:]).sum(dim=1) / cfg.num_patches
        else:
            pooled = x[:, 0]
        logits = self.head(self.fc_norm(pooled) if cfg.fc_norm else pooled)
        if cfg.dist_token:
            logits = (logits + self.head_dist(x[:, 1])) / 2
        if cfg.aux_head:
            logits = logits + self.aux_weight * self.aux_head(x[:, prefix:]).max(dim=1)[0]
        return logits

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


def add_prefix_and_positions(model: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """timm's ``_pos_embed``: prefix tokens in front of the patches, positions added before
    (``no_embed_class``) or after the concatenation."""
    cfg = model.cfg
    prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, getattr(model, "dist_token", None)) if t is not None]
    if cfg.no_embed_class:
        x = x + pos
        return torch.cat([*prefix, x], dim=1) if prefix else x
    return (torch.cat([*prefix, x], dim=1) if prefix else x) + pos


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, LayerScale):
        nn.init.constant_(module.gamma, 1e-5)


def block_flops(cfg: ViTConfig, attn_tokens: int, mlp_tokens: int | None = None) -> int:
    """Multiply-accumulates of one block (x2 for FLOPs), attention on ``attn_tokens``, MLP on ``mlp_tokens``.

    Families that drop tokens between attention and MLP (EViT) pass both counts.
    """
    mlp_tokens = attn_tokens if mlp_tokens is None else mlp_tokens
    dim = cfg.embed_dim
    attention = 4 * attn_tokens * dim * dim + 2 * attn_tokens * attn_tokens * dim
    mlp = 2 * mlp_tokens * dim * cfg.mlp_hidden
    return 2 * (attention + mlp)


def stem_head_flops(cfg: ViTConfig, final_tokens: int | None = None) -> int:
    """Patch embedding (LV-ViT: its conv stem) and the heads (distillation head, LV-ViT's aux head on
    the ``final_tokens`` that reach it, prefix included; all of them by default)."""
    if cfg.stem_channels:
        from .lvvit import conv_stem_flops

        patch = conv_stem_flops(cfg) // 2
    else:
        patch = cfg.num_patches * cfg.embed_dim * cfg.in_chans * cfg.patch_size**2
    heads = (1 + int(cfg.dist_token)) * cfg.embed_dim * cfg.num_classes
    if cfg.aux_head:
        patches = cfg.num_patches if final_tokens is None else final_tokens - cfg.num_prefix_tokens
        heads += patches * cfg.embed_dim * cfg.num_classes
    return 2 * (patch + heads)


def flops(cfg: ViTConfig, tokens_per_block: list[tuple[int, int]]) -> int:
    """FLOPs with ``tokens_per_block[i]`` = (attention, MLP) tokens through block i, prefix tokens included."""
    final = tokens_per_block[-1][1] if tokens_per_block else None  # tokens LV-ViT's aux head scores
    return stem_head_flops(cfg, final) + sum(block_flops(cfg, attention, mlp) for attention, mlp in tokens_per_block)


def dense_flops(cfg: ViTConfig) -> int:
    return stem_head_flops(cfg) + cfg.depth * block_flops(cfg, cfg.sequence_length)


def remap_layer_scale(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official DeiT-III ``blocks.i.gamma_1`` / ``gamma_2`` as timm's ``ls1.gamma`` / ``ls2.gamma``
    (timm's ``checkpoint_filter_fn`` does the same)."""
    if not any(".gamma_" in k for k in state_dict):
        return state_dict
    renamed = {}
    for key, value in state_dict.items():
        for index in ("1", "2"):
            if key.endswith(f".gamma_{index}") and key.startswith("blocks."):
                key = key[: -len(f"gamma_{index}")] + f"ls{index}.gamma"
        renamed[key] = value
    return renamed
