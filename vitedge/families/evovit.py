"""Evo-ViT (Xu et al., AAAI 2022): slow-fast token evolution, global class attention with an EMA.

Eval semantics of the official DeiT code (YifanXu74/Evo-ViT, ``deit/evo_deit.py``,
``EvoVisionTransformer.forward_features`` with ``stage_wise_prune`` and ``prunecls=False``):

- Every block scores the patch tokens by the class token's attention summed over heads,
  ``a_i = sum_h attn[:, h, 0, 1:]``. Block 0 sets the global score ``s = a_0``; later blocks
  accumulate it, ``s = (1 - t_i) * s + t_i * a_i`` with the per-block ``tradeoff`` t
  (official: 1 for blocks 1-3, so ``s`` is just the latest row there, 0.5 from block 4 on).
- At blocks 4 and 8, before the block, the patch tokens and their scores are sorted by
  ``s``, descending; the class token and the first ``int(196 * 0.5) = 98`` ("slow" tokens) go
  through the blocks of that stage, the other 98 are placeholders that keep their values.
  Inside a stage the EMA updates only the first 98 scores; the rest keep theirs.
- After the last block of a stage (7 and 11) the updated tokens are written back over the
  first 99 positions; the DeiT code has no fast update of the placeholders.
- The output is ``head(norm(mean of all 196 patch tokens))``: the class token is not pooled
  and not classified (``head_cls`` / ``norm_cls`` serve a training-only loss).

Checkpoints keep the official parameter names, which this module's models use as they are:
``qks.i.qk`` (q and k, [2C, C]), ``vs.i.v``, ``norms.i`` (the pre-attention norm),
``projs.i``, ``blocks.i.norm2`` / ``blocks.i.mlp``.

On LeViT (``levit/evo_levit.py``, ``evo_levit_384.py``: Evo-LeViT) the official code selects per
stage instead (``StageModule``, see ``EvoLeViT``); its static form is ``StaticEvoLeViT``.

The static form fixes the slow-token counts: the sort is a TopK with K = all patches (a
constant), the slow tokens a prefix of the sorted tokens, and the write-back a Concat of the
updated prefix with the untouched placeholders, so the graph holds no scatter at all. q, k and
v run as one fused projection (the two official weights concatenated).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import Mlp, ViTConfig, VisionTransformer, _init_weights
from ..backbones.levit import LeViT, LeViTConfig, is_levit, subsample_grid
from ..errors import VitedgeError
from ..rewrite import rewrites
from ..tokens import gather_tokens, patch_positions, record_topk_margin, top_tokens
from . import (
    ONE_OR_LIST,
    BlockTokens,
    Family,
    Setting,
    TokenPlan,
    block_list_setting,
    blocks_and_keep_rates,
    family,
    keep_rate_candidates,
    keep_rate_setting,
)

TRAINING_ONLY_PREFIXES = ("head_cls.", "norm_cls.", "head_cls_dist.")
OFFICIAL_TRADEOFF = 0.5  # the EMA coefficient of the official models from block 4 on


def default_split_blocks(depth: int) -> list[int]:
    """Blocks 4 and 8 for the usual depth 12: the same thirds of the depth otherwise."""
    return [depth // 3, 2 * depth // 3]


def slow_count(keep_rate: float, num_patches: int) -> int:
    """Slow (updated) patch tokens of ``num_patches``, as the official code rounds (int, down)."""
    return int(num_patches * keep_rate)


def default_tradeoff(depth: int, first_split: int, tradeoff: float = OFFICIAL_TRADEOFF) -> list[float]:
    """Official per-block EMA coefficients: 1 (latest row only) before the first split, then ``tradeoff``."""
    return [1.0] * first_split + [float(tradeoff)] * (depth - first_split)


def head_class_attention(attn: torch.Tensor) -> torch.Tensor:
    """Attention of the class token to the patch tokens, summed over heads: [B, H, N, N] → [B, N-1]."""
    return attn[:, :, 0, 1:].sum(dim=1)


def ema(scores: torch.Tensor, row: torch.Tensor, tradeoff: float) -> torch.Tensor:
    return (1 - tradeoff) * scores + tradeoff * row


class QKAttention(nn.Module):
    """The official ``qks.i``: q and k from one projection, returns the softmax map [B, H, N, N]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
        self.qk = nn.Linear(cfg.embed_dim, cfg.embed_dim * 2, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k = self.qk(x).reshape(batch, tokens, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)


class VProjection(nn.Module):
    """The official ``vs.i``: v split into heads, [B, H, N, d]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.v = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return self.v(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)


class MlpBlock(nn.Module):
    """The official ``blocks.i``: only the MLP half of a transformer block (``norm2``, ``mlp``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


class EvoViT(VisionTransformer):
    """Reference model: the official eval forward, written without in-place writes."""

    def __init__(self, cfg: ViTConfig, keep_rates: list[float], split_blocks: list[int], tradeoff: list[float]):
        super().__init__(cfg, lambda i: MlpBlock(cfg))
        self.qks = nn.ModuleList(QKAttention(cfg) for _ in range(cfg.depth))
        self.vs = nn.ModuleList(VProjection(cfg) for _ in range(cfg.depth))
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.embed_dim, eps=1e-6) for _ in range(cfg.depth))
        self.projs = nn.ModuleList(nn.Linear(cfg.embed_dim, cfg.embed_dim) for _ in range(cfg.depth))
        self.apply(_init_weights)
        self.keep_rates = list(keep_rates)
        self.split_blocks = list(split_blocks)
        self.tradeoff = list(tradeoff)
        self.slow = [slow_count(rate, cfg.num_patches) for rate in keep_rates]

    def stage_ends(self) -> list[int]:
        """Last block of each stage, after which the slow tokens are written back (7 and 11)."""
        return [b - 1 for b in self.split_blocks[1:]] + [self.cfg.depth - 1]

    def attention(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s attention half: the residual output and the head-summed class attention row."""
        h = self.norms[i](x)
        attn = self.qks[i](h)
        out = (attn @ self.vs[i](h)).transpose(1, 2).reshape(x.shape)
        return x + self.projs[i](out), head_class_attention(attn)

    def sort_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        # stable: on exact ties the lower index wins, as ONNX TopK (the static form) decides
        return torch.argsort(scores, dim=1, descending=True, stable=True)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All 1 + N tokens after the last block and the original patch indices of the slow tokens per stage."""
        x = self.embed(images)
        positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
        scores, full, slow, kept = None, None, 0, []
        ends = self.stage_ends()
        for i, block in enumerate(self.blocks):
            if i in self.split_blocks:
                slow = self.slow[self.split_blocks.index(i)]
                record_topk_margin(scores, slow)
                order = self.sort_tokens(scores)
                scores, positions = gather_tokens(scores, order), gather_tokens(positions, order)
                full = torch.cat([x[:, :1], gather_tokens(x[:, 1:], order)], dim=1)
                x = full[:, : slow + 1]
                kept.append(positions[:, :slow])
            x, row = self.attention(i, x)
            if i == 0:
                scores = row
            elif full is None:
                scores = ema(scores, row, self.tradeoff[i])
            else:
                scores = torch.cat([ema(scores[:, :slow], row, self.tradeoff[i]), scores[:, slow:]], dim=1)
            x = block(x)
            if full is not None and i in ends:
                x = torch.cat([x, full[:, slow + 1 :]], dim=1)
        return x, kept

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens (class token left out), then norm and head."""
        return self.head(self.norm(x[:, 1:].mean(dim=1)))

    def forward_tokens(self, images):
        x, kept = self.forward_features(images)
        return self.classify(x), kept


def fused_qkv(qk: nn.Linear, v: nn.Linear) -> nn.Linear:
    """``qkv = cat(qk, v)``: the timm layout of the same weights (q, k, v rows in that order)."""
    fused = nn.Linear(qk.in_features, qk.out_features + v.out_features, bias=qk.bias is not None)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([qk.weight, v.weight]))
        if qk.bias is not None:
            fused.bias.copy_(torch.cat([qk.bias, v.bias]))
    return fused


class StaticEvoViT(EvoViT):
    """Same weights; constant slow counts, the sort as a TopK with constant K, fused qkv."""

    def __init__(self, model: EvoViT, plan: TokenPlan):
        super().__init__(model.cfg, model.keep_rates, model.split_blocks, model.tradeoff)
        self.load_state_dict(model.state_dict())
        self.slow = [step["kept_patches"] for step in plan.selections]
        self.qkvs = nn.ModuleList(fused_qkv(q.qk, v.v) for q, v in zip(self.qks, self.vs))

    def attention(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One [3C, C] projection instead of the official [2C, C] + [C, C] (one GEMM, same values)."""
        batch, tokens, channels = x.shape
        heads = self.cfg.num_heads
        qkv = self.qkvs[i](self.norms[i](x)).reshape(batch, tokens, 3, heads, channels // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.qks[i].scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return x + self.projs[i](out), head_class_attention(attn)

    def sort_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        return top_tokens(scores, scores.shape[1])  # K = every patch: a constant TopK (sorted, descending)


@rewrites(EvoViT)
def _static_evovit(model: EvoViT, plan: TokenPlan) -> StaticEvoViT:
    return StaticEvoViT(model, plan)


# ---------------------------------------------------------------- Evo-LeViT


def levit_default_split_blocks(cfg: LeViTConfig) -> list[int]:
    """The official ``prune_ratio_list``: blocks 0 and 1 dense, every later block of each stage selected,
    so each stage's selection starts at its first block from block 2 on (128S: 2, 5; the others: 2, 4, 8)."""
    starts, first = [], 0
    for depth in cfg.stage_depths:
        start = max(first, 2)
        if start < first + depth:
            starts.append(start)
        first += depth
    return starts


def fuse_dropped(dropped: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``merge_tokens``: the dropped tokens [B, M, C] as one token, weighted by their normalised scores [B, M]."""
    weights = scores / scores.sum(dim=1, keepdim=True)
    return weights.unsqueeze(1) @ dropped


def level_class_attention(attn: torch.Tensor, tokens: int) -> torch.Tensor:
    """The class token's attention to the first ``tokens`` patch tokens, averaged over heads (Evo-LeViT: mean, not sum)."""
    return attn[:, :, 0, 1 : 1 + tokens].mean(dim=1)


class EvoLeViT(LeViT):
    """Reference model: Evo-LeViT's eval forward (``stage_wise_prune``, ``learn_tradeoff_mode``) without in-place writes.

    - Every attention updates the global score ``s`` over the current stage's patch tokens:
      block 0 sets it to the class attention (head mean), later blocks mix it in with
      ``t = sigmoid(learn_tradeoff)``: ``s = (1 - t) s + t a``.
    - At a stage's split block the patch tokens and scores are sorted by ``s`` (descending);
      the first ``k = int(N * keep_rate)`` run through the rest of the stage with one extra
      token, the other N - k fused into it by their normalised scores; inside the stage the
      EMA updates the first k scores only (all N where one token was dropped: the fused token
      is then that token). The fused token's residual updates (attention and MLP of every
      block) are added to every dropped token at the end of the stage (the fast update).
    - Each subsampling restores the grid order, subsamples the scores with the grid, mixes in
      its own class attention (subsampled the same way) with its ``learn_tradeoff`` and
      rescales the scores to the sum they had.
    - Logits: the head average on the mean of the patch tokens.
    """

    def __init__(self, cfg: LeViTConfig, keep_rates: list[float], split_blocks: list[int]):
        super().__init__(cfg)
        self.keep_rates = list(keep_rates)
        self.split_blocks = list(split_blocks)
        self.slow = [levit_slow_count(cfg, block, rate) for block, rate in zip(split_blocks, keep_rates)]

    def sort_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.argsort(scores, dim=1, descending=True, stable=True)

    def grid_order(self, positions: torch.Tensor) -> torch.Tensor:
        """The permutation that puts tokens at ``positions`` back into grid order."""
        return torch.argsort(positions, dim=1)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(images)
        scores, kept, block_index = None, [], 0
        for stage, (pairs, sub) in enumerate(self.stage_layout):
            positions = patch_positions(x.shape[0], x.shape[1] - 1, x.device)
            dropped = update = None
            for pair in pairs:
                block = self.blocks[pair]
                if block_index in self.split_blocks:
                    slow = self.slow[self.split_blocks.index(block_index)]
                    record_topk_margin(scores, slow)
                    order = self.sort_tokens(scores)
                    scores, positions = gather_tokens(scores, order), gather_tokens(positions, order)
                    patches = gather_tokens(x[:, 1:], order)
                    dropped, update = patches[:, slow:], 0
                    kept.append(positions[:, :slow])
                    x = torch.cat([x[:, :1], patches[:, :slow], fuse_dropped(dropped, scores[:, slow:])], dim=1)
                x, attn_update, attn = block.attention(x)
                tradeoff = torch.sigmoid(block.m1.m.learn_tradeoff)
                if scores is None:
                    scores = level_class_attention(attn, x.shape[1] - 1)
                elif scores.shape[1] == x.shape[1] - 1:  # every token its own: dense, or one token dropped
                    scores = ema(scores, level_class_attention(attn, x.shape[1] - 1), tradeoff)
                else:
                    slow = x.shape[1] - 2
                    scores = torch.cat([ema(scores[:, :slow], level_class_attention(attn, slow), tradeoff),
                                        scores[:, slow:]], dim=1)
                mlp_update = block.m2.m(x)
                x = x + mlp_update
                if dropped is not None:
                    update = update + attn_update[:, -1:] + mlp_update[:, -1:]
                block_index += 1
            if dropped is not None:
                x = torch.cat([x[:, :-1], dropped + update], dim=1)
            if sub is not None:
                if dropped is not None:
                    order = self.grid_order(positions)
                    x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], order)], dim=1)
                    scores = gather_tokens(scores, order)
                x, scores = self.subsample(sub, x, scores)
        return x, kept

    def subsample(self, index: int, x: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``AttentionSubsample`` and its MLP on tokens in grid order; the score follows the grid."""
        sub = self.blocks[index]
        total = scores.sum(dim=1, keepdim=True)
        out, attn = sub.forward_with_attn(x)
        row = subsample_grid(attn[:, :, 0, 1:].mean(dim=1), sub.grid)
        scores = ema(subsample_grid(scores, sub.grid), row, torch.sigmoid(sub.learn_tradeoff))
        scores = scores * (total / scores.sum(dim=1, keepdim=True))
        return self.blocks[index + 1](out), scores

    def forward_tokens(self, images):
        x, kept = self.forward_features(images)
        return self.classify(x), kept


class StaticEvoLeViT(EvoLeViT):
    """Same weights; constant slow counts, the sort and the grid restore as TopK with constant K."""

    def __init__(self, model: EvoLeViT, plan: TokenPlan):
        super().__init__(model.cfg, model.keep_rates, model.split_blocks)
        self.load_state_dict(model.state_dict())
        self.slow = [step["kept_patches"] for step in plan.selections]

    def sort_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        return top_tokens(scores, scores.shape[1])

    def grid_order(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.topk(positions.float(), positions.shape[1], dim=1, largest=False, sorted=True).indices


@rewrites(EvoLeViT)
def _static_evolevit(model: EvoLeViT, plan: TokenPlan) -> StaticEvoLeViT:
    return StaticEvoLeViT(model, plan)


def levit_slow_count(cfg: LeViTConfig, block: int, keep_rate: float) -> int:
    """Tokens a split at ``block`` keeps of its stage's grid, as ``StageModule`` rounds (int, down)."""
    return int(cfg.stage_grids[cfg.stage_of_block[block]] ** 2 * keep_rate)


def levit_settings(cfg: LeViTConfig, overrides: dict) -> dict:
    """Split blocks (one per stage at most: its ``StageModule``) and their keep rates; the EMA coefficient is learned."""
    if overrides.get("tradeoff") is not None:
        raise VitedgeError("Evo-LeViT learns its EMA coefficient per attention (learn_tradeoff); "
                           "the tradeoff setting applies to the DeiT models only: drop it")
    blocks, rates = blocks_and_keep_rates(overrides.get("split_blocks") or levit_default_split_blocks(cfg),
                                          overrides.get("keep_rate", 0.5), cfg.depth)
    if blocks[0] < 1:
        raise VitedgeError("split block 0 has no class attention to sort by yet; the first split block must be >= 1")
    stages = [cfg.stage_of_block[b] for b in blocks]
    for first, second in zip(blocks, blocks[1:]):
        if cfg.stage_of_block[first] == cfg.stage_of_block[second]:
            raise VitedgeError(f"split blocks {first} and {second} are both in stage {cfg.stage_of_block[first] + 1}; "
                               "Evo-LeViT selects once per stage: give at most one split block per stage")
    for block, rate, stage in zip(blocks, rates, stages):
        tokens = cfg.stage_grids[stage] ** 2
        slow = levit_slow_count(cfg, block, rate)
        if not 1 <= slow < tokens:
            raise VitedgeError(f"keep rate {rate:g} at block {block} keeps int({tokens} x {rate:g}) = {slow} of stage "
                               f"{stage + 1}'s {tokens} tokens; Evo-LeViT keeps at least 1 and drops at least 1")
    return {"keep_rate": rates, "split_blocks": blocks}


def levit_token_plan(cfg: LeViTConfig, settings: dict) -> TokenPlan:
    splits = dict(zip(settings["split_blocks"], settings["keep_rate"]))
    blocks, selections, stage_tokens = [], [], None
    for block, stage in enumerate(cfg.stage_of_block):
        patches = cfg.stage_grids[stage] ** 2
        if block == 0 or stage != cfg.stage_of_block[block - 1]:
            stage_tokens = patches + 1
        if block in splits:
            slow = levit_slow_count(cfg, block, splits[block])
            stage_tokens = slow + 2  # class token, the slow tokens, the fused token
            selections.append({"block": block, "kept_patches": slow, "tokens_after": stage_tokens,
                               "placeholders": patches - slow, "stage": stage})
        blocks.append(BlockTokens(stage_tokens, stage_tokens))
    return TokenPlan(tuple(blocks), tuple(selections))


def _check_tradeoff(value, depth: int) -> list[float] | float:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise VitedgeError(f"tradeoff must be a number in [0, 1] or a list of {depth}, got {value!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise VitedgeError(f"tradeoff (the EMA coefficient) must be in [0, 1], got {value!r}")
    if isinstance(value, (list, tuple)):
        if len(values) != depth:
            raise VitedgeError(f"tradeoff list has {len(values)} values; give one per block ({depth}) or a single number")
        return values
    return values[0]


@family("evovit")
class EvoViTFamily(Family):
    summary = "slow-fast token evolution: top class-attention tokens updated, the rest kept as placeholders"
    paper = "Xu et al., Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer, AAAI 2022"
    signature_keys = ("qks.", "vs.0.v.", "stage_blocks.")
    backbone_features = frozenset({"levit"})  # Evo-LeViT (levit/evo_levit.py)

    settings = (
        keep_rate_setting(0.5, ONE_OR_LIST, "slow (updated) share of the patch tokens from each split block on"),
        block_list_setting("split_blocks", "blocks where tokens are re-sorted into slow and fast (default: depth/3, "
                           "2/3; LeViT: where each stage's selection starts, its first block from block 2 on)"),
        Setting("tradeoff", float, "EMA coefficient of the class-attention score: one for the blocks from the first "
                "split on, or one per block (LeViT learns it: not settable)", OFFICIAL_TRADEOFF, ONE_OR_LIST, minimum=0.0, maximum=1.0),
    )

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        if is_levit(cfg):
            return levit_settings(cfg, overrides)
        blocks, rates = blocks_and_keep_rates(
            overrides.get("split_blocks") or default_split_blocks(cfg.depth), overrides.get("keep_rate", 0.5), cfg.depth
        )
        if blocks[0] < 1:
            raise VitedgeError("split block 0 has no class attention to sort by yet; the first split block must be >= 1")
        for block, rate in zip(blocks, rates):
            if slow_count(rate, cfg.num_patches) < 1:
                raise VitedgeError(
                    f"keep rate {rate:g} at block {block} keeps int({cfg.num_patches} x {rate:g}) = 0 patch tokens; "
                    f"use a rate >= 1/{cfg.num_patches}"
                )
        tradeoff = _check_tradeoff(overrides.get("tradeoff", OFFICIAL_TRADEOFF), cfg.depth)
        if not isinstance(tradeoff, list):
            tradeoff = default_tradeoff(cfg.depth, blocks[0], tradeoff)
        return {"keep_rate": rates, "split_blocks": blocks, "tradeoff": tradeoff}

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        """The slow (updated) share of the patch tokens; 1.0 updates every token like a dense block
        (not on LeViT, whose stage selection drops at least one token)."""
        if is_levit(cfg):
            return keep_rate_candidates((0.8, 0.7, 0.6, 0.5, 0.4, 0.3))
        return keep_rate_candidates((1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3))

    def adapt_state_dict(self, state_dict):
        """The official keys are this model's; the class-token head and norm only serve training."""
        dropped = sorted(k for k in state_dict if k.startswith(TRAINING_ONLY_PREFIXES))
        return {k: v for k, v in state_dict.items() if k not in dropped}, dropped

    def config_state_dict(self, state_dict):
        """Block 0's fused qkv (``cat(qk, v)``), which is what the shape inference reads."""
        view = dict(state_dict)
        for suffix in ("weight", "bias"):
            qk, v = state_dict.get(f"qks.0.qk.{suffix}"), state_dict.get(f"vs.0.v.{suffix}")
            if qk is not None and v is not None:
                view[f"blocks.0.attn.qkv.{suffix}"] = torch.cat([qk, v])
        return view

    def reference(self, cfg: ViTConfig, settings: dict) -> EvoViT | EvoLeViT:
        if is_levit(cfg):
            return EvoLeViT(cfg, settings["keep_rate"], settings["split_blocks"])
        return EvoViT(cfg, settings["keep_rate"], settings["split_blocks"], settings["tradeoff"])

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        if is_levit(cfg):
            return levit_token_plan(cfg, settings)
        splits = dict(zip(settings["split_blocks"], settings["keep_rate"]))
        tokens = cfg.num_patches + 1
        blocks, selections = [], []
        for i in range(cfg.depth):
            if i in splits:
                slow = slow_count(splits[i], cfg.num_patches)
                tokens = slow + 1
                selections.append({"block": i, "kept_patches": slow, "tokens_after": tokens,
                                   "placeholders": cfg.num_patches - slow})
            blocks.append(BlockTokens(tokens, tokens))
        return TokenPlan(tuple(blocks), tuple(selections))
