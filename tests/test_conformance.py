"""Every registered (family, backbone) pair, one spec each: official-layout state dict loads,
reference ≡ an independent re-implementation of the official eval code, static ≡ reference,
ONNX ≡ static (exported, checked and validated: top-1 100 %, max abs logit diff ≤ 1e-4), FLOPs
against a count of the exported graph's multiply-adds, and pairs a family must refuse.

Checkpoints come from key lists written from the official code (``support.timm_vit_keys``,
``support.lvvit_keys``); the oracle below computes each official eval forward functionally over
the state dict, without vitedge's modules. A new pair is one line in ``SPECS`` (and, for a new
backbone, one entry in ``BACKBONES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from support import (
    assert_clean_failure,
    copy_artifact,
    evo_levit_keys,
    evo_levit_state,
    lvvit_keys,
    random_state,
    read_json,
    run_cli,
    same_sets,
    timm_vit_keys,
)
from support import torchvision_vit_layout

import vitedge
from vitedge.errors import VitedgeError
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched

HEADS = 2
DIM = 32
SUPERVIT_SIZES = (16, 20, 24, 28)


def predictor_keys(d: int, steps: int) -> dict[str, tuple[int, ...]]:
    """DynamicViT ``PredictorLG`` as ``score_predictor.{s}`` (models/dyvit.py, dylvvit.py)."""
    keys = {}
    for s in range(steps):
        p = f"score_predictor.{s}."
        keys.update({
            p + "in_conv.0.weight": (d,), p + "in_conv.0.bias": (d,), p + "in_conv.1.weight": (d, d),
            p + "in_conv.1.bias": (d,), p + "out_conv.0.weight": (d // 2, d), p + "out_conv.0.bias": (d // 2,),
            p + "out_conv.2.weight": (d // 4, d // 2), p + "out_conv.2.bias": (d // 4,),
            p + "out_conv.4.weight": (2, d // 4), p + "out_conv.4.bias": (2,),
        })
    return keys


# Backbone name -> (its official key list, what the official eval code fixes that the keys do not).
BACKBONES = {
    # MAE fine-tuned ViT (models_vit.py, global_pool=True): fc_norm after the patch-token mean, no norm
    "mae": (timm_vit_keys(DIM, 4, fc_norm=True), {"eps": 1e-6}),
    # DeiT-III (timm deit3_*: init_values, no_embed_class)
    "deit3": (timm_vit_keys(DIM, 4, layer_scale=True, no_embed_class=True), {"eps": 1e-6}),
    # no class token, global average pool (timm class_token=False, global_pool="avg": fc_norm)
    "gap": (timm_vit_keys(DIM, 4, class_token=False, fc_norm=True), {"eps": 1e-6}),
    # DeiT distilled (deit.py VisionTransformerDistilled)
    "distilled": (timm_vit_keys(DIM, 4, dist_token=True), {"eps": 1e-6}),
    # AugReg-style ViT with another patch grid, MLP ratio and no qkv bias (4x4 patches of 7 px)
    "vit_p7": (timm_vit_keys(DIM, 4, patch=7, mlp_ratio=3.0, qkv_bias=False), {"eps": 1e-6, "patch": 7}),
    # LV-ViT-S's layout at 32 dims, 16 blocks (TokenLabeling lvvit_s: skip_lam 2, LayerNorm eps 1e-5)
    "lvvit": (lvvit_keys(DIM, 16), {"eps": 1e-5, "skip_lam": 2.0}),
    # torchvision VisionTransformer (its vit_* weights, SWAG's end-to-end ones) and SWAG's torch-hub models
    # (sequence-first [S, 1, D] position table, patches of 7 px like ViT-H/14's odd grid): the timm twins of
    # the tensors here; the checkpoint is saved under the official names (``_official_layout``)
    "torchvision": (timm_vit_keys(DIM, 4), {"eps": 1e-6, "layout": "torchvision"}),
    "swag": (timm_vit_keys(DIM, 4, patch=7), {"eps": 1e-6, "patch": 7, "layout": "swag"}),
    # Evo-LeViT (levit/evo_levit.py) shaped like 128 (a selection in every stage) at 32/48/64 dims, key dim 8,
    # 3/2/2 blocks, 128 px (8x8 -> 4x4 -> 2x2 tokens): stage 1's two heads are the suite's HEADS
    "levit": (evo_levit_keys(), {"eps": 1e-5, "img": 128, "shape": {}}),
    # shaped like 128S (stage 1 dense, no StageModule there) at 112 px: odd grids as at 224 px (7x7 -> 4x4 -> 2x2)
    "levit_128s": (evo_levit_keys(depths=(2, 3, 2), img=112),
                   {"eps": 1e-5, "img": 112, "shape": {"depths": (2, 3, 2), "img": 112}}),
}
# The backbone module each name loads as (``ViTConfig.backbone``).
BACKBONE_KIND = {"lvvit": "lvvit", "levit": "levit", "levit_128s": "levit"}


def _official_layout(backbone: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under the backbone's own names: torchvision's / SWAG's for those layouts (a bare
    state dict, as their files hold it), else ``{"model": state}`` as the timm-based repos save."""
    fixed = BACKBONES[backbone][1]
    if "layout" not in fixed:
        return {"model": state}
    layout = torchvision_vit_layout(DIM, 4, patch=fixed.get("patch", 4), layout=fixed["layout"])
    assert {twin for twin, _ in layout.values()} == set(state)
    return {name: state[twin].reshape(shape).contiguous() for name, (twin, shape) in layout.items()}


def official_keys(family: str, backbone: str) -> dict[str, tuple[int, ...]]:
    """The backbone's keys with what the family's official model adds: DynamicViT's three
    ``score_predictor.{s}``, SuperViT's ``pos_embed_list.{i}`` (one table per size) instead of ``pos_embed``."""
    keys = dict(BACKBONES[backbone][0])
    if family == "dynamicvit":
        keys.update(predictor_keys(DIM, 3))
    if family == "supervit":
        _, positions, dim = keys.pop("pos_embed")
        patch = BACKBONES[backbone][1].get("patch", 4)
        prefix = positions - (28 // patch) ** 2
        keys.update({f"pos_embed_list.{i}": (1, (size // patch) ** 2 + prefix, dim) for i, size in enumerate(SUPERVIT_SIZES)})
    return keys


@dataclass(frozen=True)
class Spec:
    family: str
    backbone: str
    settings: dict = field(default_factory=dict)
    fp16_kept: float = 0.95  # least kept-token agreement of the FP16 graph with the FP32 one

    @property
    def id(self) -> str:
        return f"{self.family}-{self.backbone}"


SPECS = [
    Spec("deit", "mae"),
    Spec("tome", "mae", {"merge_count": 3, "prop_attn": False}),
    Spec("deit", "deit3"),
    Spec("tome", "deit3", {"merge_count": 3}),
    Spec("evit", "deit3", {"keep_rate": 0.7}),
    Spec("dynamicvit", "deit3", {"keep_rate": 0.7}),
    Spec("deit", "distilled"),
    Spec("tome", "distilled", {"merge_count": 3}),
    Spec("deit", "gap"),
    # without a class token the unmerged tokens stay in score order, so a near-tie FP16 reorders
    # flips later positions of the per-patch map even where the merged sets agree; the quantized
    # comparison is element-wise for per-patch maps (kept_order_matters), so each such reorder counts
    # (measured 0.80-0.94 per block on 64 images)
    Spec("tome", "gap", {"merge_count": 3}, fp16_kept=0.75),
    Spec("tome", "vit_p7", {"merge_count": 2}),
    Spec("evit", "vit_p7", {"keep_rate": 0.7}),
    Spec("dynamicvit", "vit_p7", {"keep_rate": 0.7}),
    Spec("deit", "lvvit"),
    Spec("dynamicvit", "lvvit", {"keep_rate": 0.7}),  # dylvvit: pruning before blocks 4, 8, 12 of 16
    Spec("supervit", "lvvit", {"keep_rate": 0.7, "resolution": 28, "resolutions": list(SUPERVIT_SIZES)}),
    Spec("deit", "swag"),
    Spec("tome", "swag", {"merge_count": 2}),  # tome.patch.swag: the timm patch's merging on SWAG's blocks
    Spec("evit", "torchvision", {"keep_rate": 0.7}),
    Spec("evovit", "levit"),  # Evo-LeViT: prune_ratio_list [[1, 1, 0.5, ...], [0.5, 0.5, 0.5]]
    Spec("evovit", "levit_128s", {"keep_rate": 0.6}),
]

# Pairs the official code does not define: refused at load in one line naming what is supported.
REFUSED = [
    ("evit", "mae", "global average pooling"),
    ("supervit", "mae", "global average pooling"),
    ("tome", "lvvit", "the LV-ViT backbone"),
    ("supervit", "deit3", "LayerScale"),
    ("avit", "deit3", "LayerScale"),
    ("ats", "mae", "global average pooling"),
    ("dynamicvit", "distilled", "a distillation token"),
    ("evit", "levit", "the LeViT backbone"),
    ("deit", "levit", "the LeViT backbone"),
    ("tome", "levit", "the LeViT backbone"),
    ("evovit", "lvvit", "the LV-ViT backbone"),
]


# ---------------------------------------------------------------- the oracle: official eval code, functionally

def _ln(sd, prefix, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(sd, prefix, x):
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _branch(sd, i, n, y, fixed):
    """LayerScale (``ls{n}.gamma``) or LV-ViT's ``/ skip_lam`` on a residual branch."""
    gamma = sd.get(f"blocks.{i}.ls{n}.gamma")
    if gamma is not None:
        y = y * gamma
    return y / fixed.get("skip_lam", 1.0) if fixed.get("skip_lam", 1.0) != 1.0 else y


def _attention(sd, i, h, size=None):
    """timm ``Attention`` (ToMe's ``ToMeAttention`` with a size bias): output, softmax map, keys mean over heads."""
    batch, tokens, dim = h.shape
    q, k, v = _lin(sd, f"blocks.{i}.attn.qkv", h).reshape(batch, tokens, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
    logits = (q * (dim // HEADS) ** -0.5) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    attn = logits.softmax(-1)
    return _lin(sd, f"blocks.{i}.attn.proj", (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)), attn, k.mean(1)


def _mlp(sd, i, x, fixed):
    h = _ln(sd, f"blocks.{i}.norm2", x, fixed["eps"])
    return _branch(sd, i, 2, _lin(sd, f"blocks.{i}.mlp.fc2", F.gelu(_lin(sd, f"blocks.{i}.mlp.fc1", h))), fixed)


def _embed(sd, images, fixed, pos=None):
    """timm ``_pos_embed`` / TokenLabeling ``PatchEmbed4_2`` + ``forward_tokens``."""
    if "patch_embed.conv1.weight" in sd:
        x = images
        for n, (stride, pad) in enumerate([(2, 3), (1, 1), (1, 1)], start=1):
            x = F.conv2d(x, sd[f"patch_embed.conv{n}.weight"], stride=stride, padding=pad)
            b = f"patch_embed.bn{n}."
            x = F.relu(F.batch_norm(x, sd[b + "running_mean"], sd[b + "running_var"], sd[b + "weight"], sd[b + "bias"],
                                    training=False, eps=1e-5))
        proj = sd["patch_embed.proj.weight"]
        x = F.conv2d(x, proj, sd["patch_embed.proj.bias"], stride=proj.shape[-1])
    else:
        x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=fixed.get("patch", 4))
    x = x.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"] if pos is None else pos
    prefix = [sd[k].expand(x.shape[0], -1, -1) for k in ("cls_token", "dist_token") if k in sd]
    if pos.shape[1] == x.shape[1]:  # no_embed_class: positions first, then the prefix tokens
        return torch.cat([*prefix, x + pos], dim=1)
    return torch.cat([*prefix, x], dim=1) + pos


def _head(sd, x, fixed, size=None, patches_in=None, aux_weight=0.5):
    """timm ``forward_head`` (MAE global pool; ToMe's MAE patch weights it by size), DeiT distilled's
    head average, LV-ViT's ``x_cls + w * x_aux.max(1)``."""
    prefix = int("cls_token" in sd) + int("dist_token" in sd)
    if "fc_norm.weight" in sd:
        patches = x[:, prefix:]
        pooled = patches.mean(1) if size is None else (patches * size[:, prefix:]).sum(1) / patches_in
        return _lin(sd, "head", _ln(sd, "fc_norm", pooled, fixed["eps"]))
    x = _ln(sd, "norm", x, fixed["eps"])
    logits = _lin(sd, "head", x[:, 0])
    if "dist_token" in sd:
        logits = (logits + _lin(sd, "head_dist", x[:, 1])) / 2
    if "aux_head.weight" in sd:
        logits = logits + aux_weight * _lin(sd, "aux_head", x[:, 1:]).max(1)[0]
    return logits


def _depth(sd):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def _gather(x, index):
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def oracle_dense(sd, images, fixed, settings):
    x = _embed(sd, images, fixed)
    for i in range(_depth(sd)):
        x = x + _branch(sd, i, 1, _attention(sd, i, _ln(sd, f"blocks.{i}.norm1", x, fixed["eps"]))[0], fixed)
        x = x + _mlp(sd, i, x, fixed)
    return _head(sd, x, fixed), []


@torch.no_grad()
def oracle_tome(sd, images, fixed, settings):
    """ToMe's timm patch at eval (merge.py, patch/timm.py; MAE: patch/mae.py's size-weighted pool; DeiT
    distilled: ``distill_token`` protected and kept second), with LayerScale kept where the official
    patch drops it. Per merging block: each patch's token (argmax of source)."""
    distill, cls = "dist_token" in sd, "cls_token" in sd
    protected = cls + distill
    x = _embed(sd, images, fixed)
    patches_in = x.shape[1] - protected  # T in patch/mae.py: the pool divides by the original patch count
    size = source = None
    assignments = []
    for i in range(_depth(sd)):
        out, _, metric = _attention(sd, i, _ln(sd, f"blocks.{i}.norm1", x, fixed["eps"]),
                                    size if settings.get("prop_attn", True) else None)
        x = x + _branch(sd, i, 1, out, fixed)
        r = min(settings["merge_count"], (x.shape[1] - protected) // 2)
        if r > 0:
            metric = metric / metric.norm(dim=-1, keepdim=True)
            scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
            if cls:
                scores[:, 0, :] = -math.inf
            if distill:
                scores[:, :, 0] = -math.inf
            node_max, node_idx = scores.max(dim=-1)
            edges = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
            src, unm = edges[:, :r], (edges[:, r:].sort(dim=1).values if cls else edges[:, r:])
            dst = node_idx[..., None].gather(1, src)

            def merge(t, mode):
                even, odd, c = t[:, ::2], t[:, 1::2], t.shape[-1]
                odd = odd.scatter_reduce(1, dst.expand(-1, -1, c), even.gather(1, src.expand(-1, -1, c)), reduce=mode)
                unmerged = even.gather(1, unm.expand(-1, -1, c))
                if distill:
                    return torch.cat([unmerged[:, :1], odd[:, :1], unmerged[:, 1:], odd[:, 1:]], dim=1)
                return torch.cat([unmerged, odd], dim=1)

            if source is None:
                source = torch.eye(x.shape[1])[None].expand(x.shape[0], -1, -1)
            source = merge(source, "amax")
            weights = torch.ones_like(x[..., :1]) if size is None else size
            x, size = merge(x * weights, "sum"), merge(weights, "sum")
            x = x / size
            assignments.append(source[:, :, protected:].argmax(dim=1))
        x = x + _mlp(sd, i, x, fixed)
    return _head(sd, x, fixed, size, patches_in), assignments


@torch.no_grad()
def oracle_evit(sd, images, fixed, settings):
    """youweiliang/evit ``Block.forward`` at eval, blocks at the depth's quarters, inattentive tokens fused."""
    depth = _depth(sd)
    blocks = [depth // 4, depth // 2, 3 * depth // 4]
    x = _embed(sd, images, fixed)
    positions = torch.arange(x.shape[1] - 1).expand(x.shape[0], -1)
    kept = []
    for i in range(depth):
        out, attn, _ = _attention(sd, i, _ln(sd, f"blocks.{i}.norm1", x, fixed["eps"]))
        x = x + _branch(sd, i, 1, out, fixed)
        if i in blocks:
            left = math.ceil(settings["keep_rate"] * (x.shape[1] - 1))
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            non_cls = x[:, 1:]
            mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
            fused = (non_cls * (cls_attn * mask).unsqueeze(-1)).sum(dim=1, keepdim=True)
            x = torch.cat([x[:, :1], _gather(non_cls, idx), fused], dim=1)
            positions = torch.cat([positions.gather(1, idx), torch.full_like(positions[:, :1], -1)], dim=1)
            kept.append(positions)
        x = x + _mlp(sd, i, x, fixed)
    return _head(sd, x, fixed), kept


def _predictor(sd, s, x, policy):
    p = f"score_predictor.{s}."
    x = F.gelu(_lin(sd, p + "in_conv.1", F.layer_norm(x, x.shape[-1:], sd[p + "in_conv.0.weight"], sd[p + "in_conv.0.bias"])))
    half = x.shape[-1] // 2
    global_x = (x[..., half:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
    x = torch.cat([x[..., :half], global_x.expand(-1, x.shape[1], -1)], dim=-1)
    x = F.gelu(_lin(sd, p + "out_conv.2", F.gelu(_lin(sd, p + "out_conv.0", x))))
    return torch.log_softmax(_lin(sd, p + "out_conv.4", x), dim=-1)


@torch.no_grad()
def oracle_dynamicvit(sd, images, fixed, settings):
    """``VisionTransformerDiffPruning`` / ``LVViTDiffPruning`` at eval (pruning_loc = depth quarters:
    3/6/9 of 12, 4/8/12 of 16; LV-ViT adds 0.5 x the aux head's max)."""
    depth = _depth(sd)
    blocks = [depth // 4, depth // 2, 3 * depth // 4]
    x = _embed(sd, images, fixed)
    batch, init_n = x.shape[0], x.shape[1] - 1
    prev = torch.ones(batch, init_n, 1)
    positions = torch.arange(init_n).expand(batch, -1)
    kept = []
    for i in range(depth):
        if i in blocks:
            step = blocks.index(i)
            score = _predictor(sd, step, x[:, 1:], prev)[:, :, 0]
            keep = torch.argsort(score, dim=1, descending=True, stable=True)[:, : int(init_n * settings["keep_rate"] ** (step + 1))]
            x = torch.cat([x[:, :1], _gather(x[:, 1:], keep)], dim=1)
            prev, positions = _gather(prev, keep), positions.gather(1, keep)
            kept.append(positions)
        x = x + _branch(sd, i, 1, _attention(sd, i, _ln(sd, f"blocks.{i}.norm1", x, fixed["eps"]))[0], fixed)
        x = x + _mlp(sd, i, x, fixed)
    return _head(sd, x, fixed), kept


@torch.no_grad()
def oracle_supervit(sd, images, fixed, settings):
    """SuperViT ``super_lvvit.LV_ViT.forward(x, img_size, keep_ratio)`` at eval: resize, the size's
    position table, class-attention top ceil(rate * N) at blocks 3, 6, 9, logits + 0.25 x aux max."""
    size = settings["resolution"]
    images = F.interpolate(images, (size, size), mode="bilinear", align_corners=True)
    pos = sd[f"pos_embed_list.{list(SUPERVIT_SIZES).index(size)}"]
    x = _embed(sd, images, fixed, pos)
    positions = torch.arange(x.shape[1] - 1).expand(x.shape[0], -1)
    kept = []
    for i in range(_depth(sd)):
        out, attn, _ = _attention(sd, i, _ln(sd, f"blocks.{i}.norm1", x, fixed["eps"]))
        x = x + _branch(sd, i, 1, out, fixed)
        if i in (3, 6, 9):
            keep = math.ceil(settings["keep_rate"] * x.shape[1])
            index = torch.argsort(attn.mean(dim=1)[:, 0, 1:], dim=1, descending=True)[:, :keep]
            x = torch.cat([x[:, :1], _gather(x[:, 1:], index)], dim=1)
            positions = positions.gather(1, index)
            kept.append(positions)
        x = x + _mlp(sd, i, x, fixed)
    return _head(sd, x, fixed, aux_weight=0.25), kept


def _bn(sd, prefix, x):
    """BatchNorm at eval over the last axis (``Linear_BN``'s BatchNorm1d on flattened tokens) or axis 1 (2-D)."""
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], training=False, eps=1e-5)


def _linear_bn(sd, prefix, x):
    y = F.linear(x, sd[prefix + "c.weight"])
    return _bn(sd, prefix + "bn.", y.flatten(0, 1)).reshape_as(y)


def _levit_mlp(sd, prefix, x):
    return _linear_bn(sd, prefix + "m.2.", F.hardswish(_linear_bn(sd, prefix + "m.0.", x)))


def _subsample(x, resolution):
    batch, _, channels = x.shape
    return x.view(batch, resolution, resolution, channels)[:, ::2, ::2].reshape(batch, -1, channels)


@torch.no_grad()
def oracle_evovit(sd, images, fixed, settings):
    """Evo-LeViT ``LeViT.forward`` at eval (``stage_wise_prune``, ``learn_tradeoff_mode``): the ``stage_blocks``
    path with its global ``global_attn`` / ``ori_indices`` and in-place writes, StageModules at the stage's ratio;
    key dim 8 as in ``BACKBONES``. Per StageModule: the stage-grid indices it keeps (``ori_indices`` of stage 1,
    then ranks in each later grid)."""
    key_dim = 8
    x = images
    for i in range(4):
        if i:
            x = F.hardswish(x)
        x = _bn(sd, f"patch_embed.{2 * i}.bn.", F.conv2d(x, sd[f"patch_embed.{2 * i}.c.weight"], stride=2, padding=1))
    x = x.flatten(2).transpose(1, 2)
    state = {"ga": 0, "oi": torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)}
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["poss"]
    resolution = math.isqrt(x.shape[1] - 1)
    kept = []

    def attention(prefix, x):
        batch, tokens, _ = x.shape
        heads = sd[prefix + "m.proj.1.c.weight"].shape[1] // (2 * key_dim)
        q, k, v = _linear_bn(sd, prefix + "m.qkv.", x).view(batch, tokens, heads, -1).split([key_dim, key_dim, 2 * key_dim], 3)
        attn = ((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) * key_dim**-0.5).softmax(-1)
        tradeoff = torch.sigmoid(sd[prefix + "m.learn_tradeoff"])
        ga = state["ga"]
        if isinstance(ga, int):
            state["ga"] = attn[:, :, 0, 1:].mean(1)
        elif ga.shape[1] - tokens + 2 == 1:
            state["ga"] = (1 - tradeoff) * ga + tradeoff * attn[:, :, 0, 1:].mean(1)
        else:
            ga = ga.clone()
            ga[:, : tokens - 2] = (1 - tradeoff) * ga[:, : tokens - 2] + tradeoff * attn[:, :, 0, 1:-1].mean(1)
            state["ga"] = ga
        out = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(batch, tokens, -1)
        raw = _linear_bn(sd, prefix + "m.proj.1.", F.hardswish(out))
        return x + raw, raw

    def residual(prefix, x):
        if prefix + "m.qkv.c.weight" in sd:
            return attention(prefix, x)
        raw = _levit_mlp(sd, prefix, x)
        return x + raw, raw

    def sort_by_score(x):
        order = torch.argsort(state["ga"], dim=1, descending=True, stable=True)
        state["ga"], state["oi"] = state["ga"].gather(1, order), state["oi"].gather(1, order)
        return torch.cat([x[:, :1], _gather(x[:, 1:], order)], dim=1)

    index = 0
    while any(k.startswith(f"stage_blocks.{index}.") for k in sd):
        prefix = f"stage_blocks.{index}."
        if prefix + "kv.c.weight" in sd:  # AttentionSubsample
            old = state["ga"].sum(1, keepdim=True)
            order = torch.argsort(state["oi"], dim=1)
            x = torch.cat([x[:, :1], _gather(x[:, 1:], order)], dim=1)
            ga = _subsample(state["ga"].gather(1, order).unsqueeze(-1), resolution)[..., 0]
            state["oi"] = _subsample(state["oi"].gather(1, order).unsqueeze(-1).float(), resolution)[..., 0].long()
            x = x + sd[prefix + "poss"]
            batch, tokens, _ = x.shape
            heads = sd[prefix + "q.1.c.weight"].shape[0] // key_dim
            k, v = _linear_bn(sd, prefix + "kv.", x).view(batch, tokens, heads, -1).split([key_dim, 4 * key_dim], 3)
            q_in = torch.cat([x[:, :1], _subsample(x[:, 1:], resolution)], dim=1)
            q = _linear_bn(sd, prefix + "q.1.", q_in).view(batch, q_in.shape[1], heads, key_dim).transpose(1, 2)
            attn = ((q @ k.transpose(1, 2).transpose(-2, -1)) * key_dim**-0.5).softmax(-1)
            cls_attn = _subsample(attn[:, :, 0, 1:].mean(1).unsqueeze(-1), resolution)[..., 0]
            tradeoff = torch.sigmoid(sd[prefix + "learn_tradeoff"])
            ga = (1 - tradeoff) * ga + tradeoff * cls_attn
            state["ga"] = ga * (old / ga.sum(1, keepdim=True))
            out = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(batch, q_in.shape[1], -1)
            x = _linear_bn(sd, prefix + "proj.1.", F.hardswish(out))
            resolution = (resolution - 1) // 2 + 1
        elif prefix + "m.0.m.qkv.c.weight" in sd:  # StageModule
            x = sort_by_score(x)
            n = x.shape[1] - 1
            n_ = int(n * settings.get("keep_rate", 0.5))
            kept.append(_grid_rank(state["oi"][:, :n_], state["oi"]))
            x_drop = x[:, n_ + 1:]
            weight = state["ga"][:, n_:] / state["ga"][:, n_:].sum(1, keepdim=True)
            y = torch.cat([x[:, : n_ + 1], (weight.unsqueeze(-1) * x_drop).sum(1, keepdim=True)], dim=1)
            raw_total = 0
            j = 0
            while f"{prefix}m.{j}.m.0.c.weight" in sd or f"{prefix}m.{j}.m.qkv.c.weight" in sd:
                y, raw = residual(f"{prefix}m.{j}.", y)
                raw_total = raw_total + raw[:, -1:]
                j += 1
            x = torch.cat([y[:, :-1], x_drop + raw_total], dim=1)
        else:
            x = residual(prefix, x)[0]
        index += 1
    pooled = x[:, 1:].mean(1)

    def bn_linear(name):
        return _lin(sd, f"{name}.l", _bn(sd, f"{name}.bn.", pooled))

    return (bn_linear("head") + bn_linear("head_dist")) / 2, kept


def _grid_rank(kept_ids, all_ids):
    """``ori_indices`` after a subsampling hold first-grid indices: a token's position in its stage's grid is
    its rank among the stage's ``ori_indices``."""
    return torch.searchsorted(all_ids.sort(dim=1).values.contiguous(), kept_ids.contiguous())


ORACLES = {"deit": oracle_dense, "tome": oracle_tome, "evit": oracle_evit, "dynamicvit": oracle_dynamicvit,
           "supervit": oracle_supervit, "evovit": oracle_evovit}


# ---------------------------------------------------------------- fixtures

def _state(family: str, backbone: str, seed: int = 5):
    if BACKBONE_KIND.get(backbone) == "levit":  # each stage_blocks.* tensor is its blocks.* twin, as saved officially
        return evo_levit_state(seed=seed, **BACKBONES[backbone][1]["shape"])
    return random_state(official_keys(family, backbone), seed=seed)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One official-layout checkpoint (``_official_layout``) per (family, backbone) spec, made on demand."""
    folder = tmp_path_factory.mktemp("conformance")
    made = {}

    def get(family: str, backbone: str):
        if (family, backbone) not in made:
            state = _state(family, backbone)
            path = folder / f"{family}-{backbone}.pth"
            torch.save(_official_layout(backbone, state), path)
            made[family, backbone] = (path, state)
        return made[family, backbone]

    return get


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoints):
    """``vitedge.export`` of a spec (load, rewrite, export, check) validated on Fashion-MNIST at strict thresholds."""
    folder = tmp_path_factory.mktemp("conformance-artifacts")
    done = {}

    def get(spec: Spec):
        if spec.id not in done:
            path, _ = checkpoints(spec.family, spec.backbone)
            out = folder / spec.id
            vitedge.export(path, out, family=spec.family, num_heads=HEADS, settings=spec.settings, validate_data=None,
                           log=lambda _m: None)
            report = vitedge.validate(out, "fashion-mnist", 64, thresholds=STRICT)
            done[spec.id] = (out, report)
        return done[spec.id]

    return get


STRICT = {"min_top1_agreement": 1.0, "min_kept_agreement": 1.0, "max_abs_logit_diff": 1e-4}


def _images(fmnist_batch, n=16, backbone=None):
    """Fashion-MNIST images, upsampled where the backbone's stem needs more than 28 px (LeViT's 16 px per token)."""
    images = torch.from_numpy(fmnist_batch[0][:n])
    size = BACKBONES[backbone][1].get("img") if backbone else None
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False) if size else images


# ---------------------------------------------------------------- the suite

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_official_layout_loads_every_key(spec, checkpoints):
    path, state = checkpoints(spec.family, spec.backbone)
    loaded = load_model(path, family=spec.family, num_heads=HEADS, settings=spec.settings)
    ours = loaded.model.state_dict()
    twins = {k for k in state if k.startswith("stage_blocks.")}  # Evo-LeViT: checked equal to blocks.*, not kept
    assert set(ours) == set(state) - twins - set(loaded.dropped_keys)
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key
    assert loaded.cfg.backbone == BACKBONE_KIND.get(spec.backbone, "vit")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_reference_equals_the_official_eval_code(spec, checkpoints, fmnist_batch):
    path, state = checkpoints(spec.family, spec.backbone)
    loaded = load_model(path, family=spec.family, num_heads=HEADS, settings=spec.settings)
    images = _images(fmnist_batch, backbone=spec.backbone)
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(images)
    want_logits, want_kept = ORACLES[spec.family](state, images, BACKBONES[spec.backbone][1], spec.settings)
    assert torch.allclose(logits, want_logits, atol=1e-5), (logits - want_logits).abs().max()
    assert len(kept) == len(want_kept) == len(loaded.plan.selections)
    for ours, theirs in zip(kept, want_kept):
        if loaded.family.kept_order_matters:
            assert torch.equal(ours, theirs)
        else:
            assert same_sets(ours, theirs)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_static_equals_reference(spec, checkpoints, fmnist_batch):
    path, _ = checkpoints(spec.family, spec.backbone)
    loaded = load_model(path, family=spec.family, num_heads=HEADS, settings=spec.settings)
    static = to_static(loaded.model, loaded.plan)
    # LV-ViT's stem and every LeViT BatchNorm are folded
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in static.modules())
    images = _images(fmnist_batch, backbone=spec.backbone)
    with torch.no_grad():
        ref_logits, ref_kept = loaded.model.forward_tokens(images)
        st_logits, st_kept = static.forward_tokens(images)
    assert torch.allclose(ref_logits, st_logits, atol=1e-5)
    for ref, st in zip(ref_kept, st_kept, strict=True):
        assert torch.equal(ref, st) if loaded.family.kept_order_matters else same_sets(ref, st)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_onnx_is_checked_validated_and_equals_static(spec, exported, checkpoints, fmnist_batch):
    out, report = exported(spec)
    assert report["passed"], report
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff_all"] <= 1e-4
    path, _ = checkpoints(spec.family, spec.backbone)
    loaded = load_model(path, family=spec.family, num_heads=HEADS, settings=spec.settings)
    static = to_static(loaded.model, loaded.plan)
    images = _images(fmnist_batch, 8, spec.backbone).numpy()
    onnx_logits = run_batched(ort_session(out / "model.onnx", 1), images, 1)[0]
    with torch.no_grad():
        st_logits = static(torch.from_numpy(images)).numpy()
    assert np.abs(onnx_logits - st_logits).max() <= 1e-4
    assert (onnx_logits.argmax(1) == st_logits.argmax(1)).all()


def graph_flops(path) -> int:
    """2 x the multiply-adds of every MatMul, Gemm and Conv of a static ONNX graph, from its inferred shapes."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            k = a[-2] if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute) else a[-1]
            macs += int(np.prod(out)) * k
        elif node.op_type == "Conv":
            weight, out = shapes[node.input[1]], shapes[node.output[0]]
            macs += int(np.prod(out)) * int(np.prod(weight[1:]))
    return 2 * macs


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_flops_match_the_exported_graph(spec, exported):
    out, _ = exported(spec)
    metadata = read_json(out / "vitedge.json")
    counted = graph_flops(out / "model.onnx")
    assert metadata["flops"]["static"] == pytest.approx(counted, rel=0.03), (metadata["flops"], counted)
    assert metadata["flops"]["static"] <= metadata["flops"]["dense"]


@pytest.mark.parametrize("family, backbone, reason", REFUSED)
def test_unsupported_pairs_are_refused_in_one_line(family, backbone, reason, checkpoints):
    path, _ = checkpoints(family, backbone)
    with pytest.raises(VitedgeError, match=f"family '{family}' does not support this backbone: {reason}.*it runs on"):
        load_model(path, family=family, num_heads=HEADS)


def test_cli_refuses_a_pair_and_writes_nothing(checkpoints, tmp_path):
    path, _ = checkpoints("tome", "lvvit")
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", path, "-o", out, "--family", "tome", "--num-heads", HEADS), out)
    assert "does not support this backbone: the LV-ViT backbone" in line and "it runs on" in line


def test_lvvit_checkpoint_with_a_timm_arch_is_one_line(checkpoints, tmp_path):
    path, _ = checkpoints("deit", "lvvit")
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", path, "-o", out, "--family", "deit", "--arch", "vit_fmnist"), out)
    assert "the checkpoint is an LV-ViT (conv stem patch_embed.conv1..3) but the arch is vit" in line


@pytest.mark.parametrize("family, settings, message", [
    ("tome", {"merge_count": 99}, "a block can merge at most"),
    ("dynamicvit", {"keep_rate": 1.5}, "keep rate must be in"),
    ("supervit", {"resolution": 24, "keep_rate": 0.6}, "not one this model was trained for"),
])
def test_bad_settings_on_new_backbones(family, settings, message, checkpoints):
    backbone = "mae" if family == "tome" else "lvvit"
    path, _ = checkpoints(family, backbone)
    with pytest.raises(VitedgeError, match=message):
        load_model(path, family=family, num_heads=HEADS, settings=settings)


@pytest.mark.parametrize("keep_rate, gmacs", [(0.7, 4.6), (0.5, 3.7)])
def test_dynamicvit_lvvit_s_flops_match_the_readme(keep_rate, gmacs):
    """DynamicViT README: DynamicViT-LVViT-S/0.7 4.6 G, /0.5 3.7 G (MACs; the aux head scores only the kept tokens)."""
    from vitedge.backbones import infer_config
    from vitedge.families import get_family

    keys = lvvit_keys(384, 16, patch=16, img=224, in_chans=3, num_classes=1000, predictors=3)
    cfg = infer_config({k: torch.empty(s) for k, s in keys.items()})
    family = get_family("dynamicvit")
    settings = family.resolve_settings(cfg, {"keep_rate": keep_rate})
    assert settings["prune_blocks"] == [4, 8, 12]
    assert family.token_plan(cfg, settings).flops(cfg) / 2 == pytest.approx(gmacs * 1e9, rel=0.03)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.family != "deit"], ids=lambda s: s.id)
def test_fp16_graph_keeps_the_tokens_the_fp32_graph_keeps(spec, exported, tmp_path):
    """FP16 with the selection path in FP32 (vitedge quantize's default): kept tokens compared with FP32's.

    Random weights at 32 dims have near-tied logits, so a top-1 flip in 64 images is FP16 rounding,
    not a bug: the bar here is 95 % (the default 99.5 % holds for trained models, docs/quantization.md).
    """
    from vitedge.quantize import validate_quantized

    out, _ = exported(spec)
    artifact = copy_artifact(out, tmp_path / spec.id)
    vitedge.quantize(artifact, "fp16", validate_data=None)
    section = validate_quantized(artifact, "fp16", limit=64, thresholds={"min_top1_agreement": 0.95})
    assert section["passed"], section["failures"]
    kept = section["kept_agreement"]  # per selection output: share of images with the same kept set / map
    assert len(kept) == len(read_json(artifact / "vitedge.json")["outputs"]) - 1
    assert min(kept.values()) >= spec.fp16_kept, kept


def test_supervit_lvvit_bundle_selects_among_validated_variants(checkpoints, tmp_path):
    """SuperViT-LV-ViT-S's deployment form: one validated static graph per (size, keep rate) variant."""
    path, _ = checkpoints("supervit", "lvvit")
    bundle = vitedge.export_bundle(path, tmp_path / "bundle", values={"resolution": [16, 28], "keep_rate": [0.5, 1.0]},
                                   num_heads=HEADS, validate_limit=32, iterations=2, warmup=1, log=lambda _m: None)
    assert bundle["arch"]["backbone"] == "lvvit" and len(bundle["variants"]) == 4
    flops = {(v["resolution"], v["keep_rate"]): v["flops"]["static"] for v in bundle["variants"]}
    assert flops[16, 0.5] < flops[16, 1.0] < flops[28, 1.0] and flops[28, 0.5] < flops[28, 1.0]
    for variant in bundle["variants"]:
        assert variant["validation"]["top1_agreement"] == 1.0 and variant["validation"]["max_abs_logit_diff"] <= 1e-4


def test_dense_deit3_exports_one_graph_for_a_range_of_sizes(checkpoints, tmp_path):
    """A patch-only position table (no_embed_class) resampled inside the graph: checked and validated at every size."""
    path, _ = checkpoints("deit", "deit3")
    out = tmp_path / "deit3-dynamic"
    report = vitedge.export(path, out, family="deit", num_heads=HEADS, dynamic_resolution="20:36", validate_limit=16,
                            log=lambda _m: None)
    assert report["check"]["passed"]
    sections = [k for k in report if k.startswith("validate")]
    assert len(sections) == 3 and all(report[k]["top1_agreement"] == 1.0 for k in sections), sections
