"""Helpers shared by the tests: official-layout checkpoints, CLI invocation and its failure contract.

Checkpoints are built from hand-written key lists (timm/DeiT names, plus DynamicViT's
``score_predictor.{s}.*``), not from vitedge's modules, so that a renamed parameter in
vitedge shows up as a load failure instead of being mirrored by the tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from click.testing import CliRunner

from vitedge.backbone import ARCHS, ViTConfig
from vitedge.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
FMNIST = ARCHS["vit_fmnist"]
HEADS = FMNIST.num_heads  # 2: not the 64-channels-per-head default, so pass it explicitly


def official_vit_keys(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """timm / DeiT ``VisionTransformer`` parameter names and shapes."""
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    keys: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, cfg.num_patches + 1, d),
        "patch_embed.proj.weight": (d, cfg.in_chans, cfg.patch_size, cfg.patch_size),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (hidden, d), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (d, hidden), p + "mlp.fc2.bias": (d,),
        })
    keys.update({"norm.weight": (d,), "norm.bias": (d,),
                 "head.weight": (cfg.num_classes, d), "head.bias": (cfg.num_classes,)})
    return keys


def official_dynamicvit_keys(cfg: ViTConfig, steps: int = 3) -> dict[str, tuple[int, ...]]:
    """raoyongming/DynamicViT: the ViT keys plus one ``PredictorLG`` per pruning step."""
    d = cfg.embed_dim
    keys = official_vit_keys(cfg)
    for s in range(steps):
        p = f"score_predictor.{s}."
        keys.update({
            p + "in_conv.0.weight": (d,), p + "in_conv.0.bias": (d,),  # LayerNorm
            p + "in_conv.1.weight": (d, d), p + "in_conv.1.bias": (d,),
            p + "out_conv.0.weight": (d // 2, d), p + "out_conv.0.bias": (d // 2,),
            p + "out_conv.2.weight": (d // 4, d // 2), p + "out_conv.2.bias": (d // 4,),
            p + "out_conv.4.weight": (2, d // 4), p + "out_conv.4.bias": (2,),
        })
    return keys


POS_SCALE, QKV_SCALE = 0.5, 0.2


def make_state_dict(family: str = "evit", cfg: ViTConfig = FMNIST, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout of ``family`` (evit/deit: timm keys; dynamicvit: + predictors).

    LayerNorm gains ~1, small biases; position embeddings, attention projections and the
    score predictors are scaled up so that class attention and keep scores are far from
    uniform: with near-ties, float rounding (not vitedge) would decide which token is kept.
    """
    shapes = official_dynamicvit_keys(cfg) if family == "dynamicvit" else official_vit_keys(cfg)
    return random_state(shapes, seed)


def quiet(_message: str) -> None:
    """``log`` for the API calls: keep test output clean."""


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def folder_listing(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} | {
        str(p.relative_to(path)) + "/": b"" for p in sorted(path.rglob("*")) if p.is_dir()
    }


def run_cli(*args: str):
    """Invoke ``vitedge`` in-process; stdout and stderr stay separate."""
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=True)


def assert_clean_failure(result, outdir: Path | None = None) -> str:
    """The CLI contract for bad input: non-zero exit, one ``vitedge: error:`` line, no traceback, no files."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vitedge: error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    if outdir is not None:
        assert not outdir.exists() or not any(outdir.iterdir()), sorted(p.name for p in outdir.iterdir())
    return errors[0]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --- An independent oracle: the official eval code of EViT and DynamicViT, written functionally
# --- over an official state dict (no vitedge module involved), for batch-of-one semantics.

def _layer_norm(sd, prefix, x, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _linear(sd, prefix, x):
    return torch.nn.functional.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _attention(sd, i, x, heads):
    """timm Attention: returns the block's attention output and the softmax map [B, H, N, N]."""
    batch, tokens, dim = x.shape
    qkv = _linear(sd, f"blocks.{i}.attn.qkv", x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return _linear(sd, f"blocks.{i}.attn.proj", out), attn


def _mlp(sd, i, x):
    hidden = torch.nn.functional.gelu(_linear(sd, f"blocks.{i}.mlp.fc1", x))
    return _linear(sd, f"blocks.{i}.mlp.fc2", hidden)


def _embed(sd, images, patch):
    x = torch.nn.functional.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    return torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]


def _head(sd, x):
    return _linear(sd, "head", _layer_norm(sd, "norm", x, 1e-6)[:, 0])


@torch.no_grad()
def official_evit(sd, images, heads, keep_rates, prune_blocks=(3, 6, 9), patch=4, fuse=True):
    """youweiliang/evit eval forward (evit.py ``Block.forward``): logits and kept patch indices per drop."""
    import math

    rates = dict(zip(prune_blocks, keep_rates))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = _embed(sd, images, patch)
    positions = torch.arange(x.shape[1] - 1).unsqueeze(0).expand(x.shape[0], -1)
    kept = []
    for i in range(depth):
        tmp, attn = _attention(sd, i, _layer_norm(sd, f"blocks.{i}.norm1", x, 1e-6), heads)
        x = x + tmp
        if i in rates:
            tokens = x.shape[1]
            left = math.ceil(rates[i] * (tokens - 1))
            if left < tokens - 1:
                cls_attn = attn[:, :, 0, 1:].mean(dim=1)
                _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
                non_cls = x[:, 1:]
                x_others = torch.gather(non_cls, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                pieces, new_positions = [x[:, :1], x_others], [torch.gather(positions, 1, idx)]
                if fuse:
                    mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
                    extra = (non_cls * (cls_attn * mask).unsqueeze(-1)).sum(dim=1, keepdim=True)
                    pieces.append(extra)
                    new_positions.append(torch.full_like(positions[:, :1], -1))
                x, positions = torch.cat(pieces, dim=1), torch.cat(new_positions, dim=1)
            kept.append(positions)
        x = x + _mlp(sd, i, _layer_norm(sd, f"blocks.{i}.norm2", x, 1e-6))
    return _head(sd, x), kept


def _predictor(sd, s, x, policy):
    """DynamicViT ``PredictorLG.forward(x, policy)`` from its official keys."""
    p = f"score_predictor.{s}."
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + "in_conv.0.weight"], sd[p + "in_conv.0.bias"], 1e-5)
    x = torch.nn.functional.gelu(_linear(sd, p + "in_conv.1", x))
    half = x.shape[-1] // 2
    local_x = x[..., :half]
    global_x = (x[..., half:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
    x = torch.cat([local_x, global_x.expand_as(local_x)], dim=-1)
    x = torch.nn.functional.gelu(_linear(sd, p + "out_conv.0", x))
    x = torch.nn.functional.gelu(_linear(sd, p + "out_conv.2", x))
    return torch.log_softmax(_linear(sd, p + "out_conv.4", x), dim=-1)


@torch.no_grad()
def official_dynamicvit(sd, images, heads, base_rate, prune_blocks=(3, 6, 9), patch=4):
    """raoyongming/DynamicViT eval forward (``VisionTransformerDiffPruning``): logits and kept indices."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = _embed(sd, images, patch)
    batch, init_n = x.shape[0], x.shape[1] - 1
    prev_decision = torch.ones(batch, init_n, 1)
    positions = torch.arange(init_n).unsqueeze(0).expand(batch, -1)
    kept = []
    for i in range(depth):
        if i in prune_blocks:
            step = list(prune_blocks).index(i)
            score = _predictor(sd, step, x[:, 1:], prev_decision)[:, :, 0]
            num_keep = int(init_n * base_rate ** (step + 1))
            keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep]
            now_policy = torch.cat([torch.zeros(batch, 1, dtype=keep_policy.dtype), keep_policy + 1], dim=1)
            x = torch.gather(x, 1, now_policy.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            prev_decision = torch.gather(prev_decision, 1, keep_policy.unsqueeze(-1))
            positions = torch.gather(positions, 1, keep_policy)
            kept.append(positions)
        x = x + _attention(sd, i, _layer_norm(sd, f"blocks.{i}.norm1", x, 1e-6), heads)[0]
        x = x + _mlp(sd, i, _layer_norm(sd, f"blocks.{i}.norm2", x, 1e-6))
    return _head(sd, x), kept


def same_sets(a, b) -> bool:
    """Every row of ``a`` and ``b`` holds the same set (multiset) of kept indices."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool((np.sort(a, axis=1) == np.sort(b, axis=1)).all())


def assert_static_matches_reference(checkpoint, family: str, settings: dict, images):
    """Load ``checkpoint`` as ``family``, rewrite it, and assert the static twin equals the reference
    (logits, top-1, kept-token sets per selection). Returns (loaded, static, static kept) for
    family-specific checks."""
    from vitedge.load import load_model
    from vitedge.rewrite import to_static

    loaded = load_model(checkpoint, family=family, num_heads=HEADS, settings=settings)
    static = to_static(loaded.model, loaded.plan)
    images = torch.from_numpy(images)
    with torch.no_grad():
        ref_logits, ref_kept = loaded.model.forward_tokens(images)
        st_logits, st_kept = static.forward_tokens(images)
    assert torch.allclose(ref_logits, st_logits, atol=1e-5)
    assert (ref_logits.argmax(1) == st_logits.argmax(1)).all()
    assert len(ref_kept) == len(st_kept) == len(loaded.plan.selections)
    for ref, st in zip(ref_kept, st_kept):
        assert same_sets(ref, st)
    return loaded, static, st_kept


# --- SuperViT (lmbxmu/SuperViT): one position table per trained input size.

SUPERVIT_SIZES = (16, 20, 24, 28)  # the Fashion-MNIST analogue of 128/160/192/224: 4..7 patches of 4 px


def official_supervit_keys(cfg: ViTConfig, sizes) -> dict[str, tuple[int, ...]]:
    """lmbxmu/SuperViT ``super_deit.VisionTransformer``: timm keys, ``pos_embed`` replaced by one table per size."""
    keys = official_vit_keys(cfg)
    del keys["pos_embed"]
    for i, size in enumerate(sizes):
        keys[f"pos_embed_list.{i}"] = (1, (size // cfg.patch_size) ** 2 + 1, cfg.embed_dim)
    return keys


def make_supervit_state(cfg: ViTConfig = FMNIST, sizes=SUPERVIT_SIZES, seed: int = 11) -> dict[str, torch.Tensor]:
    """Random weights in the official layout (the timm part as ``support.make_state_dict``)."""
    state = make_state_dict("evit", cfg, seed=seed)
    del state["pos_embed"]
    gen = torch.Generator().manual_seed(seed + 1)
    for key, shape in official_supervit_keys(cfg, sizes).items():
        if key.startswith("pos_embed_list."):
            state[key] = POS_SCALE * torch.randn(shape, generator=gen)
    assert set(state) == set(official_supervit_keys(cfg, sizes))
    return state


# --- Backbone variants, key lists written from the official code (timm vision_transformer.py /
# --- deit.py, MAE models_vit.py, DeiT-III models_v2.py, TokenLabeling tlt/models/lvvit.py).

def timm_vit_keys(embed_dim=64, depth=4, patch=4, img=28, in_chans=1, num_classes=10, mlp_ratio=4.0,
                  class_token=True, dist_token=False, fc_norm=False, layer_scale=False, no_embed_class=False,
                  qkv_bias=True) -> dict[str, tuple[int, ...]]:
    """timm ``VisionTransformer`` (and ``VisionTransformerDistilled``) ``state_dict`` names and shapes.

    ``fc_norm``: ``use_fc_norm`` (global_pool="avg"; MAE ``global_pool=True`` deletes ``norm``);
    ``layer_scale``: ``init_values`` set (``ls1.gamma``, ``ls2.gamma``); ``no_embed_class``:
    ``embed_len = num_patches`` instead of ``num_patches + num_prefix_tokens``.
    """
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    patches = (img // patch) ** 2
    prefix = int(class_token) + int(dist_token)
    keys: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (d, in_chans, patch, patch),
        "patch_embed.proj.bias": (d,),
        "pos_embed": (1, patches + (0 if no_embed_class else prefix), d),
    }
    if class_token:
        keys["cls_token"] = (1, 1, d)
    if dist_token:
        keys["dist_token"] = (1, 1, d)
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d)})
        if qkv_bias:
            keys[p + "attn.qkv.bias"] = (3 * d,)
        keys.update({
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (hidden, d), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (d, hidden), p + "mlp.fc2.bias": (d,),
        })
        if layer_scale:
            keys.update({p + "ls1.gamma": (d,), p + "ls2.gamma": (d,)})
    final = "fc_norm" if fc_norm else "norm"
    keys.update({f"{final}.weight": (d,), f"{final}.bias": (d,),
                 "head.weight": (num_classes, d), "head.bias": (num_classes,)})
    if dist_token:
        keys.update({"head_dist.weight": (num_classes, d), "head_dist.bias": (num_classes,)})
    return keys


def lvvit_keys(embed_dim=64, depth=16, patch=4, img=28, in_chans=1, num_classes=10, mlp_ratio=3.0, stem=64,
               aux_head=True, predictors=0, sizes=None) -> dict[str, tuple[int, ...]]:
    """TokenLabeling ``LV_ViT`` with ``p_emb='4_2'`` (``PatchEmbed4_2``: conv1..3 + bn1..3 + proj of
    kernel patch/2), ``qkv_bias=False``, ``return_dense=True`` (``aux_head``); ``predictors``:
    DynamicViT ``LVViTDiffPruning``'s ``score_predictor.{s}``; ``sizes``: SuperViT ``super_lvvit``'s
    ``pos_embed_list.{i}``, one table per input size, instead of ``pos_embed``.
    """
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    keys: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "patch_embed.conv1.weight": (stem, in_chans, 7, 7),
        "patch_embed.conv2.weight": (stem, stem, 3, 3),
        "patch_embed.conv3.weight": (stem, stem, 3, 3),
        "patch_embed.proj.weight": (d, stem, patch // 2, patch // 2),
        "patch_embed.proj.bias": (d,),
    }
    for i in (1, 2, 3):
        keys.update({f"patch_embed.bn{i}.{p}": (stem,) for p in ("weight", "bias", "running_mean", "running_var")})
        keys[f"patch_embed.bn{i}.num_batches_tracked"] = ()
    if sizes:
        for i, size in enumerate(sizes):
            keys[f"pos_embed_list.{i}"] = (1, (size // patch) ** 2 + 1, d)
    else:
        keys["pos_embed"] = (1, (img // patch) ** 2 + 1, d)
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (hidden, d), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (d, hidden), p + "mlp.fc2.bias": (d,),
        })
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "head.weight": (num_classes, d), "head.bias": (num_classes,)})
    if aux_head:
        keys.update({"aux_head.weight": (num_classes, d), "aux_head.bias": (num_classes,)})
    for s in range(predictors):
        p = f"score_predictor.{s}."
        keys.update({
            p + "in_conv.0.weight": (d,), p + "in_conv.0.bias": (d,),
            p + "in_conv.1.weight": (d, d), p + "in_conv.1.bias": (d,),
            p + "out_conv.0.weight": (d // 2, d), p + "out_conv.0.bias": (d // 2,),
            p + "out_conv.2.weight": (d // 4, d // 2), p + "out_conv.2.bias": (d // 4,),
            p + "out_conv.4.weight": (2, d // 4), p + "out_conv.4.bias": (2,),
        })
    return keys


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for any of the layouts above, far from ties (``make_state_dict`` uses it for
    timm/DynamicViT keys); LayerScale gains ~0.5 so the branches matter, BatchNorm statistics non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(100)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif ".bn" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(("ls1.gamma", "ls2.gamma")):
            value = 0.5 + 0.2 * torch.rand(shape, generator=gen)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "in_conv.0.weight")):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        elif key in ("pos_embed", "cls_token", "dist_token") or key.startswith("pos_embed_list."):
            value = POS_SCALE * torch.randn(shape, generator=gen)
        elif key.startswith("patch_embed.conv"):
            value = (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5 * torch.randn(shape, generator=gen)
        elif "attn.qkv" in key or "patch_embed" in key:
            value = QKV_SCALE * torch.randn(shape, generator=gen)
        elif key.startswith("score_predictor."):
            # spread the keep scores: near log(0.5) everywhere, float32 ties would decide selections
            value = 0.2 * torch.randn(shape, generator=gen)
        else:
            value = 0.05 * torch.randn(shape, generator=gen)
        state[key] = value.contiguous()
    return state


# --- torchvision / SWAG ViTs (torchvision models/vision_transformer.py; facebookresearch/SWAG
# --- models/vision_transformer.py, the torch-hub models): names, shapes and each one's timm twin.

def torchvision_vit_layout(embed_dim=32, depth=4, patch=4, img=28, in_chans=1, num_classes=10, mlp_ratio=4.0,
                           layout="torchvision", class_token=True, old_mlp=False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{official name: (the timm name of the same tensor, official shape)}``.

    torchvision: ``encoder.layers.encoder_layer_{i}``, ``MLPBlock`` as ``mlp.0`` / ``mlp.3`` (``old_mlp``:
    ``mlp.linear_1`` / ``linear_2``, before torchvision 0.12), ``encoder.pos_embedding`` [1, S, D],
    ``heads.head``. SWAG: ``encoder.layers.layer_{i}``, ``mlp.linear_1`` / ``linear_2``, the table
    sequence-first [S, 1, D], ``head.layers.head``; ``class_token=False`` is SWAG's ``classifier="gap"``.
    """
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    seq = (img // patch) ** 2 + int(class_token)
    swag = layout == "swag"
    keys = {
        "conv_proj.weight": ("patch_embed.proj.weight", (d, in_chans, patch, patch)),
        "conv_proj.bias": ("patch_embed.proj.bias", (d,)),
        "encoder.pos_embedding": ("pos_embed", (seq, 1, d) if swag else (1, seq, d)),
    }
    if class_token:
        keys["class_token"] = ("cls_token", (1, 1, d))
    fc1, fc2 = ("mlp.linear_1", "mlp.linear_2") if swag or old_mlp else ("mlp.0", "mlp.3")
    for i in range(depth):
        p, t = (f"encoder.layers.layer_{i}." if swag else f"encoder.layers.encoder_layer_{i}."), f"blocks.{i}."
        keys.update({
            p + "ln_1.weight": (t + "norm1.weight", (d,)), p + "ln_1.bias": (t + "norm1.bias", (d,)),
            p + "self_attention.in_proj_weight": (t + "attn.qkv.weight", (3 * d, d)),
            p + "self_attention.in_proj_bias": (t + "attn.qkv.bias", (3 * d,)),
            p + "self_attention.out_proj.weight": (t + "attn.proj.weight", (d, d)),
            p + "self_attention.out_proj.bias": (t + "attn.proj.bias", (d,)),
            p + "ln_2.weight": (t + "norm2.weight", (d,)), p + "ln_2.bias": (t + "norm2.bias", (d,)),
            p + fc1 + ".weight": (t + "mlp.fc1.weight", (hidden, d)), p + fc1 + ".bias": (t + "mlp.fc1.bias", (hidden,)),
            p + fc2 + ".weight": (t + "mlp.fc2.weight", (d, hidden)), p + fc2 + ".bias": (t + "mlp.fc2.bias", (d,)),
        })
    head = "head.layers.head" if swag else "heads.head"
    keys.update({"encoder.ln.weight": ("norm.weight", (d,)), "encoder.ln.bias": ("norm.bias", (d,)),
                 head + ".weight": ("head.weight", (num_classes, d)), head + ".bias": ("head.bias", (num_classes,))})
    return keys


def torchvision_vit_state(layout: dict[str, tuple[str, tuple[int, ...]]], seed: int = 0) -> tuple[dict, dict]:
    """(official state dict, the same tensors under timm names), drawn by ``random_state`` on the timm
    names so that the weight-scaling rules apply (LayerNorm gains ~1, spread positions and attention)."""
    timm_shapes = {timm: shape for timm, shape in layout.values()}
    timm_shapes["pos_embed"] = (1, max(layout["encoder.pos_embedding"][1][:2]), layout["encoder.pos_embedding"][1][2])
    timm = random_state(timm_shapes, seed)
    official = {name: timm[twin].reshape(shape).contiguous() for name, (twin, shape) in layout.items()}
    return official, timm


def evo_levit_keys(dims=(32, 48, 64), key_dim=8, heads=(2, 3, 4), depths=(3, 2, 2), img=128, in_chans=1,
                   num_classes=10, prune_ratio=None, training_heads=True) -> dict[str, tuple[int, ...]]:
    """Evo-LeViT ``LeViT`` (levit/evo_levit.py ``model_factory``: ``b16`` stem, attn_ratio 2, mlp_ratio 2,
    ``down_ops`` Subsample(D, C_i // D heads, attn_ratio 4, mlp_ratio 2, stride 2), distillation) state dict
    names and shapes: ``blocks.*`` (one ``CatModule`` m1/m2 per attention block, then ``AttentionSubsample``
    and its ``Residual`` MLP) and ``stage_blocks.*`` (the same modules: blocks of ratio 1 alone, the others
    of a stage in one ``StageModule.m``); ``prune_ratio`` is the first list of ``prune_ratio_list``
    (default: 1, 1, then 0.5); ``training_heads``: ``head_cls`` / ``head_cls_dist``."""
    prune_ratio = prune_ratio or [1, 1] + [0.5] * (sum(depths) - 2)

    def linear_bn(prefix, a, b):
        keys = {prefix + "c.weight": (b, a)}
        keys.update({prefix + f"bn.{p}": (b,) for p in ("weight", "bias", "running_mean", "running_var")})
        keys[prefix + "bn.num_batches_tracked"] = ()
        return keys

    def residual_mlp(prefix, d):
        return {**linear_bn(prefix + "m.0.", d, 2 * d), **linear_bn(prefix + "m.2.", 2 * d, d)}

    def residual_attention(prefix, d, h):
        qkv = h * (key_dim + key_dim + 2 * key_dim)
        return {**linear_bn(prefix + "m.qkv.", d, qkv), **linear_bn(prefix + "m.proj.1.", h * 2 * key_dim, d),
                prefix + "m.learn_tradeoff": (1,)}

    keys: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, dims[0])}
    widths = [in_chans, dims[0] // 8, dims[0] // 4, dims[0] // 2, dims[0]]
    for i in range(4):
        p = f"patch_embed.{2 * i}."
        keys[p + "c.weight"] = (widths[i + 1], widths[i], 3, 3)
        keys.update({p + f"bn.{q}": (widths[i + 1],) for q in ("weight", "bias", "running_mean", "running_var")})
        keys[p + "bn.num_batches_tracked"] = ()
    resolution = img // 16
    keys["poss"] = (1, resolution**2 + 1, dims[0])
    blocks, stage, layer = [], [], 0  # (module keys without prefix) in blocks / stage_blocks order
    for s, (d, depth, h) in enumerate(zip(dims, depths, heads)):
        sub = []
        for _ in range(depth):
            m1, m2 = residual_attention("", d, h), residual_mlp("", d)
            blocks.append({**{"m1." + k: v for k, v in m1.items()}, **{"m2." + k: v for k, v in m2.items()}})
            if prune_ratio[layer] == 1:
                stage += [m1, m2]
            else:
                sub += [m1, m2]
            layer += 1
        if sub:
            stage.append({f"m.{j}.{k}": v for j, module in enumerate(sub) for k, v in module.items()})
        if s + 1 < len(dims):
            nh = d // key_dim
            out = dims[s + 1]
            subsample = {**linear_bn("kv.", d, nh * (key_dim + 4 * key_dim)), **linear_bn("q.1.", d, nh * key_dim),
                         **linear_bn("proj.1.", nh * 4 * key_dim, out), "poss": (1, resolution**2 + 1, d),
                         "learn_tradeoff": (1,)}
            ffn = residual_mlp("", out)
            blocks += [subsample, ffn]
            stage += [subsample, ffn]
            resolution = (resolution - 1) // 2 + 1
    for name, modules in (("blocks", blocks), ("stage_blocks", stage)):
        for index, module in enumerate(modules):
            keys.update({f"{name}.{index}.{k}": v for k, v in module.items()})
    heads_ = ("head", "head_dist") + (("head_cls", "head_cls_dist") if training_heads else ())
    for name in heads_:
        keys.update({f"{name}.bn.{q}": (dims[-1],) for q in ("weight", "bias", "running_mean", "running_var")})
        keys[f"{name}.bn.num_batches_tracked"] = ()
        keys.update({f"{name}.l.weight": (num_classes, dims[-1]), f"{name}.l.bias": (num_classes,)})
    return keys


def evo_levit_state(seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """Random weights in ``evo_levit_keys``' layout with every ``stage_blocks.*`` tensor its ``blocks.*`` twin,
    as the official model saves them (one module under two names); every layer of unit gain (activations stay
    O(1) at any width) and attention sharp enough that class attention is far from uniform."""
    keys = evo_levit_keys(**shape)
    state = random_state({k: v for k, v in keys.items() if not k.startswith("stage_blocks.")}, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if key.endswith("c.weight") or key.endswith("l.weight"):
            # unit gain per layer (BatchNorm's fixed statistics do not renormalise); attention sharp, not saturated
            fan_in = int(torch.tensor(value.shape[1:]).prod())
            gain = 2.5 if key.endswith(("qkv.c.weight", "kv.c.weight", "q.1.c.weight")) else 3.0 if key.endswith("l.weight") else 1.0
            state[key] = gain * torch.randn(value.shape, generator=gen) / fan_in**0.5
        elif key.endswith(("m.2.bn.weight", "m.proj.1.bn.weight")):  # residual branch outputs: small, as trained
            state[key] = 0.3 + 0.05 * torch.randn(value.shape, generator=gen)
        elif key.endswith("learn_tradeoff"):
            state[key] = 2.0 * torch.randn(value.shape, generator=gen)
    blocks = [k for k in keys if k.startswith("blocks.")]
    stages = [k for k in keys if k.startswith("stage_blocks.")]
    # same modules in the same order: pair each stage_blocks tensor with the blocks tensor it names
    block_units = _evo_levit_units(blocks, "blocks")
    stage_units = _evo_levit_units(stages, "stage_blocks")
    for (b_prefix, b_keys), (s_prefix, _) in zip(block_units, stage_units, strict=True):
        for suffix in b_keys:
            state[f"{s_prefix}.{suffix}"] = state[f"{b_prefix}.{suffix}"]
    return {k: state[k] for k in keys}


def _evo_levit_units(keys: list[str], name: str) -> list[tuple[str, list[str]]]:
    """(prefix, suffixes) of each residual / subsampling module, in order (CatModule m1/m2, StageModule m.j)."""
    units: dict[str, list[str]] = {}
    for key in keys:
        parts = key[len(name) + 1:].split(".")
        if parts[1] in ("m1", "m2"):
            prefix, rest = f"{name}.{parts[0]}.{parts[1]}", parts[2:]
        elif parts[1] == "m" and parts[2].isdigit() and parts[3] == "m":
            prefix, rest = f"{name}.{parts[0]}.m.{parts[2]}", parts[3:]
        else:
            prefix, rest = f"{name}.{parts[0]}", parts[1:]
        units.setdefault(prefix, []).append(".".join(rest))

    def order(prefix: str):
        return [int(p) if p.isdigit() else p for p in prefix.split(".")[1:]]

    return sorted(units.items(), key=lambda item: order(item[0]))
