"""DynamicViT: token plan, reference semantics (vs the official eval code), static twin, exported graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from support import HEADS, assert_static_matches_reference, official_dynamicvit, official_dynamicvit_keys, same_sets

from vitedge.backbone import ARCHS, dense_flops
from vitedge.check import check_model
from vitedge.errors import VitedgeError
from vitedge.families import get_family
from vitedge.families.dynamicvit import DynamicViT, kept_counts
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched

DYNAMICVIT = get_family("dynamicvit")


def plan_for(arch: str, **overrides):
    cfg = ARCHS[arch]
    return DYNAMICVIT.token_plan(cfg, DYNAMICVIT.resolve_settings(cfg, overrides))


def test_deit_small_plan_keeps_int_196_rho_s():
    plan = plan_for("deit_small")
    assert [s["kept_patches"] for s in plan.selections] == [137, 96, 67]
    assert [int(196 * 0.7**s) for s in (1, 2, 3)] == [137, 96, 67]
    assert [s["block"] for s in plan.selections] == [3, 6, 9]
    # Pruning happens before blocks 3, 6, 9: those blocks already run on the kept tokens.
    assert [b.attention for b in plan.blocks] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert all(b.attention == b.mlp for b in plan.blocks)
    assert plan.extra_flops > 0  # the score predictors


def test_deit_small_flops_match_the_paper():
    cfg = ARCHS["deit_small"]
    plan = plan_for("deit_small")
    assert plan.flops(cfg) / 2 == pytest.approx(2.9e9, rel=0.05)  # DynamicViT-S/0.7: 2.9 GFLOPs
    assert plan.flops(cfg) < dense_flops(cfg)


def test_fmnist_plan_and_keep_rate_one():
    assert [s["kept_patches"] for s in plan_for("vit_fmnist").selections] == [34, 24, 16]
    assert [s["kept_patches"] for s in plan_for("vit_fmnist", keep_rate=1.0).selections] == [49, 49, 49]
    assert kept_counts(196, 0.5, 3) == [98, 49, 24]


@pytest.mark.parametrize("overrides, message", [
    ({"keep_rate": [0.7, 0.7, 0.7]}, "one base keep rate"),
    ({"keep_rate": 0}, "keep rate must be in"),
    ({"keep_rate": 1.5}, "keep rate must be in"),
    ({"keep_rate": -1}, "keep rate must be in"),
    ({"fuse_token": True}, "has no setting fuse_token"),
    ({"prune_blocks": [3, 3, 9]}, "distinct"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(VitedgeError, match=message):
        DYNAMICVIT.resolve_settings(ARCHS["vit_fmnist"], overrides)


def test_parameter_names_are_the_official_ones():
    cfg = ARCHS["vit_fmnist"]
    model = DynamicViT(cfg, 0.7, [3, 6, 9])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_dynamicvit_keys(cfg)


@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 1.0])
def test_reference_matches_official_eval_code(dynamicvit_ckpt, dynamicvit_state, fmnist_batch, keep_rate):
    loaded = load_model(dynamicvit_ckpt, family="dynamicvit", num_heads=HEADS, settings={"keep_rate": keep_rate})
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(images)
    want_logits, want_kept = official_dynamicvit(dynamicvit_state, images, HEADS, keep_rate)
    assert torch.allclose(logits, want_logits, atol=1e-4)
    assert [k.shape[1] for k in kept] == kept_counts(49, keep_rate, 3)
    for ours, official in zip(kept, want_kept):
        assert same_sets(ours, official)
        assert (ours >= 0).all()  # dropped tokens are gone, nothing is fused


@pytest.mark.parametrize("settings", [
    {"keep_rate": 0.7},
    {"keep_rate": 0.5, "prune_blocks": [2, 4, 8]},
    {"keep_rate": 1.0},
])
def test_static_twin_equals_reference(dynamicvit_ckpt, fmnist_batch, settings):
    loaded, static, st_kept = assert_static_matches_reference(dynamicvit_ckpt, "dynamicvit", settings, fmnist_batch[0])
    for st, step in zip(st_kept, loaded.plan.selections):
        assert st.shape[1] == step["kept_patches"]
    # The static twin shares the reference's weights, it does not copy stale ones.
    assert torch.equal(static.score_predictor[0].out_conv[4].weight, loaded.model.score_predictor[0].out_conv[4].weight)


def test_keep_rate_one_keeps_every_patch(dynamicvit_ckpt, fmnist_batch):
    loaded = load_model(dynamicvit_ckpt, family="dynamicvit", num_heads=HEADS, settings={"keep_rate": 1.0})
    with torch.no_grad():
        _, kept = to_static(loaded.model, loaded.plan).forward_tokens(torch.from_numpy(fmnist_batch[0]))
    for positions in kept:
        assert (np.sort(positions.numpy(), axis=1) == np.arange(49)).all()


def test_exported_graph_is_static_with_the_plan_as_topk_constants(dynamicvit_artifact):
    proto = onnx.load(str(dynamicvit_artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    assert result.topk_k == [34, 24, 16]
    assert result.opset == 17  # from the recipe
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes == {"logits": [1, 10], "kept_tokens_3": [1, 34], "kept_tokens_6": [1, 24], "kept_tokens_9": [1, 16]}


def test_onnx_runtime_matches_the_reference(dynamicvit_artifact, dynamicvit_ckpt, fmnist_batch):
    loaded = load_model(dynamicvit_ckpt, family="dynamicvit", num_heads=HEADS)
    images = fmnist_batch[0][:16]
    outputs = run_batched(ort_session(dynamicvit_artifact / "model.onnx"), images)
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(torch.from_numpy(images))
    np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
    for ort_kept, ref_kept in zip(outputs[1:], kept):
        assert same_sets(ort_kept, ref_kept.numpy())
