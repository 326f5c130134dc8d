"""vitedge.backbone: timm key names, config inference, position-embedding resampling, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import FMNIST, lvvit_keys, official_vit_keys, random_state, timm_vit_keys

from vitedge.backbone import (
    ARCHS,
    Attention,
    VisionTransformer,
    ViTConfig,
    arch_config,
    block_flops,
    default_normalization,
    dense_flops,
    resample_pos_embed,
    stem_head_flops,
)
from vitedge.backbones import adapt_state_dict, infer_config, prepare_for_export
from vitedge.errors import VitedgeError


@pytest.mark.parametrize("arch", ["vit_fmnist", "deit_tiny"])
def test_parameter_names_and_shapes_are_timm_deit(arch):
    cfg = ARCHS[arch]
    model = VisionTransformer(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_vit_keys(cfg)


def test_infer_config_reads_the_shape_off_official_weights(evit_state):
    assert infer_config(evit_state, num_heads=2) == FMNIST
    # The head count is not in the weights: 64 channels per head by default.
    assert infer_config(evit_state).num_heads == 1


def test_infer_config_deit_small_shapes():
    cfg = ARCHS["deit_small"]
    state = {k: torch.empty(s) for k, s in official_vit_keys(cfg).items()}
    assert infer_config(state) == cfg  # 384 / 64 = 6 heads, the DeiT-S default
    no_bias = {k: v for k, v in state.items() if not k.endswith("attn.qkv.bias")}
    assert infer_config(no_bias).qkv_bias is False


def test_infer_config_rejects_non_vit_and_bad_shapes(evit_state):
    with pytest.raises(VitedgeError, match="missing .*head.weight"):
        infer_config({k: v for k, v in evit_state.items() if not k.startswith("head.")})
    odd = dict(evit_state, pos_embed=torch.zeros(1, 1 + 47, 64))
    with pytest.raises(VitedgeError, match="48 positions: neither a square grid of patches nor a class token plus"):
        infer_config(odd)
    with pytest.raises(VitedgeError, match="not divisible by 3 heads"):
        infer_config(evit_state, num_heads=3)


def test_image_size_must_be_a_multiple_of_the_patch():
    assert FMNIST.with_img_size(32).grid_size == 8
    for bad in (30, 0, -4):
        with pytest.raises(VitedgeError, match="not a positive multiple of the patch size 4"):
            FMNIST.with_img_size(bad)


def test_arch_lookup():
    assert arch_config("deit_small").embed_dim == 384
    with pytest.raises(VitedgeError, match="unknown arch 'deit_huge'"):
        arch_config("deit_huge")


def test_default_normalization():
    assert default_normalization(1) == ((0.2860,), (0.3530,))
    assert default_normalization(3)[0] == (0.485, 0.456, 0.406)


def test_resample_pos_embed():
    pos = torch.randn(1, 50, 8)
    assert resample_pos_embed(pos, 7) is pos
    bigger = resample_pos_embed(pos, 14)
    assert bigger.shape == (1, 197, 8)
    assert torch.equal(bigger[:, 0], pos[:, 0])  # class token untouched
    # A constant grid stays constant under bicubic resampling.
    flat = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 49, 8), 0.25)], dim=1)
    assert torch.allclose(resample_pos_embed(flat, 10)[:, 1:], torch.full((1, 100, 8), 0.25), atol=1e-6)


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    attn = Attention(FMNIST).eval()
    x = torch.randn(3, 50, 64)
    explicit, weights = attn.forward_with_attn(x)
    attn.fused = True
    assert torch.allclose(attn(x), explicit, atol=1e-5)
    assert weights.shape == (3, 2, 50, 50)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 50), atol=1e-5)


def test_dense_model_forward_tokens_has_no_selections():
    model = VisionTransformer(FMNIST).eval()
    logits, kept = model.forward_tokens(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and kept == []


def test_dense_flops_match_deit_small_published_figure():
    # DeiT-S: 4.6 GMACs ("GFLOPs" in the paper); vitedge counts 2 FLOPs per MAC.
    macs = dense_flops(ARCHS["deit_small"]) / 2
    assert macs == pytest.approx(4.6e9, rel=0.02)


def test_flops_accounting():
    cfg = ARCHS["deit_small"]
    assert dense_flops(cfg) == stem_head_flops(cfg) + 12 * block_flops(cfg, 197)
    # Dropping tokens between attention and MLP only cheapens the MLP.
    assert block_flops(cfg, 197, 140) < block_flops(cfg, 197)
    assert block_flops(cfg, 197, 140) > block_flops(cfg, 140)


def test_config_round_trips_through_dict():
    assert ViTConfig(**FMNIST.to_dict()) == FMNIST
    assert dataclasses.replace(FMNIST, img_size=56).num_patches == 196


# --- timm VisionTransformer variants and LV-ViT (vitedge.backbones)

VARIANTS = {
    "mae": dict(fc_norm=True),
    "deit3": dict(layer_scale=True, no_embed_class=True),
    "distilled": dict(dist_token=True),
    "no-class-token": dict(class_token=False, fc_norm=True),
    "p7-mlp3-no-qkv-bias": dict(patch=7, mlp_ratio=3.0, qkv_bias=False),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_config_is_read_off_timm_keys_and_rebuilds_them(name):
    keys = timm_vit_keys(64, 3, **VARIANTS[name])
    cfg = infer_config({k: torch.empty(s) for k, s in keys.items()}, num_heads=2)
    ours = {k: tuple(v.shape) for k, v in VisionTransformer(cfg).state_dict().items()}
    assert ours == keys
    options = VARIANTS[name]
    assert cfg.global_pool == ("avg" if options.get("fc_norm") else "token")
    assert cfg.num_prefix_tokens == int(options.get("class_token", True)) + int(options.get("dist_token", False))
    assert cfg.patch_size == options.get("patch", 4) and cfg.img_size == 28
    assert cfg.qkv_bias == options.get("qkv_bias", True) and cfg.mlp_ratio == options.get("mlp_ratio", 4.0)


def test_deit3_official_gamma_keys_are_timm_layer_scale():
    keys = timm_vit_keys(64, 2, layer_scale=True, no_embed_class=True)
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): torch.rand(s) for k, s in keys.items()}
    remapped = adapt_state_dict(official)
    assert set(remapped) == set(keys)
    assert torch.equal(remapped["blocks.1.ls2.gamma"], official["blocks.1.gamma_2"])


def test_positions_over_patches_only_are_added_before_the_class_token():
    cfg = infer_config({k: torch.empty(s) for k, s in timm_vit_keys(64, 1, no_embed_class=True).items()}, num_heads=2)
    model = VisionTransformer(cfg).eval()
    images = torch.randn(2, 1, 28, 28)
    tokens = model.embed(images)
    assert tokens.shape == (2, 50, 64)
    assert torch.equal(tokens[:, 0], model.cls_token[:, 0].expand(2, -1))  # no position on the class token
    assert torch.allclose(tokens[:, 1:], model.patch_embed(images) + model.pos_embed)


def test_distilled_logits_average_both_heads():
    cfg = infer_config({k: torch.empty(s) for k, s in timm_vit_keys(64, 1, dist_token=True).items()}, num_heads=2)
    model = VisionTransformer(cfg).eval()
    x = torch.randn(2, 51, 64)
    final = model.norm(x)
    assert torch.allclose(model.classify(x), (model.head(final[:, 0]) + model.head_dist(final[:, 1])) / 2)


def test_lvvit_config_from_the_tokenlabeling_layout():
    cfg = infer_config({k: torch.empty(s) for k, s in lvvit_keys(384, 16, patch=16, img=224, in_chans=3,
                                                                  num_classes=1000).items()})
    assert (cfg.backbone, cfg.patch_size, cfg.in_chans, cfg.stem_channels) == ("lvvit", 16, 3, 64)
    assert (cfg.num_heads, cfg.skip_lam, cfg.mlp_ratio, cfg.qkv_bias, cfg.aux_head, cfg.norm_eps) == (6, 2.0, 3.0, False, True, 1e-5)
    # LV-ViT-S: 6.6 GFLOPs (MACs) in the TokenLabeling README
    assert dense_flops(cfg) / 2 == pytest.approx(6.6e9, rel=0.02)
    tiny = infer_config({k: torch.empty(s) for k, s in lvvit_keys(240, 12, patch=16, img=224, in_chans=3).items()})
    assert (tiny.num_heads, tiny.skip_lam) == (4, 1.0)  # lvvit_t: 60 channels per head, no residual scale


def test_lvvit_rebuilds_its_keys_and_folds_batch_norm():
    keys = lvvit_keys(64, 2)
    state = random_state(keys, seed=1)
    cfg = infer_config(state, num_heads=2)
    model = VisionTransformer(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    model.load_state_dict(state)
    model.eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        before = model(images)
        folded = prepare_for_export(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(images), before, atol=1e-5)


def test_lvvit_stem_without_its_batch_norms_is_one_line():
    state = {k: torch.empty(s) for k, s in lvvit_keys(64, 2).items() if ".bn2." not in k}
    with pytest.raises(VitedgeError, match="LV-ViT conv stem without patch_embed.bn2.weight"):
        infer_config(state)


def test_position_table_that_fits_no_layout_is_refused():
    keys = timm_vit_keys(64, 1, dist_token=True)
    state = {k: torch.empty(s) for k, s in keys.items()} | {"pos_embed": torch.empty(1, 50, 64)}
    with pytest.raises(VitedgeError, match="50 positions: neither a square grid of patches nor class and distillation tokens"):
        infer_config(state)


@pytest.mark.parametrize("name, keys, want", [
    # (embed, depth, patch, img): the timm ViTs the issue lists as loading today, and ToMe's larger ones
    ("DeiT-256", dict(embed_dim=256, depth=12, patch=16, img=224), (224, 16, 4)),
    ("AugReg ViT-B/32", dict(embed_dim=768, depth=12, patch=32, img=224), (224, 32, 12)),
    ("ViT-L/16 @ 384", dict(embed_dim=1024, depth=24, patch=16, img=384), (384, 16, 16)),
    # ViT-H/14: 16 heads of 80 (MAE models_vit.py vit_huge_patch14, timm vit_huge_patch14_224), not 64 per head
    ("MAE ViT-H/14", dict(embed_dim=1280, depth=32, patch=14, img=224, fc_norm=True), (224, 14, 16)),
    ("ViT-H/14 @ 518", dict(embed_dim=1280, depth=32, patch=14, img=518), (518, 14, 16)),
    ("DeiT-III-B @ 384", dict(embed_dim=768, depth=12, patch=16, img=384, layer_scale=True, no_embed_class=True),
     (384, 16, 12)),
])
def test_released_shapes_are_read_off_the_weights(name, keys, want):
    shapes = timm_vit_keys(in_chans=3, num_classes=1000, **keys)
    cfg = infer_config({k: torch.empty(s) for k, s in shapes.items()})
    assert (cfg.img_size, cfg.patch_size, cfg.num_heads) == want, name


def test_patch_only_position_table_resamples_without_a_prefix_row():
    pos = torch.randn(1, 49, 8)
    bigger = resample_pos_embed(pos, 8, num_prefix=0)
    assert bigger.shape == (1, 64, 8)
    flat = torch.full((1, 49, 8), 0.25)
    assert torch.allclose(resample_pos_embed(flat, 10, num_prefix=0), torch.full((1, 100, 8), 0.25), atol=1e-6)
