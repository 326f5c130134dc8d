"""EViT: token plan, reference semantics (vs the official eval code), static twin, exported graph."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from support import HEADS, assert_static_matches_reference, official_evit, same_sets

from vitedge.backbone import ARCHS, dense_flops
from vitedge.check import check_model
from vitedge.errors import VitedgeError
from vitedge.families import get_family
from vitedge.families.evit import FUSED_POSITION, EViTBlock
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched

EVIT = get_family("evit")


def plan_for(arch: str, **overrides):
    cfg = ARCHS[arch]
    settings = EVIT.resolve_settings(cfg, overrides)
    return EVIT.token_plan(cfg, settings), settings


def test_deit_small_plan_is_197_140_100_72():
    plan, settings = plan_for("deit_small")
    assert settings == {"keep_rate": [0.7, 0.7, 0.7], "prune_blocks": [3, 6, 9], "fuse_token": True}
    assert [s["kept_patches"] for s in plan.selections] == [138, 98, 70]
    assert [s["tokens_after"] for s in plan.selections] == [140, 100, 72]
    attention = [b.attention for b in plan.blocks]
    mlp = [b.mlp for b in plan.blocks]
    # Tokens drop between attention and MLP of blocks 3, 6, 9.
    assert attention == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert mlp == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3


def test_deit_small_flops_match_the_paper():
    plan, _ = plan_for("deit_small")
    cfg = ARCHS["deit_small"]
    assert plan.flops(cfg) / 2 == pytest.approx(3.0e9, rel=0.03)  # EViT-S/0.7: 3.0 GFLOPs
    assert plan.flops(cfg) / dense_flops(cfg) == pytest.approx(0.659, abs=0.005)


def test_plan_without_fused_token_and_with_per_block_rates():
    plan, _ = plan_for("deit_small", fuse_token=False)
    assert [s["tokens_after"] for s in plan.selections] == [139, 98, 69]
    plan, settings = plan_for("deit_small", keep_rate=[0.5, 0.7, 0.9])
    assert settings["keep_rate"] == [0.5, 0.7, 0.9]
    assert [s["kept_patches"] for s in plan.selections] == [98, 70, 64]
    assert [s["tokens_after"] for s in plan.selections] == [100, 72, 66]


def test_keep_rate_one_prunes_nothing_and_fuses_nothing():
    plan, _ = plan_for("deit_small", keep_rate=1.0)
    assert all(b.attention == b.mlp == 197 for b in plan.blocks)
    assert [s["tokens_after"] for s in plan.selections] == [197, 197, 197]


def test_fmnist_plan():
    plan, _ = plan_for("vit_fmnist")
    assert [s["kept_patches"] for s in plan.selections] == [35, 26, 19]
    assert [s["tokens_after"] for s in plan.selections] == [37, 28, 21]


@pytest.mark.parametrize("overrides, message", [
    ({"keep_rate": 0}, "keep rate must be in"),
    ({"keep_rate": 1.5}, "keep rate must be in"),
    ({"keep_rate": -1}, "keep rate must be in"),
    ({"keep_rate": "fast"}, "must be a number"),
    ({"keep_rate": [0.7, 0.7]}, "2 keep rates given for 3 pruning blocks"),
    ({"prune_blocks": [3, 12]}, "prune blocks"),
    ({"ratio": 0.7}, "has no setting ratio"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(VitedgeError, match=message):
        EVIT.resolve_settings(ARCHS["vit_fmnist"], overrides)


def test_select_keeps_top_attention_and_fuses_the_rest_weighted_by_it():
    cfg = ARCHS["vit_fmnist"]
    block = EViTBlock(cfg, 3, keep_rate=0.5, fuse_token=True)
    torch.manual_seed(0)
    x = torch.randn(1, 5, cfg.embed_dim)
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    positions = torch.tensor([[10, 11, 12, 13]])
    out, kept = block.select(x, scores, positions)
    patches = x[0, 1:]
    fused = 0.1 * patches[0] + 0.2 * patches[2]
    assert torch.allclose(out[0], torch.stack([x[0, 0], patches[1], patches[3], fused]))
    assert kept.tolist() == [[11, 13, FUSED_POSITION]]
    block.fuse_token = False
    out, kept = block.select(x, scores, positions)
    assert out.shape == (1, 3, cfg.embed_dim) and kept.tolist() == [[11, 13]]


@pytest.mark.parametrize("keep_rate, kept_widths", [
    (0.7, [36, 27, 20]),
    ([0.5, 1.0, 0.6], [26, 26, 17]),
    (1.0, [49, 49, 49]),
])
def test_reference_matches_official_eval_code(evit_ckpt, evit_state, fmnist_batch, keep_rate, kept_widths):
    loaded = load_model(evit_ckpt, family="evit", num_heads=HEADS, settings={"keep_rate": keep_rate})
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(images)
    want_logits, want_kept = official_evit(evit_state, images, HEADS, loaded.settings["keep_rate"])
    assert torch.allclose(logits, want_logits, atol=1e-4)
    assert [k.shape[1] for k in kept] == kept_widths
    for ours, official in zip(kept, want_kept):
        assert same_sets(ours, official)


@pytest.mark.parametrize("settings", [
    {"keep_rate": 0.7},
    {"keep_rate": 0.5, "fuse_token": False},
    {"keep_rate": [0.5, 1.0, 0.6]},
    {"keep_rate": [0.9, 0.8, 0.3], "prune_blocks": [1, 5, 10]},
    {"keep_rate": 1.0},
])
def test_static_twin_equals_reference(evit_ckpt, fmnist_batch, settings):
    loaded, _, st_kept = assert_static_matches_reference(evit_ckpt, "evit", settings, fmnist_batch[0])
    for st, step in zip(st_kept, loaded.plan.selections):
        # The static width is the plan's constant: kept patches (+ the fused token).
        assert st.shape[1] == step["tokens_after"] - 1


def test_keep_rate_one_equals_dense_deit(evit_ckpt, fmnist_batch):
    evit = load_model(evit_ckpt, family="evit", num_heads=HEADS, settings={"keep_rate": 1.0})
    dense = load_model(evit_ckpt, family="deit", num_heads=HEADS)
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits, kept = to_static(evit.model, evit.plan).forward_tokens(images)
        assert torch.allclose(logits, dense.model(images), atol=1e-5)
    for positions in kept:  # every patch, in order, and no fused token
        assert positions.tolist() == [list(range(49))] * len(images)


def test_exported_graph_is_static_with_the_plan_as_topk_constants(evit_artifact):
    proto = onnx.load(str(evit_artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    assert result.topk_k == [35, 26, 19]
    assert result.opset >= 17
    for node in proto.graph.node:
        if node.op_type in ("ScatterElements", "ScatterND"):
            assert all(a.name != "reduction" or a.s == b"none" for a in node.attribute)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes == {"logits": [1, 10], "kept_tokens_3": [1, 36], "kept_tokens_6": [1, 27], "kept_tokens_9": [1, 20]}


def test_onnx_runtime_matches_the_static_model(evit_artifact, evit_ckpt, fmnist_batch):
    loaded = load_model(evit_ckpt, family="evit", num_heads=HEADS)
    images = fmnist_batch[0][:16]
    outputs = run_batched(ort_session(evit_artifact / "model.onnx"), images)
    with torch.no_grad():
        logits, kept = to_static(loaded.model, loaded.plan).forward_tokens(torch.from_numpy(images))
    np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
    for ort_kept, torch_kept in zip(outputs[1:], kept):
        assert ort_kept.dtype == np.int32
        assert same_sets(ort_kept, torch_kept.numpy())
        assert (ort_kept[:, -1] == FUSED_POSITION).all()  # the fused token is appended last


def test_kept_count_rounds_up_like_the_official_code():
    from vitedge.families.evit import kept_count

    assert kept_count(0.7, 197) == math.ceil(0.7 * 196) == 138
    assert kept_count(0.5, 5) == 2
    assert kept_count(1.0, 197) == 196


@pytest.mark.slow
def test_deit_tiny_224_export_has_the_paper_token_counts(tmp_path):
    """One DeiT-sized graph (DeiT-Tiny, 224 px, 197 tokens): 197 -> 140 -> 100 -> 72 in the ONNX itself."""
    from support import make_state_dict, quiet

    import vitedge

    ckpt = tmp_path / "evit_deit_tiny.pth"
    torch.save({"model": make_state_dict("evit", ARCHS["deit_tiny"], seed=2)}, ckpt)
    out = tmp_path / "out"
    report = vitedge.export(ckpt, out, family="evit", validate_limit=16, log=quiet)
    assert report["check"]["passed"] and report["check"]["topk_k"] == [138, 98, 70]
    assert report["validate"]["passed"] and report["validate"]["top1_agreement"] == 1.0
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    # kept patch indices + the fused token: 1 + 139 = 140, 1 + 99 = 100, 1 + 71 = 72 tokens.
    assert shapes == {"logits": [1, 1000], "kept_tokens_3": [1, 139], "kept_tokens_6": [1, 99], "kept_tokens_9": [1, 71]}
