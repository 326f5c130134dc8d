"""LeViT (Graham et al., ICCV 2021) in Evo-LeViT's official layout (YifanXu74/Evo-ViT ``levit/evo_levit.py``).

What differs from a timm ViT, all read off the weights except the key dim of the unreleased shapes:

- the stem ``patch_embed`` is LeViT's ``b16``: four stride-2 3x3 ``Conv2d_BN`` (conv without
  bias, ``c``, + BatchNorm2d, ``bn``) with Hardswish between them, so 16 px per token;
- Evo-LeViT adds a class token (``cls_token``) and absolute positions ``poss`` to LeViT;
- three stages of widths ``C`` and head counts ``N`` (e.g. ``128_256_384`` / ``4_6_8``), each
  block a pair ``blocks.i.m1`` (residual attention) + ``blocks.i.m2`` (residual MLP, ratio 2),
  every linear layer a ``Linear_BN`` (``c`` without bias + BatchNorm1d per channel); attention
  splits each head's qkv into q (D), k (D), v (2D), has no position bias and a Hardswish
  before the output projection; each attention carries ``learn_tradeoff`` (the global score's
  learned EMA coefficient, used by the token mechanism only);
- between stages an ``AttentionSubsample`` (its own ``poss``; keys and values on the grid,
  queries on the stride-2 grid plus the class token; ``C_i / D`` heads of key dim D, values
  4D) and a residual MLP, with no residual around the subsampling attention itself;
- logits ``(head(x) + head_dist(x)) / 2`` on the mean of the patch tokens, both ``BN_Linear``
  (BatchNorm1d, then linear ``l``); ``head_cls`` / ``head_cls_dist`` score the class token in
  training only;
- the official model registers every block twice, as ``blocks.*`` and as ``stage_blocks.*``
  (the same modules grouped by the prune ratios), so each tensor is saved under both names:
  ``blocks.*`` is kept, ``stage_blocks.*`` must hold the same tensors.

For export every ``Conv2d_BN`` / ``Linear_BN`` becomes one conv / linear and ``BN_Linear`` one
linear (``fold_batch_norms``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import VitedgeError
from .vit import ViTConfig

SIGNATURE_KEYS = ("patch_embed.0.c.weight", "poss")
STEM_CONVS = 4  # b16: four stride-2 convolutions, 16 px per token
TRAINING_ONLY_PREFIXES = ("head_cls.", "head_cls_dist.")
ATTN_RATIO, SUBSAMPLE_ATTN_RATIO, MLP_RATIO = 2, 4, 2

# (C, X) of the released models -> (D, N) (``specification`` in evo_levit.py / LeViT's levit.py).
RELEASED = {
    ((128, 256, 384), (2, 3, 4)): (16, (4, 6, 8)),  # 128S
    ((128, 256, 384), (4, 4, 4)): (16, (4, 8, 12)),  # 128
    ((192, 288, 384), (4, 4, 4)): (32, (3, 5, 6)),  # 192
    ((256, 384, 512), (4, 4, 4)): (32, (4, 6, 8)),  # 256
    ((384, 512, 768), (4, 4, 4)): (32, (6, 9, 12)),  # 384
}
DEFAULT_KEY_DIM = 16  # LeViT's smallest; other shapes take --num-heads (stage 1's heads) to fix it


@dataclass(frozen=True)
class LeViTConfig(ViTConfig):
    """A LeViT: ``embed_dim`` / ``num_heads`` are stage 1's, ``depth`` counts attention blocks over all stages."""

    stage_dims: tuple[int, ...] = ()
    stage_depths: tuple[int, ...] = ()
    stage_heads: tuple[int, ...] = ()
    subsample_heads: tuple[int, ...] = ()  # heads of the AttentionSubsample after each stage but the last
    key_dim: int = DEFAULT_KEY_DIM
    distilled_head: bool = True  # head_dist present: the eval logits average both heads

    @property
    def features(self) -> frozenset[str]:
        return frozenset({"levit"})

    @property
    def uniform_width(self) -> bool:
        return False

    @property
    def stage_grids(self) -> list[int]:
        """Side of each stage's token grid: 14, 7, 4 at 224 px (each subsampling: ceil(n / 2))."""
        grids = [self.grid_size]
        for _ in self.stage_dims[1:]:
            grids.append((grids[-1] - 1) // 2 + 1)
        return grids

    @property
    def stage_of_block(self) -> list[int]:
        """The stage of every attention block, in order."""
        return [s for s, depth in enumerate(self.stage_depths) for _ in range(depth)]

    def with_img_size(self, img_size: int) -> LeViTConfig:
        if img_size != self.img_size:
            raise VitedgeError(f"this LeViT's position tables (poss) are for {self.img_size} px inputs only; "
                               f"drop --img-size {img_size} (the official models are trained at 224 or 384 px)")
        return replace(self)


def matches(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(key in state_dict for key in SIGNATURE_KEYS)


def is_levit(cfg: ViTConfig) -> bool:
    return isinstance(cfg, LeViTConfig)


# ---------------------------------------------------------------- the official layout


def _block_index_keys(state_dict, prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """``prefix.<i>.<rest>`` keys grouped by i: {i: {rest: tensor}}."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    for key, value in state_dict.items():
        found = pattern.match(key)
        if found:
            groups.setdefault(int(found.group(1)), {})[found.group(2)] = value
    return groups


def _units(groups: dict[int, dict[str, torch.Tensor]], prefix: str, split) -> list[tuple[str, dict]]:
    """The residual / subsampling modules in order, each as (key prefix, {suffix: tensor})."""
    units = []
    for index in sorted(groups):
        units.extend(split(f"{prefix}.{index}", groups[index]))
    return units


def _split_block(name: str, keys: dict) -> list[tuple[str, dict]]:
    """A ``CatModule`` (``m1``, ``m2``) is two units; a subsampling attention or an MLP one."""
    if any(k.startswith("m1.") for k in keys):
        return [(f"{name}.{half}", {k[len(half) + 1:]: v for k, v in keys.items() if k.startswith(half + ".")})
                for half in ("m1", "m2")]
    return [(name, keys)]


def _split_stage_block(name: str, keys: dict) -> list[tuple[str, dict]]:
    """A ``StageModule`` (``m.<j>.m.*``: its residual blocks) is one unit per block."""
    if keys and all(re.match(r"^m\.\d+\.m\.", k) for k in keys):
        inner = _block_index_keys(keys, "m")
        return [(f"{name}.m.{j}", inner[j]) for j in sorted(inner)]
    return [(name, keys)]


def deduplicate_stage_blocks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without ``stage_blocks.*`` once every tensor there equals its ``blocks.*`` twin."""
    if not any(k.startswith("stage_blocks.") for k in state_dict):
        return state_dict
    blocks = _units(_block_index_keys(state_dict, "blocks"), "blocks", _split_block)
    stages = _units(_block_index_keys(state_dict, "stage_blocks"), "stage_blocks", _split_stage_block)
    if len(blocks) != len(stages):
        raise VitedgeError(f"checkpoint's stage_blocks hold {len(stages)} modules but its blocks {len(blocks)}; "
                           "Evo-LeViT saves the same modules under both names: the file is damaged or mixed")
    for (block_name, block_keys), (stage_name, stage_keys) in zip(blocks, stages):
        if set(block_keys) != set(stage_keys):
            raise VitedgeError(f"checkpoint's {stage_name} is not the module {block_name} (different keys); "
                               "Evo-LeViT saves the same modules under both names: the file is damaged or mixed")
        for suffix, tensor in block_keys.items():
            twin = stage_keys[suffix]
            if twin.shape != tensor.shape or not torch.equal(twin, tensor):
                raise VitedgeError(f"checkpoint's {stage_name}.{suffix} differs from {block_name}.{suffix}; Evo-LeViT "
                                   "saves each tensor under both names, so one of them was changed: re-save the checkpoint")
    return {k: v for k, v in state_dict.items() if not k.startswith("stage_blocks.")}


def _need(state_dict, key: str, what: str) -> torch.Tensor:
    if key not in state_dict:
        raise VitedgeError(f"LeViT checkpoint has no {key} ({what}); expected Evo-LeViT's layout (levit/evo_levit.py)")
    return state_dict[key]


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> LeViTConfig:
    """The LeViT config of an Evo-LeViT checkpoint: stages, widths, head products and resolution from the weights.

    Heads and key dim appear only as their product; the released shapes fix both (``RELEASED``),
    ``num_heads`` (stage 1's heads) fixes the key dim of any other, and the rest follow from it.
    """
    for index in range(STEM_CONVS):
        _need(state_dict, f"patch_embed.{2 * index}.c.weight", "the b16 stem's Conv2d_BN")
    in_chans = state_dict["patch_embed.0.c.weight"].shape[1]
    dim0 = state_dict[f"patch_embed.{2 * STEM_CONVS - 2}.c.weight"].shape[0]
    positions = _need(state_dict, "poss", "the position table").shape[1] - 1
    grid = int(round(positions**0.5))
    if grid * grid != positions or grid < 1:
        raise VitedgeError(f"poss holds {positions + 1} rows: not a class token plus a square grid")
    groups = _block_index_keys(state_dict, "blocks")
    if not groups:
        raise VitedgeError("LeViT checkpoint has no blocks.*; expected Evo-LeViT's layout (levit/evo_levit.py)")
    gaps = sorted(set(range(max(groups) + 1)) - set(groups))
    if gaps:
        raise VitedgeError(f"LeViT checkpoint has no blocks.{gaps[0]} but has blocks up to {max(groups)}: a truncated file")
    dims, depths, products, sub_products = [dim0], [0], [], []
    index, count = 0, max(groups) + 1
    while index < count:
        keys = groups[index]
        if "m1.m.qkv.c.weight" in keys:
            if "m2.m.0.c.weight" not in keys or "m1.m.proj.1.c.weight" not in keys:
                raise VitedgeError(f"LeViT block blocks.{index} has an attention without its MLP or projection: a truncated file")
            width = keys["m1.m.qkv.c.weight"].shape[1]
            if width != dims[-1]:
                raise VitedgeError(f"blocks.{index} takes {width} channels where stage {len(dims)} is {dims[-1]} wide")
            product = keys["m1.m.proj.1.c.weight"].shape[1] // ATTN_RATIO
            if len(products) < len(dims):
                products.append(product)
            elif products[-1] != product:
                raise VitedgeError(f"blocks.{index} has {product} head channels where its stage has {products[-1]}")
            depths[-1] += 1
            index += 1
        elif "kv.c.weight" in keys:
            if not depths[-1]:
                raise VitedgeError(f"LeViT stage {len(dims)} has no attention block before blocks.{index}: a truncated file")
            if "q.1.c.weight" not in keys or "proj.1.c.weight" not in keys or index + 1 >= count \
                    or "m.0.c.weight" not in groups[index + 1]:
                raise VitedgeError(f"LeViT's subsampling at blocks.{index} lacks its queries, projection or MLP: a truncated file")
            sub_products.append(keys["q.1.c.weight"].shape[0])
            dims.append(keys["proj.1.c.weight"].shape[0])
            depths.append(0)
            index += 2
        else:
            raise VitedgeError(f"blocks.{index} is neither a LeViT attention block (m1/m2) nor a subsampling; "
                               "expected Evo-LeViT's layout (levit/evo_levit.py)")
    if not depths[-1]:
        raise VitedgeError(f"LeViT stage {len(dims)} ends with a subsampling and no attention block: a truncated file")
    head = _need(state_dict, "head.l.weight", "the BN_Linear head")
    if head.shape[1] != dims[-1]:
        raise VitedgeError(f"head takes {head.shape[1]} channels but the last stage is {dims[-1]} wide")
    released = RELEASED.get((tuple(dims), tuple(depths)))
    if num_heads:
        if products[0] % num_heads:
            raise VitedgeError(f"{num_heads} heads do not divide stage 1's {products[0]} head channels; pass a divisor")
        key_dim = products[0] // num_heads
    else:
        key_dim = released[0] if released else DEFAULT_KEY_DIM
    uneven = [p for p in products + sub_products if p % key_dim]
    if uneven:
        raise VitedgeError(f"key dim {key_dim} does not divide the head channels {uneven[0]}; pass --num-heads "
                           f"(stage 1's heads, {products[0]} / key dim)")
    heads = tuple(p // key_dim for p in products)
    return LeViTConfig(
        img_size=grid * 2**STEM_CONVS, patch_size=2**STEM_CONVS, in_chans=in_chans, num_classes=head.shape[0],
        embed_dim=dim0, depth=sum(depths), num_heads=heads[0], mlp_ratio=float(MLP_RATIO), qkv_bias=False,
        global_pool="avg", norm_eps=1e-5, backbone="levit", stage_dims=tuple(dims), stage_depths=tuple(depths),
        stage_heads=heads, subsample_heads=tuple(p // key_dim for p in sub_products), key_dim=key_dim,
        distilled_head="head_dist.l.weight" in state_dict,
    )


# ---------------------------------------------------------------- parts (official names)


class Conv2dBN(nn.Sequential):
    """``Conv2d_BN``: a bias-free conv ``c`` and its BatchNorm ``bn``."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 3, stride: int = 2, padding: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel, stride, padding, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))

    def folded(self) -> nn.Conv2d:
        return fuse_conv_bn_eval(self.c.eval(), self.bn.eval())


class LinearBN(nn.Module):
    """``Linear_BN``: a bias-free linear ``c`` and a BatchNorm1d ``bn`` over the channels of every token."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.c = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)

    def folded(self) -> nn.Linear:
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        linear = nn.Linear(self.c.in_features, self.c.out_features)
        with torch.no_grad():
            linear.weight.copy_(self.c.weight * scale[:, None])
            linear.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        return linear


class BNLinear(nn.Module):
    """``BN_Linear``: BatchNorm1d ``bn`` on the pooled features, then the linear ``l``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.l = nn.Linear(in_features, out_features)  # noqa: E741 - the official name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.bn(x))

    def folded(self) -> nn.Linear:
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        shift = self.bn.bias - self.bn.running_mean * scale
        linear = nn.Linear(self.l.in_features, self.l.out_features)
        with torch.no_grad():
            linear.weight.copy_(self.l.weight * scale[None, :])
            linear.bias.copy_(self.l.bias + self.l.weight @ shift)
        return linear


def stem(cfg: LeViTConfig) -> nn.Sequential:
    """``b16``: channels C/8, C/4, C/2, C with Hardswish between (keys ``patch_embed.{0,2,4,6}``)."""
    widths = [cfg.in_chans] + [cfg.embed_dim // 2 ** (STEM_CONVS - 1 - i) for i in range(STEM_CONVS)]
    layers: list[nn.Module] = []
    for i in range(STEM_CONVS):
        if i:
            layers.append(nn.Hardswish())
        layers.append(Conv2dBN(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


class LeViTAttention(nn.Module):
    """LeViT ``Attention`` without position bias (Evo-LeViT's): per head q, k (D) and v (2D) from one ``qkv``."""

    def __init__(self, dim: int, heads: int, key_dim: int):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = heads, key_dim, ATTN_RATIO * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearBN(dim, heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(heads * self.value_dim, dim))
        self.learn_tradeoff = nn.Parameter(torch.zeros(1))

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and the softmax map [B, H, N, N]."""
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, -1)), attn


class Residual(nn.Module):
    """``Residual`` at eval: ``x + m(x)`` (drop path is training-only)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


def mlp(dim: int) -> nn.Sequential:
    hidden = MLP_RATIO * dim
    return nn.Sequential(LinearBN(dim, hidden), nn.Hardswish(), LinearBN(hidden, dim))


class AttentionBlock(nn.Module):
    """One ``CatModule`` of ``blocks``: residual attention ``m1`` and residual MLP ``m2``."""

    def __init__(self, dim: int, heads: int, key_dim: int):
        super().__init__()
        self.m1 = Residual(LeViTAttention(dim, heads, key_dim))
        self.m2 = Residual(mlp(dim))

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` after the attention residual, that residual's update, and the attention map."""
        update, attn = self.m1.m.forward_with_attn(x)
        return x + update, update, attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m2(self.attention(x)[0])


def subsample_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``Subsample`` without a class token: every other row and column of a [B, grid*grid, ...] sequence."""
    batch = x.shape[0]
    rest = x.shape[2:]
    return x.reshape(batch, grid, grid, *rest)[:, ::2, ::2].reshape(batch, -1, *rest)


class Subsample(nn.Module):
    """``Subsample`` with the class token kept in front (``q.0``: no parameters)."""

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], subsample_grid(x[:, 1:], self.grid)], dim=1)


class AttentionSubsample(nn.Module):
    """``AttentionSubsample``: keys/values on the grid, queries on the stride-2 grid, its own ``poss``."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, key_dim: int, grid: int):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = heads, key_dim, SUBSAMPLE_ATTN_RATIO * key_dim
        self.scale = key_dim**-0.5
        self.grid = grid
        self.kv = LinearBN(in_dim, heads * (key_dim + self.value_dim))
        self.q = nn.Sequential(Subsample(grid), LinearBN(in_dim, heads * key_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(heads * self.value_dim, out_dim))
        self.poss = nn.Parameter(torch.zeros(1, grid * grid + 1, in_dim))
        self.learn_tradeoff = nn.Parameter(torch.zeros(1))

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output [B, 1 + n'^2, C'] (tokens in grid order, class token first) and the map [B, H, 1 + n'^2, 1 + n^2]."""
        x = x + self.poss
        batch, tokens, _ = x.shape
        k, v = self.kv(x).view(batch, tokens, self.num_heads, -1).split([self.key_dim, self.value_dim], dim=3)
        q = self.q(x)
        q = q.view(batch, q.shape[1], self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, q.shape[2], -1)), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attn(x)[0]


class LeViT(nn.Module):
    """Dense Evo-LeViT: every token through every block (the backbone a mechanism selects tokens in).

    ``blocks`` lists, per stage, its ``AttentionBlock`` pairs, then (between stages) the
    ``AttentionSubsample`` and its residual MLP, in the official order of ``blocks.*``.
    """

    def __init__(self, cfg: LeViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = stem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.poss = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        blocks: list[nn.Module] = []
        self.stage_layout: list[tuple[list[int], int | None]] = []  # per stage: its pairs' indices, its subsampling's
        grids = cfg.stage_grids
        for s, (dim, depth, heads) in enumerate(zip(cfg.stage_dims, cfg.stage_depths, cfg.stage_heads)):
            pairs = list(range(len(blocks), len(blocks) + depth))
            blocks.extend(AttentionBlock(dim, heads, cfg.key_dim) for _ in range(depth))
            sub = None
            if s + 1 < len(cfg.stage_dims):
                sub = len(blocks)
                out = cfg.stage_dims[s + 1]
                blocks.append(AttentionSubsample(dim, out, cfg.subsample_heads[s], cfg.key_dim, grids[s]))
                blocks.append(Residual(mlp(out)))
            self.stage_layout.append((pairs, sub))
        self.blocks = nn.ModuleList(blocks)
        self.head = BNLinear(cfg.stage_dims[-1], cfg.num_classes)
        self.head_dist = BNLinear(cfg.stage_dims[-1], cfg.num_classes) if cfg.distilled_head else None
        nn.init.trunc_normal_(self.poss, std=0.02)
        for module in self.modules():
            if isinstance(module, AttentionSubsample):
                nn.init.trunc_normal_(module.poss, std=0.02)

    def set_fused_attention(self, enabled: bool) -> None:
        """One explicit attention path (the map is always needed); kept for the loader's interface."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Class token, then the stem's patch tokens in grid order, plus ``poss``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.poss

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens; both heads averaged (the class token is not classified at eval)."""
        pooled = x[:, 1:].mean(dim=1)
        logits = self.head(pooled)
        if self.head_dist is not None:
            logits = (logits + self.head_dist(pooled)) / 2
        return logits

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.classify(x), []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0]


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Every ``Conv2d_BN`` / ``Linear_BN`` / ``BN_Linear`` in ``model`` as one conv / linear, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Conv2dBN, LinearBN, BNLinear)):
                setattr(parent, name, child.folded())
    return model


# ---------------------------------------------------------------- FLOPs (2 x multiply-adds of convs and matmuls)


def attention_macs(dim: int, heads: int, key_dim: int, tokens: int) -> int:
    """One attention + MLP pair on ``tokens`` tokens."""
    hd = heads * key_dim
    attention = tokens * dim * 4 * hd + heads * tokens * tokens * 3 * key_dim + tokens * 2 * hd * dim
    return attention + tokens * dim * MLP_RATIO * dim * 2


def stem_macs(cfg: LeViTConfig) -> int:
    size, channels, total = cfg.img_size, cfg.in_chans, 0
    for i in range(STEM_CONVS):
        size = (size - 1) // 2 + 1
        out = cfg.embed_dim // 2 ** (STEM_CONVS - 1 - i)
        total += size * size * out * channels * 9
        channels = out
    return total


def subsample_macs(cfg: LeViTConfig, stage: int) -> int:
    """The subsampling attention after ``stage`` and its MLP."""
    dim, out, heads, key_dim = cfg.stage_dims[stage], cfg.stage_dims[stage + 1], cfg.subsample_heads[stage], cfg.key_dim
    tokens, queries = cfg.stage_grids[stage] ** 2 + 1, cfg.stage_grids[stage + 1] ** 2 + 1
    hd = heads * key_dim
    attention = tokens * dim * 5 * hd + queries * dim * hd + heads * queries * tokens * 5 * key_dim
    return attention + queries * 4 * hd * out + queries * out * MLP_RATIO * out * 2


def flops(cfg: LeViTConfig, tokens_per_block: list[int]) -> int:
    """FLOPs with ``tokens_per_block[i]`` tokens through attention block i (class and fused tokens included)."""
    heads_macs = (1 + int(cfg.distilled_head)) * cfg.stage_dims[-1] * cfg.num_classes
    total = stem_macs(cfg) + heads_macs + sum(subsample_macs(cfg, s) for s in range(len(cfg.stage_dims) - 1))
    for block, tokens in enumerate(tokens_per_block):
        stage = cfg.stage_of_block[block]
        total += attention_macs(cfg.stage_dims[stage], cfg.stage_heads[stage], cfg.key_dim, tokens)
    return 2 * total


def dense_flops(cfg: LeViTConfig) -> int:
    return flops(cfg, [cfg.stage_grids[s] ** 2 + 1 for s in cfg.stage_of_block])
