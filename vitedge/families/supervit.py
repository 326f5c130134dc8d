"""SuperViT (Lin et al., IJCV 2023): one ViT trained for several input sizes and keep rates.

Eval semantics of the official code (lmbxmu/SuperViT, ``deit/super_deit.py``,
``forward(x, img_size, keep_ratio)``):

- the input is resized to ``img_size`` with ``F.interpolate(mode="bilinear",
  align_corners=True)`` (no antialiasing; the official eval feeds 224 px crops, so the
  smaller sizes are downscaled inside the model, and 224 → 224 is the identity);
- the position embedding is ``pos_embed_list[img_sizes.index(img_size)]``, one table per
  trained size (128/160/192/224 for DeiT-S, 8x8 … 14x14 patches);
- at blocks 3, 6, 9 (only when ``keep_ratio != 1``), between attention and MLP, the
  head-averaged attention of the class token scores the patch tokens and the class token plus
  the top ``ceil(keep_ratio * N)`` patch tokens stay, highest score first, where N is the
  live token count *including* the class token (EViT uses N − 1); the others are dropped,
  not fused: 197 → 139 → 99 → 71 at 224 px and keep 0.7.

Settings: ``resolution`` (the size the input is resized to) out of ``resolutions`` (the
sizes with a position table), ``keep_rate`` out of ``keep_rates`` (the trained set,
{0.5, 0.7, 1}). Other values were never trained, so they are refused.

The static form of one (resolution, keep rate) variant: a Resize to the constant resolution
inside the graph (every variant takes the same input, see docs/supervit.md), the one position
table as a constant, and a constant-K TopK + flat Gather at each pruning block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Block, ViTConfig, VisionTransformer, stem_head_flops
from ..errors import VitedgeError
from ..rewrite import rewrites
from ..tokens import class_attention, gather_tokens, patch_positions, record_topk_margin, top_tokens
from . import (
    BlockTokens,
    Family,
    TokenPlan,
    check_keep_rate,
    LIST,
    ONE_OR_LIST,
    Alias,
    Setting,
    block_list_setting,
    check_prune_blocks,
    default_prune_blocks,
    family,
    keep_rate_setting,
)

TRAINED_KEEP_RATES = (0.5, 0.7, 1.0)
# lvvit/models/super_lvvit.py: eval logits add 0.25 x the max over patches of aux_head (LV-ViT itself: 0.5),
# and selection runs at blocks 3, 6, 9 whatever the depth (``index in [3,6,9]``), 16 blocks for LV-ViT-S.
LVVIT_AUX_WEIGHT = 0.25
LVVIT_PRUNE_BLOCKS = [3, 6, 9]
# The official sizes 128/160/192/224 are 4/7 … 7/7 of the full input; the same fractions of
# another grid give its default sizes (Fashion-MNIST, 7x7 patches of 4 px: 16/20/24/28).
SIZE_FRACTIONS = (4, 5, 6, 7)


def kept_count(keep_rate: float, tokens: int) -> int:
    """Patch tokens kept out of ``tokens`` (class token included), as the official code rounds.

    ``math.ceil(keep_ratio * cur_token_num)`` with the class token counted, at most every patch.
    """
    return min(math.ceil(keep_rate * tokens), tokens - 1)


def default_resolutions(cfg: ViTConfig) -> list[int]:
    grid = cfg.grid_size
    return sorted({max(1, round(grid * k / SIZE_FRACTIONS[-1])) * cfg.patch_size for k in SIZE_FRACTIONS})


def resize_to(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """The official resize: bilinear, corners aligned, no antialiasing (identity at the same size)."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=True)


class SuperViTBlock(Block):
    """A block that drops the least attended patch tokens between attention and MLP (keep rate < 1)."""

    def __init__(self, cfg: ViTConfig, block_index: int, keep_rate: float = 1.0):
        super().__init__(cfg)
        self.block_index = block_index
        self.keep_rate = keep_rate

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep_rate == 1:
            return super().forward(x), positions
        attn_out, attn = self.attn.forward_with_attn(self.norm1(x))
        x = x + self.ls1(attn_out)
        x, positions = self.select(x, class_attention(attn), positions)
        return x + self.ls2(self.mlp(self.norm2(x))), positions

    def select(self, x: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor):
        """Reference selection as the official code computes it: k from the live count, argsort descending."""
        keep = kept_count(self.keep_rate, x.shape[1])
        record_topk_margin(scores, keep)
        index = torch.argsort(scores, dim=1, descending=True)[:, :keep]
        return torch.cat([x[:, :1], gather_tokens(x[:, 1:], index)], dim=1), gather_tokens(positions, index)


class StaticSuperViTBlock(nn.Module):
    """SuperViTBlock with a constant ``keep``: TopK with a constant K and a flat Gather."""

    def __init__(self, block: SuperViTBlock, keep: int):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.ls1, self.ls2 = block.ls1, block.ls2
        self.keep = keep

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, attn = self.attn.forward_with_attn(self.norm1(x))
        x = x + self.ls1(attn_out)
        index = top_tokens(class_attention(attn), self.keep)
        x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], index)], dim=1)
        return x + self.ls2(self.mlp(self.norm2(x))), gather_tokens(positions, index)


class SuperViT(VisionTransformer):
    """DeiT with one position table per trained input size (``pos_embed_list.{i}``, official keys).

    One model serves every (resolution, keep rate) pair; ``set_variant`` switches between them
    (training samples a pair per batch, the reference and each static graph fix one).
    """

    def __init__(self, cfg: ViTConfig, resolutions: list[int], resolution: int, keep_rate: float, prune_blocks: list[int]):
        super().__init__(cfg, lambda i: SuperViTBlock(cfg, i) if i in prune_blocks else Block(cfg))
        del self.pos_embed
        self.aux_weight = LVVIT_AUX_WEIGHT
        self.resolutions = list(resolutions)
        self.prune_blocks = list(prune_blocks)
        self.pos_embed_list = nn.ParameterList(
            nn.Parameter(torch.zeros(1, (size // cfg.patch_size) ** 2 + 1, cfg.embed_dim)) for size in self.resolutions
        )
        for table in self.pos_embed_list:
            nn.init.trunc_normal_(table, std=0.02)
        self.set_variant(resolution, keep_rate)

    def set_variant(self, resolution: int, keep_rate: float) -> None:
        self.resolution = resolution
        self.keep_rate = keep_rate
        for i in self.prune_blocks:
            self.blocks[i].keep_rate = keep_rate

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(resize_to(images, self.resolution))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed_list[self.resolutions.index(self.resolution)]

    def forward_tokens(self, images):
        x = self.embed(images)
        positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
        kept = []
        for i, block in enumerate(self.blocks):
            if i in self.prune_blocks:
                x, positions = block(x, positions)
                if block.keep_rate != 1:
                    kept.append(positions)
            else:
                x = block(x)
        return self.classify(x), kept


class StaticSuperViT(nn.Module):
    """One variant: a constant resize, the variant's position table, constant-K selections."""

    def __init__(self, model: SuperViT, plan: SuperViTPlan):
        super().__init__()
        self.resolution = plan.resolution
        self.cfg, self.aux_weight = model.cfg, model.aux_weight
        self.patch_embed, self.cls_token, self.norm, self.head = model.patch_embed, model.cls_token, model.norm, model.head
        self.aux_head = model.aux_head
        self.pos_embed = model.pos_embed_list[model.resolutions.index(plan.resolution)]
        keeps = {step["block"]: step["kept_patches"] for step in plan.selections}
        self.blocks = nn.ModuleList(
            StaticSuperViTBlock(block, keeps[i]) if i in keeps else block for i, block in enumerate(model.blocks)
        )
        self.selecting = sorted(keeps)

    def forward_tokens(self, images):
        x = self.patch_embed(resize_to(images, self.resolution))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
        kept = []
        for i, block in enumerate(self.blocks):
            if i in self.selecting:
                x, positions = block(x, positions)
                kept.append(positions)
            else:  # a SuperViTBlock at keep rate 1 is a plain block
                x = Block.forward(block, x)
        return self.classify(x), kept

    classify = VisionTransformer.classify

    def forward(self, images):
        return self.forward_tokens(images)[0]


@dataclass(frozen=True)
class SuperViTPlan(TokenPlan):
    """Token counts of one variant; the patch embedding runs at ``resolution``, not the input size."""

    resolution: int = 0

    def flops(self, cfg: ViTConfig) -> int:
        final = self.blocks[-1].mlp if self.blocks else None
        return super().flops(cfg) - stem_head_flops(cfg, final) + stem_head_flops(cfg.with_img_size(self.resolution), final)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "resolution": self.resolution}


@rewrites(SuperViT)
def _static_supervit(model: SuperViT, plan: SuperViTPlan) -> StaticSuperViT:
    return StaticSuperViT(model, plan)


def _int_list(value, name: str) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise VitedgeError(f"{name} must be whole pixel sizes, got {value!r}") from None


@family("supervit")
class SuperViTFamily(Family):
    summary = "one ViT for several input sizes x keep rates: a static graph per variant, bundled with a selector"
    paper = "Lin et al., Super Vision Transformer, IJCV 2023"
    signature_keys = ("pos_embed_list.",)
    backbone_features = frozenset({"lvvit"})

    settings = (
        Setting("resolution", int, "one resolution per variant: its input size in px, one the model has a position table for",
                minimum=1, label="{} px", choices_from="resolutions",
                aliases=(Alias("--sizes", many=True, help="Input sizes in px, e.g. 128,160,192,224 (the family's resolution)."),)),
        Setting("resolutions", int, "the sizes the model was trained for (one position table each)", shape=LIST, minimum=1),
        keep_rate_setting(0.7, ONE_OR_LIST, "keep rate of this variant at every pruning block, one it was trained for",
                          choices_from="keep_rates"),
        Setting("keep_rates", float, "the keep rates the model was trained for", shape=LIST, minimum=0.0, maximum=1.0,
                exclusive_minimum=True),
        block_list_setting("prune_blocks", "blocks that drop tokens (default: depth/4, /2, 3/4)"),
    )
    bundle_axes = ("resolution", "keep_rate")
    bundle_input_note = ("each variant resizes it inside its graph to its own resolution (bilinear, align_corners=True, "
                         "no antialiasing, as the official SuperViT forward)")

    def describe_input(self, cfg: ViTConfig, settings: dict) -> dict:
        """The user feeds the full-size tensor; the graph resizes it to this variant's size."""
        return {"resize": {"in_graph": settings["resolution"] != cfg.img_size, "to": settings["resolution"],
                           "mode": "bilinear", "align_corners": True, "antialias": False}}

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        resolutions = sorted(_int_list(overrides.get("resolutions") or default_resolutions(cfg), "resolutions"))
        for size in resolutions:
            if size <= 0 or size % cfg.patch_size:
                raise VitedgeError(f"resolution {size} is not a positive multiple of the patch size {cfg.patch_size}")
        if len(set(resolutions)) != len(resolutions):
            raise VitedgeError(f"resolutions {resolutions} repeat a size")
        trained = tuple(sorted(check_keep_rate(r) for r in (overrides.get("keep_rates") or TRAINED_KEEP_RATES)))
        resolution = overrides.get("resolution", cfg.img_size if cfg.img_size in resolutions else resolutions[-1])
        resolution = _int_list(resolution, "resolution")
        if len(resolution) != 1:
            raise VitedgeError(f"one resolution per variant, got {resolution}; export a bundle for several")
        if resolution[0] not in resolutions:
            raise VitedgeError(
                f"input size {resolution[0]} has no position embedding in this model; "
                f"use one of {', '.join(map(str, resolutions))} px"
            )
        rate = overrides.get("keep_rate", 0.7)
        if isinstance(rate, (list, tuple)):
            if len(set(rate)) != 1:
                raise VitedgeError(f"SuperViT uses one keep rate at every pruning block, got {list(rate)}")
            rate = rate[0]
        rate = check_keep_rate(rate, trained)
        official = LVVIT_PRUNE_BLOCKS if cfg.backbone == "lvvit" else default_prune_blocks(cfg.depth)
        blocks = check_prune_blocks(overrides.get("prune_blocks") or official, cfg.depth)
        return {"resolution": resolution[0], "resolutions": resolutions, "keep_rate": rate, "keep_rates": list(trained),
                "prune_blocks": blocks}

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        """Every trained (size, keep rate) variant, largest first (``vitedge tune``; bundles do the same offline)."""
        return [{"resolution": size, "keep_rate": rate}
                for size in reversed(settings["resolutions"]) for rate in reversed(settings["keep_rates"])]

    def reference(self, cfg: ViTConfig, settings: dict) -> SuperViT:
        return SuperViT(cfg, settings["resolutions"], settings["resolution"], settings["keep_rate"], settings["prune_blocks"])

    def token_plan(self, cfg: ViTConfig, settings: dict) -> SuperViTPlan:
        tokens = (settings["resolution"] // cfg.patch_size) ** 2 + 1
        rate = settings["keep_rate"]
        blocks, selections = [], []
        for i in range(cfg.depth):
            if i in settings["prune_blocks"] and rate != 1:
                keep = kept_count(rate, tokens)
                selections.append({"block": i, "kept_patches": keep, "tokens_after": keep + 1})
                blocks.append(BlockTokens(tokens, keep + 1))
                tokens = keep + 1
            else:
                blocks.append(BlockTokens(tokens, tokens))
        return SuperViTPlan(tuple(blocks), tuple(selections), resolution=settings["resolution"])
