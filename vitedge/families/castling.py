"""Castling-ViT (You et al., CVPR 2023): linear-angular attention, a softmax branch only in training.

Attention of the official module (GATECH-EIC/Castling-ViT, ``LinAngularAttention``), per head,
with q, k, v laid out [B, H, N, d] and N counting the class token:

    q̂ = q / ‖q‖,  k̂ = k / ‖k‖                     (L2 over the head channels, no epsilon)
    y = 0.5·v + (1/π)·q̂ (k̂ᵀ v)                     (k̂ᵀ v is [d, d]: cost linear in N)
    y = y / ‖y‖ + dconv(v)                          (dconv: depthwise Conv2d(H, H, (9, 1), padding
                                                     (4, 0), no bias) along the token sequence)
    out = proj(merge_heads(y))

No softmax and no 1/√d scale on this path. During training the official module may add an
auxiliary masked-softmax branch, ``sparse·v`` with ``sparse = softmax(q·k̂ᵀ/√d) ⊙ [softmax > 0.02]``
(a quadratic, N x N map), inside the sum before the normalisation; the paper drops it at
inference. Its matmuls are parameter-free wrappers (``qk_matmul``, ``sv_matmul``), so an
official checkpoint has the same keys with or without the branch: ``attn.qkv`` (bias optional),
``attn.dconv``, ``attn.proj``. Any state a training run did attach under the branch's modules
(FLOP-counter buffers, for instance) is training-only: ``adapt_state_dict`` drops it and reports it.

The reference model follows those semantics (the branch only in training mode); the static
rewrite is the linear-only inference attention, the branch removed, no N x N tensor anywhere,
so the exported graph passes the lint that forbids tensors quadratic in the token count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import Block, ViTConfig, VisionTransformer, stem_head_flops
from ..rewrite import rewrites
from . import BlockTokens, Family, TokenPlan, family

KERNEL_SIZE = 9
SPARSE_THRESHOLD = 0.02  # the official code's mask threshold for the training-only branch

# State under the masked-softmax branch's modules is training-only (official names).
TRAINING_ONLY_KEY = re.compile(r"^blocks\.\d+\.attn\.(qk_matmul|sv_matmul)\.")


def split_heads(qkv: nn.Linear, x: torch.Tensor, num_heads: int):
    """q, k, v as [B, H, N, d] from the fused ``qkv`` projection (timm's layout)."""
    batch, tokens, channels = x.shape
    q, k, v = qkv(x).reshape(batch, tokens, 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(proj: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    batch, _, tokens, _ = y.shape
    return proj(y.transpose(1, 2).reshape(batch, tokens, -1))


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖ over the last axis, as the official code takes it (``x.norm(dim=-1, keepdim=True)``)."""
    return x.norm(dim=-1, keepdim=True)


def linear_angular(q, k, v, dconv: nn.Conv2d, sparse_v: torch.Tensor | None = None) -> torch.Tensor:
    """The per-head attention output [B, H, N, d]; ``sparse_v`` is the training-only branch's term."""
    q = q / l2_norm(q)
    k = k / l2_norm(k)
    conv = dconv(v)  # channels = heads, height = tokens, width = head channels: (9, 1) runs along tokens
    context = k.transpose(-2, -1) @ v  # [B, H, d, d]
    linear = (1.0 / math.pi) * (q @ context)
    y = 0.5 * v + linear if sparse_v is None else sparse_v + 0.5 * v + linear
    return y / l2_norm(y) + conv


class LinAngularAttention(nn.Module):
    """The reference attention: linear-angular, plus the masked-softmax branch in training mode.

    Parameter names as in the official module: ``qkv``, ``dconv``, ``proj``.
    """

    def __init__(self, cfg: ViTConfig, kernel_size: int = KERNEL_SIZE, sparse_reg: bool = True,
                 sparse_threshold: float = SPARSE_THRESHOLD):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.sparse_reg = sparse_reg
        self.sparse_threshold = sparse_threshold
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.dconv = nn.Conv2d(
            self.num_heads, self.num_heads, (kernel_size, 1), padding=(kernel_size // 2, 0),
            groups=self.num_heads, bias=False,
        )

    def masked_softmax(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The auxiliary branch's map [B, H, N, N]: softmax attention with entries <= threshold zeroed."""
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn * (attn > self.sparse_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv, x, self.num_heads)
        sparse_v = self.masked_softmax(q, k) @ v if self.training and self.sparse_reg else None
        return merge_heads(self.proj, linear_angular(q, k, v, self.dconv, sparse_v))


def linear_angular_inference(q, k, v, dconv: nn.Conv2d) -> torch.Tensor:
    """``linear_angular`` without the training branch and with one multiply fewer per block.

    y / ‖y‖ does not change when y is doubled, so the graph computes 2y = v + (2/π)·q̂(k̂ᵀv) and
    drops the 0.5·v multiply (the 2/π joins the product, a scale ONNX Runtime folds into its
    MatMul). Doubling is exact in binary floating point, and so are the square, sum and square
    root of the norm, so the normalised result is bit-identical to the official form's.
    """
    q = q / l2_norm(q)
    k = k / l2_norm(k)
    conv = dconv(v)
    doubled = v + (2.0 / math.pi) * (q @ (k.transpose(-2, -1) @ v))
    return doubled / l2_norm(doubled) + conv


class LinearOnlyAttention(nn.Module):
    """The inference attention: the softmax branch removed; k̂ᵀv first, so nothing is N x N."""

    def __init__(self, attn: LinAngularAttention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.qkv, self.proj, self.dconv = attn.qkv, attn.proj, attn.dconv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv, x, self.num_heads)
        return merge_heads(self.proj, linear_angular_inference(q, k, v, self.dconv))


class CastlingBlock(Block):
    def __init__(self, cfg: ViTConfig, sparse_reg: bool = True):
        super().__init__(cfg)
        self.attn = LinAngularAttention(cfg, sparse_reg=sparse_reg)


class CastlingViT(VisionTransformer):
    """A DeiT-style ViT (timm key names) whose every attention is linear-angular."""

    def __init__(self, cfg: ViTConfig, sparse_reg: bool = True):
        super().__init__(cfg, lambda index: CastlingBlock(cfg, sparse_reg))


@rewrites(LinAngularAttention)
def _linear_only(attn: LinAngularAttention, plan: TokenPlan) -> LinearOnlyAttention:
    return LinearOnlyAttention(attn)


def linear_block_flops(cfg: ViTConfig, attn_tokens: int, mlp_tokens: int, kernel_size: int = KERNEL_SIZE) -> int:
    """FLOPs (2 x multiply-accumulates) of one Castling block: every term linear in the token count.

    qkv and proj 4·N·C², k̂ᵀv and q̂(k̂ᵀv) N·C·d each, the depthwise conv kernel·N·C, the MLP
    2·N·C·hidden; norms and elementwise terms are not counted (as ``backbone.block_flops``
    leaves out softmax and LayerNorm).
    """
    dim, head_dim = cfg.embed_dim, cfg.embed_dim // cfg.num_heads
    attention = 4 * attn_tokens * dim * dim + 2 * attn_tokens * dim * head_dim + kernel_size * attn_tokens * dim
    mlp = 2 * mlp_tokens * dim * cfg.mlp_hidden
    return 2 * (attention + mlp)


@dataclass(frozen=True)
class LinearAttentionPlan(TokenPlan):
    """Token counts of a linear-attention model: FLOPs counted with linear-angular attention."""

    kernel_size: int = KERNEL_SIZE

    def flops(self, cfg: ViTConfig) -> int:
        blocks = sum(linear_block_flops(cfg, b.attention, b.mlp, self.kernel_size) for b in self.blocks)
        return stem_head_flops(cfg) + blocks + self.extra_flops

    def to_dict(self) -> dict:
        return {**super().to_dict(), "attention": "linear-angular (no N x N tensor)"}


@family("castling")
class CastlingFamily(Family):
    summary = "linear-angular attention, softmax branch training-only: linear-only graph, cost linear in tokens"
    paper = ("You et al., Castling-ViT: Compressing Self-Attention via Switching Towards Linear-Angular "
             "Attention at Vision Transformer Inference, CVPR 2023")
    signature_keys = (".attn.dconv.",)
    linear_attention = True  # pipeline.export / pipeline.check lint against N x N tensors
    resolution_agnostic = True

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
        kept = {k: v for k, v in state_dict.items() if not TRAINING_ONLY_KEY.match(k)}
        return kept, [k for k in state_dict if k not in kept]

    def reference(self, cfg: ViTConfig, settings: dict) -> CastlingViT:
        return CastlingViT(cfg)

    def token_plan(self, cfg: ViTConfig, settings: dict) -> LinearAttentionPlan:
        tokens = cfg.num_patches + 1
        return LinearAttentionPlan(tuple(BlockTokens(tokens, tokens) for _ in range(cfg.depth)))
