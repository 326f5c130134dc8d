"""A-ViT (Yin et al., CVPR 2022): every token halts on its own, after a learned number of blocks.

Eval semantics of the official code (NVlabs/A-ViT, ``forward_features_act_token``): after
each block, token t gets a halting score h = sigmoid(gate_scale * x_t[0] - gate_center) from
channel 0 of its output (the last block sets h = 1 for every token) and accumulates it,
c_t += h. A token halts once c_t > 1 - eps (eps = 0.01). Halted tokens are not removed but
masked: their rows are zeroed before every later block, zeroed again inside it before each
LayerNorm'd branch, and as keys they get a -1000 attention bias. The prediction reads the
class token of the ACT sum: every block's output weighted by h while the token runs and by
the remainder R = 1 - (sum of earlier h) at the block where it halts. Checkpoints are plain
DeiT/timm keys; ``gate_scale`` and ``gate_center`` are arguments, not weights.

Two static forms share one module, ``StaticAViT``:

* **masked** (budget = all tokens at every block): the paper's computation with shapes
  [B, N, C] throughout, exact and no faster than dense;
* **fixed-budget**: before block l only the k_l least-halted tokens (lowest c, class token
  always) stay, by a constant TopK + gather, and halted ones inside the budget stay masked.
  A dropped token is halted in the reference as well as long as the live count fits the
  budget, and a halted token contributes exactly zero to the live tokens (zero weight in
  attention, zero ACT weight); the class output only reads the class token. So the
  fixed-budget graph is exact whenever the live count fits, and ``validate`` reports per
  block how often it did not.

Budgets come from data: ``vitedge.calibrate`` (see ``calibrate_budgets``) measures the live
tokens per block on calibration images and takes a quantile, rounded up to a multiple of 8.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..backbone import Block, ViTConfig, VisionTransformer, dense_flops
from ..errors import VitedgeError
from ..rewrite import rewrites
from ..tokens import gather_tokens, margins_recorded, patch_positions, record_margin, threshold_margin, top_tokens
from . import LIST, Alias, BlockTokens, Family, Setting, TokenPlan, family

HALT_EPS = 0.01  # the official ``self.eps``: a token halts once its cumulative score exceeds 1 - eps
MASK_BIAS = -1000.0  # the official ``masked_softmax_bias`` added to the logits of halted keys
HALTED_POSITION = -1  # ``kept_tokens_<block>`` entry of a budget slot holding a halted token
BUDGET_MULTIPLE = 8  # budgets are rounded up to hardware-friendly token counts
# ``vitedge tune``'s grid after the masked graph. Below about 0.92 a block overflows on more than the
# 10 % of images that a budgeted export's kept-set agreement (>= 0.9) allows, so lower ones fail validation.
TUNING_QUANTILES = (1.0, 0.99, 0.98, 0.95, 0.93)
DEFAULT_QUANTILE = 0.99  # 'vitedge calibrate' without a quantile or FLOPs target
# (gate_scale, gate_center) of the released checkpoints: tiny-10-30.pth, small-10-75.pth
OFFICIAL_GATES = {192: (10.0, 30.0), 384: (10.0, 75.0)}


def default_gates(cfg: ViTConfig) -> tuple[float, float]:
    """The released A-ViT gate constants for DeiT-S widths; the tiny model's otherwise."""
    return OFFICIAL_GATES.get(cfg.embed_dim, OFFICIAL_GATES[192])


def halting_score(x: torch.Tensor, gate_scale: float, gate_center: float) -> torch.Tensor:
    """Per-token halting probability from channel 0 of a block output: [B, N, C] → [B, N]."""
    return torch.sigmoid(x[..., 0] * gate_scale - gate_center)


def masked_attention(attn, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Self-attention with an additive bias per key [B, N] (halted keys: -1000).

    Always the explicit matmul-softmax-matmul, in the reference too (never SDPA): a token's
    halting is a threshold on a running sum, so SDPA's different rounding flipped a token
    near the threshold on 1 of 10,000 test images (logit error 2e-2), while the explicit
    path matches ONNX Runtime to 7e-6 on all of them.
    """
    q, k, v = attn.qkv_heads(x)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if key_bias is not None:  # None: no key has halted (the static form's first block), adding 0 is a no-op
        logits = logits + key_bias[:, None, None, :]
    return attn.merge_heads(logits.softmax(dim=-1) @ v)


def masked_block(block: Block, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One block on tokens where only ``active`` [B, N] (bool) ones run, as the official eval masks them."""
    keep = active.to(x.dtype).unsqueeze(-1)
    key_bias = (1.0 - keep.squeeze(-1)) * MASK_BIAS
    x = x * keep
    x = x + masked_attention(block.attn, block.norm1(x) * keep, key_bias)
    return x + block.mlp(block.norm2(x * keep) * keep)


def act_weights(c: torch.Tensor, remainder: torch.Tensor, h: torch.Tensor, eps: float = HALT_EPS):
    """One ACT step: (new cumulative score, new remainder, still running, weight of this block's output).

    A token that runs into this block contributes its output with weight h while it stays
    below 1 - eps and with its remainder at the block where it crosses; halted tokens get 0.
    """
    active = c < 1 - eps
    c = c + h
    reached = (c > 1 - eps) & active
    running = c < 1 - eps
    h_running = torch.where(running, h, torch.zeros_like(h))
    weight = torch.where(reached, remainder, torch.zeros_like(h)) + h_running
    return c, remainder - h_running, running, weight


def class_token_block(block: Block, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``masked_block``'s output for the class token alone [B, 1, C]: at the last block every token
    halts and only the class token's output reaches the logits, so the other queries and MLP
    rows need not run."""
    keep = active.to(x.dtype).unsqueeze(-1)
    x = x * keep
    q, k, v = block.attn.qkv_heads(block.norm1(x) * keep)
    logits = (q[:, :, :1] * block.attn.scale) @ k.transpose(-2, -1) + ((1.0 - keep) * MASK_BIAS)[:, None, None, :, 0]
    cls = x[:, :1] + block.attn.merge_heads(logits.softmax(dim=-1) @ v)
    return cls + block.mlp(block.norm2(cls * keep[:, :1]) * keep[:, :1])


class AViT(VisionTransformer):
    """The reference model: the official eval forward with every token kept (masked), in PyTorch."""

    def __init__(self, cfg: ViTConfig, gate_scale: float, gate_center: float, eps: float = HALT_EPS):
        super().__init__(cfg)
        self.gate_scale = gate_scale
        self.gate_center = gate_center
        self.eps = eps

    def forward_act(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and, per block, which tokens [B, N] (class token first) ran in it."""
        x = self.embed(images)
        batch, tokens = x.shape[:2]
        c = x.new_zeros(batch, tokens)
        remainder = x.new_ones(batch, tokens)
        output = torch.zeros_like(x)
        running = []
        for i, block in enumerate(self.blocks):
            active = c < 1 - self.eps
            if margins_recorded():  # how near a patch token's cumulative halting score is to 1 - eps
                record_margin(threshold_margin(c[:, 1:], 1 - self.eps), c[:, 1:], swaps_only=False)
            running.append(active)
            x = masked_block(block, x, active)
            last = i == len(self.blocks) - 1
            h = torch.ones_like(c) if last else halting_score(x, self.gate_scale, self.gate_center)
            c, remainder, _, weight = act_weights(c, remainder, h, self.eps)
            output = output + x * (weight * active).unsqueeze(-1)
        return self.head(self.norm(output)[:, 0]), running

    def forward_tokens(self, images):
        logits, running = self.forward_act(images)
        positions = patch_positions(images.shape[0], self.cfg.num_patches, images.device)
        kept = [torch.where(active[:, 1:], positions, HALTED_POSITION) for active in running]
        return logits, kept


def static_masked_block(block: Block, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """``masked_block`` without zeroing the halted rows: the same values on every live row.

    Halted tokens are invisible as keys (``key_bias`` -1000: exp underflows to exactly 0), and
    nothing reads their rows again: the logits take the class token's ACT sum, whose weight
    is 0 once it halts, and a halted token's cumulative score only grows. So the four
    multiplications by the mask per block (over [B, N, C]) change only rows no output reads;
    without them ONNX Runtime also fuses each residual Add into its LayerNorm.
    """
    x = x + masked_attention(block.attn, block.norm1(x), key_bias)
    return x + block.mlp(block.norm2(x))


def key_bias_of(active: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 for running keys, -1000 for halted ones [B, N]: one Where (``masked_block``'s
    (1 - keep) * -1000 is the same value, -0.0 for +0.0, in three ops)."""
    return torch.where(active, torch.zeros((), dtype=dtype), torch.full((), MASK_BIAS, dtype=dtype))


def act_step(active, running, reached, remainder, h):
    """``act_weights`` from comparisons the static loop makes anyway: ``active`` / ``running``
    are c < 1 - eps before / after the block, ``reached`` is c + h > 1 - eps. ``running`` and
    ``reached`` exclude each other, so ``act_weights``' where(reached, R, 0) + where(running, h, 0)
    is one nested Where, the same floats. Returns (new remainder, weight of this block's output)."""
    h_running = torch.where(running, h, torch.zeros_like(h))
    weight = torch.where(reached & active, remainder, h_running)
    return remainder - h_running, weight


class StaticAViT(nn.Module):
    """A-ViT with a constant token budget per block (the masked form: every budget = all tokens)."""

    def __init__(self, model: AViT, budgets: list[int], class_only_last_block: bool = False):
        super().__init__()
        self.class_only_last_block = class_only_last_block
        self.cfg = model.cfg
        self.patch_embed, self.cls_token, self.pos_embed = model.patch_embed, model.cls_token, model.pos_embed
        self.blocks, self.norm, self.head = model.blocks, model.norm, model.head
        self.gate_scale, self.gate_center, self.eps = model.gate_scale, model.gate_center, model.eps
        self.budgets = list(budgets)

    embed = VisionTransformer.embed

    def forward_tokens(self, images):
        """The reference's halting with the bookkeeping shared: c grows by h for every token
        (the class token's ACT step gives the same c + h), each block's "still running"
        comparison is the next block's "active" (recomputed only after a budget's gather), and
        the ACT step runs on every token's row, of which the class token's weight is read."""
        x = self.embed(images)
        batch = x.shape[0]
        threshold = 1 - self.eps
        positions = patch_positions(batch, self.cfg.num_patches, x.device)
        c = x.new_zeros(batch, x.shape[1])
        remainder = x.new_ones(batch, x.shape[1])
        output = x.new_zeros(batch, x.shape[-1])
        active = c < threshold
        kept = []
        for i, (block, budget) in enumerate(zip(self.blocks, self.budgets)):
            if budget < x.shape[1]:
                index = top_tokens(-c[:, 1:], budget - 1)  # least halted first
                x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], index)], dim=1)
                c = torch.cat([c[:, :1], gather_tokens(c[:, 1:], index)], dim=1)
                remainder = remainder[:, : x.shape[1]]  # only the class token's column is read
                positions = gather_tokens(positions, index)
                active = c < threshold
            kept.append(torch.where(active[:, 1:], positions, HALTED_POSITION))
            if i == len(self.blocks) - 1 and self.class_only_last_block:
                x = class_token_block(block, x, active)
                c_class, _, _, weight = act_weights(c[:, 0], remainder[:, 0], torch.ones_like(c[:, 0]), self.eps)
                output = output + x[:, 0] * weight.unsqueeze(-1)
                break
            # Before the first block c = 0 everywhere: nothing has halted, so no key bias to add.
            x = static_masked_block(block, x, key_bias_of(active, x.dtype) if i else None)
            if i == len(self.blocks) - 1:
                h = torch.ones_like(c)
            else:
                h = halting_score(x, self.gate_scale, self.gate_center)
            c = c + h
            running = c < threshold
            # Only the class token's ACT sum reaches the logits: its weight is computed with every
            # token's (elementwise over [B, N], fewer nodes than slicing out the class column) and read alone.
            remainder, weight = act_step(active, running, c > threshold, remainder, h)
            output = output + x[:, 0] * weight[:, :1]
            active = running
        return self.head(self.norm(output)), kept

    def forward(self, images):
        return self.forward_tokens(images)[0]


@rewrites(AViT)
def _static_avit(model: AViT, plan: TokenPlan) -> StaticAViT:
    """Masked form when every budget holds all tokens (shapes [B, N, C] throughout, as the paper);
    otherwise the fixed-budget form, whose last block also runs for the class token alone."""
    budgets = [b.attention for b in plan.blocks]
    return StaticAViT(model, budgets, class_only_last_block=min(budgets) < model.cfg.num_patches + 1)


# --- budgets from data -------------------------------------------------------------------------


def round_budget(count: float, tokens: int) -> int:
    """``count`` live tokens rounded up to a multiple of 8, at most all ``tokens``."""
    return min(tokens, BUDGET_MULTIPLE * math.ceil(count / BUDGET_MULTIPLE))


def budgets_from_counts(counts: np.ndarray, quantile: float, tokens: int) -> list[int]:
    """Per-block budgets (class token + the ``quantile`` of live patch counts [images, depth]),
    rounded up to a multiple of 8 and never growing from block to block."""
    quantile = check_quantile(quantile)
    budgets, previous = [], tokens
    for column in counts.T:
        needed = 1 + float(np.quantile(column, quantile, method="higher"))
        previous = min(previous, round_budget(needed, tokens))
        budgets.append(previous)
    return budgets


def check_quantile(value) -> float:
    try:
        quantile = float(value)
    except (TypeError, ValueError):
        raise VitedgeError(f"quantile must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < quantile <= 1.0:
        raise VitedgeError(f"quantile must be in (0, 1], got {quantile:g} (e.g. 0.99 covers 99% of images per block)")
    return quantile


def check_budgets(budgets, cfg: ViTConfig) -> list[int]:
    """A budget per block, 1..N tokens (class token included), never growing from block to block."""
    tokens = cfg.num_patches + 1
    try:
        values = [int(b) for b in budgets]
    except (TypeError, ValueError):
        raise VitedgeError(f"token budgets must be a list of {cfg.depth} integers, got {budgets!r}") from None
    if len(values) != cfg.depth:
        raise VitedgeError(f"{len(values)} token budgets given for a model with {cfg.depth} blocks; re-run 'vitedge calibrate'")
    if any(v != b for v, b in zip(values, budgets)) or min(values) < 1 or max(values) > tokens:
        raise VitedgeError(f"token budgets {values} must be whole numbers of tokens in 1..{tokens}")
    if any(later > earlier for earlier, later in zip(values, values[1:])):
        raise VitedgeError(f"token budgets {values} grow from one block to the next; a dropped token cannot come back")
    return values


@torch.no_grad()
def live_patch_counts(model: AViT, batches) -> np.ndarray:
    """Patch tokens that run in each block, per image: [images, depth]. A budget must hold
    these plus the class token (which keeps its slot even once halted)."""
    counts = []
    for images in batches:
        _, running = model.forward_act(torch.as_tensor(images))
        counts.append(torch.stack([r[:, 1:].sum(dim=1) for r in running], dim=1).numpy())
    return np.concatenate(counts)


def halting_summary(counts: np.ndarray, patches: int) -> dict:
    """Mean blocks run per patch token and live patch tokens per block, from [images, depth] counts."""
    return {
        "images": int(len(counts)),
        "mean_depth": round(float(counts.sum(axis=1).mean() / patches), 4),
        "active_patches_mean": [round(float(v), 3) for v in counts.mean(axis=0)],
        "active_patches_p99": [int(v) for v in np.quantile(counts, 0.99, axis=0, method="higher")],
        "active_patches_max": [int(v) for v in counts.max(axis=0)],
    }


@family("avit")
class AViTFamily(Family):
    summary = "per-token halting (ACT): masked, or a calibrated constant token budget per block"
    paper = "Yin et al., A-ViT: Adaptive Tokens for Efficient Vision Transformer, CVPR 2022"
    # The halting gate (channel 0 → scale, shift → Sigmoid) is the scoring path; no TopK marks it.
    selection_hint = ("Sigmoid",)

    settings = (
        Setting("gate_scale", float, "halting gate: sigmoid(channel 0 x gate_scale - gate_center) (default: the released "
                "model's for this width)"),
        Setting("gate_center", float, "halting gate shift (default: the released model's for this width)"),
        Setting("token_budgets", int, "constant tokens per block, class token included (from 'vitedge calibrate')",
                shape=LIST, minimum=1, none_means="masked (every token runs, halted ones are masked out)",
                label="budgets {}", aliases=(Alias("--budgets", from_file=True,
                                                   help="Token budgets per block from a 'vitedge calibrate' file."),)),
        Setting("budget_quantile", float, "calibrate token budgets covering this quantile of images per block",
                minimum=0.0, maximum=1.0, exclusive_minimum=True, label="q {}",
                aliases=(Alias("--quantile", help="Calibrate token budgets now, covering this quantile of images per block."),
                         Alias("--quantiles", many=True, help="Budget quantiles to try, comma-separated, each calibrated."))),
    )

    def combine_settings(self, cfg: ViTConfig, overrides: dict) -> dict:
        """Gates default to the released model's for this width; budgets must fit this depth and token count."""
        scale, center = default_gates(cfg)
        budgets = overrides.get("token_budgets")
        settings = {
            "gate_scale": overrides.get("gate_scale", scale),
            "gate_center": overrides.get("gate_center", center),
            "token_budgets": None if budgets is None else check_budgets(budgets, cfg),
        }
        if overrides.get("budget_quantile") is not None:  # the record of where calibrated budgets came from
            settings["budget_quantile"] = overrides["budget_quantile"]
        return settings

    calibrated_settings = ("budget_quantile",)

    def pending_calibration(self, settings: dict) -> dict:
        """A quantile is resolved once its budgets are there (a candidate from ``vitedge tune``)."""
        return {} if settings.get("token_budgets") else super().pending_calibration(settings)

    @torch.no_grad()
    def calibrate(self, model, cfg, settings, batches, flops_ratio=None):
        """Budgets from the live patch tokens per block of the reference on calibration images: at
        ``budget_quantile`` (default 0.99) or, with ``flops_ratio``, the largest quantile within it."""
        counts = live_patch_counts(model, batches())
        budgets, quantile = self.choose_budgets(cfg, settings, counts, settings.get("budget_quantile"), flops_ratio)
        resolved = self.resolve_settings(cfg, {**settings, "token_budgets": budgets, "budget_quantile": quantile})
        halting = halting_summary(counts, cfg.num_patches)
        record = {"images": int(len(counts)), "quantile": quantile, "flops_ratio_target": flops_ratio, "halting": halting}
        return resolved, record, {"quantile": quantile, "mean_depth": halting["mean_depth"]}

    def choose_budgets(self, cfg, settings, counts, quantile=None, flops_ratio=None) -> tuple[list[int], float]:
        """Budgets for a quantile of ``counts`` [images, depth], or for the largest quantile whose FLOPs
        ratio to dense is at most ``flops_ratio``. Returns (budgets, quantile used)."""
        tokens = cfg.num_patches + 1
        if flops_ratio is None:
            quantile = check_quantile(DEFAULT_QUANTILE if quantile is None else quantile)
            return budgets_from_counts(counts, quantile, tokens), quantile
        if quantile is not None:
            raise VitedgeError("give a quantile or a FLOPs target, not both")
        if not 0.0 < flops_ratio <= 1.0:
            raise VitedgeError(f"FLOPs target must be a ratio to dense in (0, 1], got {flops_ratio:g}")

        def ratio(q: float) -> float:
            budgeted = self.resolve_settings(cfg, {**settings, "token_budgets": budgets_from_counts(counts, q, tokens)})
            return self.token_plan(cfg, budgeted).flops(cfg) / dense_flops(cfg)

        low, high = 1.0 / len(counts), 1.0
        if ratio(low) > flops_ratio:
            raise VitedgeError(f"FLOPs target {flops_ratio:g} is below what any quantile reaches ({ratio(low):.3f}); raise it")
        if ratio(high) <= flops_ratio:
            return budgets_from_counts(counts, high, tokens), high
        for _ in range(30):  # budgets are a step function of q: bisect to the largest q that meets the target
            middle = (low + high) / 2
            low, high = (middle, high) if ratio(middle) <= flops_ratio else (low, middle)
        return budgets_from_counts(counts, low, tokens), round(low, 6)

    def tuning_candidates(self, cfg: ViTConfig, settings: dict) -> list[dict]:
        """The masked graph (exact, dense cost), then budgets at falling quantiles of live tokens."""
        return [{"token_budgets": None}] + [{"budget_quantile": q} for q in TUNING_QUANTILES]

    @torch.no_grad()
    def calibrate_candidates(self, model, cfg, candidates, images):
        """``budget_quantile`` → ``token_budgets``: the quantile of live tokens per block that the
        reference (with each candidate's gates) runs on the calibration images."""
        counts = {}
        resolved = []
        for settings in candidates:
            quantile = settings.get("budget_quantile")
            if quantile is None:
                resolved.append(settings)
                continue
            gates = (settings["gate_scale"], settings["gate_center"])
            if gates not in counts:
                reference = model
                if gates != (model.gate_scale, model.gate_center):
                    reference = self.reference(cfg, settings)
                    reference.load_state_dict(model.state_dict())
                    reference.eval()
                batches = (images[i : i + 128] for i in range(0, len(images), 128))
                counts[gates] = live_patch_counts(reference, batches)
            budgets = budgets_from_counts(counts[gates], quantile, cfg.num_patches + 1)
            resolved.append(self.resolve_settings(cfg, {**settings, "token_budgets": budgets}))
        return resolved

    def adapt_state_dict(self, state_dict):
        blocks = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
        missing = sorted(set(range(blocks[-1] + 1)) - set(blocks)) if blocks else []
        if missing:
            raise VitedgeError(
                f"checkpoint has blocks 0..{blocks[-1]} but block(s) {', '.join(map(str, missing))} are missing; "
                "it is not a complete A-ViT/DeiT model"
            )
        return dict(state_dict), []

    def default_thresholds(self, settings: dict) -> dict:
        """A budget below the live count changes the result for that image by design: the gate is
        top-1 agreement; kept-set agreement and logits only hold where the budget fit."""
        if not settings.get("token_budgets"):
            return {}
        return {"min_top1_agreement": 0.99, "min_kept_agreement": 0.9, "max_abs_logit_diff": None}

    def kept_summary(self, reference_kept: list) -> dict:
        if not reference_kept:
            return {}
        counts = np.stack([(kept >= 0).sum(axis=1) for kept in reference_kept], axis=1)
        return {"halting": halting_summary(counts, reference_kept[0].shape[1])}

    def reference(self, cfg: ViTConfig, settings: dict) -> AViT:
        return AViT(cfg, settings["gate_scale"], settings["gate_center"])

    def budget_tokens(self, cfg: ViTConfig, settings: dict) -> list[int] | None:
        return list(settings["token_budgets"]) if settings.get("token_budgets") else None

    def with_budget_tokens(self, cfg: ViTConfig, settings: dict, limits: list[int]) -> dict:
        """Each block's budget raised to its limit, never growing from block to block."""
        budgets, previous = [], cfg.num_patches + 1
        for budget, limit in zip(settings["token_budgets"], limits):
            previous = min(previous, max(budget, limit))
            budgets.append(previous)
        return self.resolve_settings(cfg, {**settings, "token_budgets": budgets})

    def token_plan(self, cfg: ViTConfig, settings: dict) -> TokenPlan:
        tokens = cfg.num_patches + 1
        if settings.get("budget_quantile") is not None and not settings.get("token_budgets"):
            quantile = settings["budget_quantile"]
            raise VitedgeError(f"budget_quantile {quantile:g} becomes token budgets only on calibration images: "
                               f"use 'vitedge export --quantile {quantile:g}' or 'vitedge tune'")
        budgets = settings.get("token_budgets") or [tokens] * cfg.depth
        blocks = [BlockTokens(k, k) for k in budgets]
        if settings.get("token_budgets") and min(budgets) < tokens:  # the last block's MLP runs for the class token alone
            blocks[-1] = BlockTokens(budgets[-1], 1)
        blocks = tuple(blocks)
        selections = tuple({"block": i, "kept_patches": k - 1, "tokens_after": k} for i, k in enumerate(budgets))
        return TokenPlan(blocks, selections)
