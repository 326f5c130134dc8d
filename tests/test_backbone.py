"""vitedge.backbone: timm key names, config inference, position-embedding resampling, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import FMNIST, official_vit_keys

from vitedge.backbone import (
    ARCHS,
    Attention,
    VisionTransformer,
    ViTConfig,
    arch_config,
    block_flops,
    default_normalization,
    dense_flops,
    infer_config,
    resample_pos_embed,
    stem_head_flops,
)
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
