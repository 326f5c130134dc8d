"""SuperViT: token plan, settings, reference semantics (vs the official eval code), static twin, exported graph."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from support import (
    HEADS,
    SUPERVIT_SIZES,
    _attention,
    _head,
    _layer_norm,
    _mlp,
    assert_clean_failure,
    assert_static_matches_reference,
    make_supervit_state,
    quiet,
    run_cli,
)

import vitedge
from vitedge.backbone import ARCHS, dense_flops
from vitedge.errors import VitedgeError
from vitedge.families import get_family
from vitedge.families.supervit import kept_count
from vitedge.load import load_model
from vitedge.runtime import ort_session, run_batched

SUPERVIT = get_family("supervit")
SIZES = SUPERVIT_SIZES


@torch.no_grad()
def official_supervit(sd, images, heads, img_size_list, img_size, keep_ratio, patch=4):
    """lmbxmu/SuperViT eval forward (``super_deit.VisionTransformer.forward``): logits and kept patch indices."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = F.interpolate(images, (img_size, img_size), mode="bilinear", align_corners=True)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[f"pos_embed_list.{list(img_size_list).index(img_size)}"]
    positions = torch.arange(x.shape[1] - 1).unsqueeze(0).expand(x.shape[0], -1)
    kept = []
    for i in range(depth):
        tmp, attn = _attention(sd, i, _layer_norm(sd, f"blocks.{i}.norm1", x, 1e-6), heads)
        x = x + tmp
        if i in (3, 6, 9) and not keep_ratio == 1:
            important = math.ceil(keep_ratio * x.shape[1])
            score = attn.mean(dim=1)[:, 0, 1:]
            index = torch.argsort(score, dim=1, descending=True)[:, :important]
            full_index = torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.long), index + 1], dim=1)
            x = torch.gather(x, 1, full_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            positions = torch.gather(positions, 1, index)
            kept.append(positions)
        x = x + _mlp(sd, i, _layer_norm(sd, f"blocks.{i}.norm2", x, 1e-6))
    return _head(sd, x), kept


@pytest.fixture(scope="module")
def supervit_state():
    return make_supervit_state()


@pytest.fixture(scope="module")
def supervit_ckpt(tmp_path_factory, supervit_state):
    """As the official main_deit.py saves it: ``{"model": state_dict, ...}`` in a .pth."""
    path = tmp_path_factory.mktemp("supervit") / "super_deit_fmnist.pth"
    torch.save({"model": supervit_state, "epoch": 299}, path)
    return path


def plan_for(arch: str, **overrides):
    cfg = ARCHS[arch]
    settings = SUPERVIT.resolve_settings(cfg, overrides)
    return SUPERVIT.token_plan(cfg, settings), settings


# ---------------------------------------------------------------- plan and settings


def test_deit_small_defaults_are_the_official_grid():
    _, settings = plan_for("deit_small")
    assert settings == {"resolution": 224, "resolutions": [128, 160, 192, 224], "keep_rate": 0.7,
                        "keep_rates": [0.5, 0.7, 1.0], "prune_blocks": [3, 6, 9]}
    assert plan_for("vit_fmnist")[1]["resolutions"] == list(SIZES)


def test_deit_small_plan_counts_the_class_token():
    """ceil(r * N) with N including the class token: 197 -> 139 -> 99 -> 71 at keep 0.7 (EViT: 140/100/72 with its fused token)."""
    plan, _ = plan_for("deit_small")
    assert [s["kept_patches"] for s in plan.selections] == [138, 98, 70]
    assert [s["tokens_after"] for s in plan.selections] == [139, 99, 71]
    assert [b.attention for b in plan.blocks] == [197] * 4 + [139] * 3 + [99] * 3 + [71] * 2
    assert [b.mlp for b in plan.blocks] == [197] * 3 + [139] * 3 + [99] * 3 + [71] * 3
    plan, _ = plan_for("deit_small", keep_rate=0.5)
    assert [s["tokens_after"] for s in plan.selections] == [100, 51, 27]
    plan, _ = plan_for("deit_small", resolution=128, keep_rate=0.7)
    assert plan.blocks[0].attention == 65 and [s["tokens_after"] for s in plan.selections] == [47, 34, 25]
    plan, _ = plan_for("deit_small", resolution=160, keep_rate=1)
    assert plan.selections == () and all(b.attention == b.mlp == 101 for b in plan.blocks)


def test_flops_count_the_patch_embedding_at_the_variant_size():
    cfg = ARCHS["deit_small"]
    full, _ = plan_for("deit_small", keep_rate=1)
    assert full.flops(cfg) == dense_flops(cfg)
    small, _ = plan_for("deit_small", resolution=128, keep_rate=1)
    assert small.flops(cfg) == dense_flops(cfg.with_img_size(128))
    assert small.flops(cfg) / dense_flops(cfg) == pytest.approx(0.31, abs=0.01)  # 65 vs 197 tokens


def test_kept_count_rounds_like_the_official_code():
    assert kept_count(0.7, 197) == math.ceil(0.7 * 197) == 138
    assert kept_count(0.5, 197) == 99
    assert kept_count(0.7, 70) == math.ceil(0.7 * 70) == 49  # 0.7 * 70 is 48.99999999999999 in float
    assert kept_count(0.7, 2) == 1  # never more than every patch token


@pytest.mark.parametrize("overrides, message", [
    ({"resolution": 176}, "input size 176 has no position embedding in this model; use one of 128, 160, 192, 224 px"),
    ({"resolution": [128, 160]}, "one resolution per variant"),
    ({"keep_rate": 0.6}, r"keep rate 0.6 is not one this model was trained for; use one of \(0.5, 0.7, 1.0\)"),
    ({"keep_rate": 1.5}, "keep rate must be in"),
    ({"keep_rate": [0.5, 0.7, 0.7]}, "one keep rate at every pruning block"),
    ({"resolutions": [128, 150]}, "not a positive multiple of the patch size 16"),
    ({"resolutions": [128, 128]}, "repeat a size"),
    ({"img_size": 160}, "has no setting img_size"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(VitedgeError, match=message):
        SUPERVIT.resolve_settings(ARCHS["deit_small"], overrides)


def test_trained_set_of_keep_rates_is_a_setting():
    _, settings = plan_for("deit_small", keep_rates=[0.6, 1], keep_rate=0.6)
    assert settings["keep_rates"] == [0.6, 1.0] and settings["keep_rate"] == 0.6


# ---------------------------------------------------------------- reference vs the official eval code


def test_official_checkpoint_loads_with_its_keys(supervit_ckpt, supervit_state):
    loaded = load_model(supervit_ckpt, family="supervit", num_heads=HEADS)
    assert loaded.cfg.img_size == 28  # the largest position table fixes the input size
    assert loaded.settings["resolutions"] == list(SIZES)
    state = loaded.model.state_dict()
    assert set(state) == set(supervit_state)
    for key, value in supervit_state.items():
        assert torch.equal(state[key], value)


def test_deit_small_official_checkpoint_loads_at_224(tmp_path):
    """The official super_deit_s layout: four tables (65/101/145/197 tokens); heads from 64 channels per head."""
    state = make_supervit_state(ARCHS["deit_small"], sizes=(128, 160, 192, 224), seed=3)
    torch.save({"model": state, "optimizer": {}, "epoch": 299}, tmp_path / "super_deit_s.pth")
    loaded = load_model(tmp_path / "super_deit_s.pth", family="supervit", settings={"resolution": 160, "keep_rate": 0.5})
    assert loaded.cfg == ARCHS["deit_small"]
    assert loaded.settings["resolutions"] == [128, 160, 192, 224]
    assert [s["tokens_after"] for s in loaded.plan.selections] == [52, 27, 15]  # 101 -> ceil(50.5)+1 -> ...


def test_same_size_resize_is_the_identity():
    """The official forward always interpolates; at the input's own size that changes nothing."""
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(F.interpolate(x, (28, 28), mode="bilinear", align_corners=True), x)


@pytest.mark.parametrize("size, rate", [(16, 0.5), (20, 0.7), (24, 1.0), (28, 0.7), (28, 0.5)])
def test_reference_matches_official_eval_code(supervit_ckpt, supervit_state, fmnist_batch, size, rate):
    loaded = load_model(supervit_ckpt, family="supervit", num_heads=HEADS, settings={"resolution": size, "keep_rate": rate})
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(images)
    want_logits, want_kept = official_supervit(supervit_state, images, HEADS, SIZES, size, rate)
    assert torch.allclose(logits, want_logits, atol=1e-5)
    assert len(kept) == len(want_kept) == len(loaded.plan.selections)
    for ours, official, step in zip(kept, want_kept, loaded.plan.selections):
        assert ours.shape[1] == step["kept_patches"]
        assert torch.equal(ours, official)  # same tokens, same (descending score) order


@pytest.mark.parametrize("size, rate", [(16, 0.5), (20, 0.7), (24, 1.0), (28, 0.5)])
def test_static_twin_equals_reference(supervit_ckpt, fmnist_batch, size, rate):
    loaded, static, st_kept = assert_static_matches_reference(
        supervit_ckpt, "supervit", {"resolution": size, "keep_rate": rate}, fmnist_batch[0]
    )
    assert [k.shape[1] for k in st_kept] == [s["kept_patches"] for s in loaded.plan.selections]


def test_keep_one_at_full_size_equals_dense_deit(supervit_state, fmnist_batch, tmp_path):
    """With the full-size table as ``pos_embed`` the same weights are a dense DeiT: keep rate 1 prunes nothing."""
    dense_state = {k: v for k, v in supervit_state.items() if not k.startswith("pos_embed_list.")}
    dense_state["pos_embed"] = supervit_state["pos_embed_list.3"]
    torch.save(dense_state, tmp_path / "dense.pth")
    torch.save(supervit_state, tmp_path / "super.pth")
    dense = load_model(tmp_path / "dense.pth", family="deit", num_heads=HEADS)
    sup = load_model(tmp_path / "super.pth", family="supervit", num_heads=HEADS, settings={"resolution": 28, "keep_rate": 1})
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        assert torch.allclose(sup.model(images), dense.model(images), atol=1e-6)


# ---------------------------------------------------------------- the exported variant


@pytest.fixture(scope="module")
def variant_artifact(tmp_path_factory, supervit_ckpt):
    """The official-layout checkpoint at 20 px, keep 0.7, exported through the CLI with a recipe."""
    recipe = tmp_path_factory.mktemp("recipes") / "supervit.yaml"
    recipe.write_text("family: supervit\nnum_heads: 2\nsettings:\n  resolution: 20\n  keep_rate: 0.7\n")
    out = tmp_path_factory.mktemp("artifacts") / "supervit"
    result = run_cli("export", supervit_ckpt, "-o", out, "--recipe", recipe, "--validate-limit", "128")
    assert result.exit_code == 0, result.output
    return out


def test_exported_variant_resizes_in_graph_with_constant_topk(variant_artifact):
    from vitedge.check import check_model

    proto = onnx.load(str(variant_artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    assert result.topk_k == [19, 14, 11]  # 26 tokens: ceil(.7*26)=19, ceil(.7*20)=14, ceil(.7*15)=11
    resize = [n for n in proto.graph.node if n.op_type == "Resize"]
    assert len(resize) == 1
    attrs = {a.name: (a.s.decode() if a.type == onnx.AttributeProto.STRING else a.i) for a in resize[0].attribute}
    assert attrs["mode"] == "linear" and attrs["coordinate_transformation_mode"] == "align_corners"
    assert attrs.get("antialias", 0) == 0
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes == {"logits": [1, 10], "kept_tokens_3": [1, 19], "kept_tokens_6": [1, 14], "kept_tokens_9": [1, 11]}
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 1, 28, 28]


def test_onnx_runtime_equals_the_reference(variant_artifact, supervit_ckpt, fmnist_batch):
    loaded = load_model(supervit_ckpt, family="supervit", num_heads=HEADS, settings={"resolution": 20, "keep_rate": 0.7})
    images = fmnist_batch[0]
    outputs = run_batched(ort_session(variant_artifact / "model.onnx"), images)
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(torch.from_numpy(images))
    assert np.abs(outputs[0] - logits.numpy()).max() <= 1e-4
    assert (outputs[0].argmax(1) == logits.numpy().argmax(1)).all()
    for ort_kept, ref_kept in zip(outputs[1:], kept):
        np.testing.assert_array_equal(ort_kept, ref_kept.numpy())


def test_full_size_keep_one_graph_has_no_resize_and_no_selection(supervit_ckpt, tmp_path):
    out = tmp_path / "full"
    vitedge.export(supervit_ckpt, out, family="supervit", num_heads=HEADS, keep_rate=1.0, validate_limit=32, log=quiet)
    ops = vitedge.inspect(out)["ops"]
    assert "Resize" not in ops and "TopK" not in ops
    assert vitedge.inspect(out)["outputs"] == ["logits"]


# ---------------------------------------------------------------- bad input


def test_another_familys_checkpoint_is_refused(evit_ckpt, supervit_ckpt, tmp_path):
    out = tmp_path / "out"
    result = run_cli("export", evit_ckpt, "-o", out, "--family", "supervit", "--num-heads", "2")
    line = assert_clean_failure(result, out)
    assert "is not a 'supervit' checkpoint" in line and "pos_embed_list.0" in line
    result = run_cli("export", supervit_ckpt, "-o", out, "--family", "evit", "--num-heads", "2")
    line = assert_clean_failure(result, out)
    assert "its keys look like family 'supervit'" in line


def test_untrained_size_or_keep_rate_is_one_line(supervit_ckpt, tmp_path):
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", supervit_ckpt, "-o", out, "--family", "supervit", "--num-heads", "2",
                                        "--keep-rate", "0.6"), out)
    assert "keep rate 0.6 is not one this model was trained for; use one of (0.5, 0.7, 1.0)" in line
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("family: supervit\nnum_heads: 2\nsettings:\n  resolution: 18\n")
    line = assert_clean_failure(run_cli("export", supervit_ckpt, "-o", out, "--recipe", recipe), out)
    assert "input size 18 has no position embedding in this model; use one of 16, 20, 24, 28 px" in line
