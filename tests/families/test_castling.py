"""Castling-ViT: linear-angular attention vs an independent formula, the linear-only rewrite, its
ONNX graph (no N x N tensor, checked by the quadratic lint), official-layout checkpoints with
training-only state, other input resolutions, and the bad inputs of the family."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from support import (
    FMNIST,
    HEADS,
    _embed,
    _head,
    _layer_norm,
    _linear,
    _mlp,
    assert_clean_failure,
    make_state_dict,
    official_vit_keys,
    quiet,
    read_json,
    run_cli,
)

import vitedge
from vitedge.backbone import ARCHS, ViTConfig, block_flops, dense_flops, resample_pos_embed, stem_head_flops
from vitedge.check import check_model
from vitedge.errors import VitedgeError
from vitedge.families import available_families, detect_family, get_family
from vitedge.families.castling import (LinAngularAttention, LinearOnlyAttention, linear_angular,
                                       linear_angular_inference, linear_block_flops, split_heads)
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched

CASTLING = get_family("castling")
KERNEL = 9
TOKENS = FMNIST.num_patches + 1  # 50 at 28 px


# --- checkpoints in the official layout: timm ViT keys with LinAngularAttention as ``attn``


def castling_keys(cfg: ViTConfig, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
    """timm ViT keys, ``attn`` = the official LinAngularAttention: qkv (bias optional), dconv, proj."""
    keys = official_vit_keys(cfg)
    for i in range(cfg.depth):
        if not qkv_bias:
            del keys[f"blocks.{i}.attn.qkv.bias"]
        keys[f"blocks.{i}.attn.dconv.weight"] = (cfg.num_heads, 1, KERNEL, 1)  # Conv2d(H, H, (9, 1), groups=H)
    return keys


def training_only_keys(cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """State a training run can leave under the masked-softmax branch's (parameter-free) matmul
    modules, e.g. a FLOP counter's per-module buffers: training-only, not weights."""
    return {
        f"blocks.{i}.attn.{module}.{name}": torch.zeros(1, dtype=torch.float64)
        for i in range(cfg.depth) for module in ("qk_matmul", "sv_matmul") for name in ("total_ops", "total_params")
    }


def castling_state(cfg: ViTConfig = FMNIST, seed: int = 11, qkv_bias: bool = False, extra: bool = True):
    base = make_state_dict("evit", cfg, seed)  # timm keys with the test suite's weight scales
    gen = torch.Generator().manual_seed(seed + 100)
    state = {}
    for key, shape in castling_keys(cfg, qkv_bias).items():
        state[key] = base[key] if key in base else (0.3 * torch.randn(shape, generator=gen)).contiguous()
    if extra:
        state.update(training_only_keys(cfg))
    return state


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return castling_state()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("castling") / "castling_fmnist.pth"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, ckpt):
    """Castling at 28 px through the pipeline (load, rewrite, export, lint, validation on 64 images)."""
    out = tmp_path_factory.mktemp("castling-artifacts") / "castling"
    vitedge.export(ckpt, out, family="castling", num_heads=HEADS, validate_limit=64, log=quiet)
    return out


@pytest.fixture(scope="module")
def deit_artifact(tmp_path_factory, evit_ckpt):
    """The softmax ViT with the same shape and token count (50), exported without validation."""
    out = tmp_path_factory.mktemp("castling-artifacts") / "deit"
    vitedge.export(evit_ckpt, out, family="deit", num_heads=HEADS, validate_data=None, log=quiet)
    return out


# --- an independent oracle, written from the paper / DESIGN.md over a state dict


def oracle_attention(sd, prefix, x, heads, branch=False, threshold=0.02):
    """Per head, with explicit loops: q̂(k̂ᵀv) computed as (q̂k̂ᵀ)v, the depthwise conv as 9 shifted sums."""
    batch, tokens, dim = x.shape
    d = dim // heads
    qkv = _linear(sd, prefix + ".qkv", x)
    outs = []
    for h in range(heads):
        q, k, v = (qkv[..., s * dim + h * d: s * dim + (h + 1) * d] for s in range(3))
        qn = q / torch.sqrt((q**2).sum(-1, keepdim=True))
        kn = k / torch.sqrt((k**2).sum(-1, keepdim=True))
        y = 0.5 * v + ((qn @ kn.transpose(1, 2)) @ v) / math.pi
        if branch:
            attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
            y = y + torch.where(attn > threshold, attn, torch.zeros_like(attn)) @ v
        y = y / torch.sqrt((y**2).sum(-1, keepdim=True))
        weight = sd[prefix + ".dconv.weight"][h, 0, :, 0]
        padded = F.pad(v, (0, 0, KERNEL // 2, KERNEL // 2))  # along tokens, class token first
        y = y + sum(weight[i] * padded[:, i:i + tokens] for i in range(KERNEL))
        outs.append(y)
    return _linear(sd, prefix + ".proj", torch.cat(outs, dim=-1))


@torch.no_grad()
def oracle_castling(sd, images, heads, patch=4):
    x = _embed(sd, images, patch)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        x = x + oracle_attention(sd, f"blocks.{i}.attn", _layer_norm(sd, f"blocks.{i}.norm1", x, 1e-6), heads)
        x = x + _mlp(sd, i, _layer_norm(sd, f"blocks.{i}.norm2", x, 1e-6))
    return _head(sd, x)


def attention_module(seed=0, qkv_bias=True):
    cfg = ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=1, num_heads=2,
                    qkv_bias=qkv_bias)
    torch.manual_seed(seed)
    attn = LinAngularAttention(cfg)
    with torch.no_grad():
        attn.qkv.weight.mul_(10)  # spread the softmax of the training-only branch around its threshold
        attn.dconv.weight.normal_(0, 0.3)
    sd = {f"a.{k}": v for k, v in attn.state_dict().items()}
    return attn, sd, torch.randn(3, TOKENS, 64)


# --- the family, its plan and its FLOPs


def test_castling_is_registered_and_detected(state, evit_state):
    assert "castling" in available_families()
    assert CASTLING.summary and CASTLING.paper and CASTLING.linear_attention
    assert detect_family(state) == "castling"
    assert detect_family(evit_state) is None


def test_plan_keeps_every_token_and_counts_linear_attention():
    cfg = ARCHS["deit_tiny"]
    plan = CASTLING.token_plan(cfg, CASTLING.resolve_settings(cfg, {}))
    assert [(b.attention, b.mlp) for b in plan.blocks] == [(197, 197)] * 12 and plan.selections == ()
    assert plan.to_dict()["tokens_per_block"] == [{"attention": 197, "mlp": 197}] * 12
    per_block = (plan.flops(cfg) - stem_head_flops(cfg)) // 12
    d, dh, hidden, n = 192, 64, 768, 197
    assert per_block == 2 * (4 * n * d * d + 2 * n * d * dh + KERNEL * n * d + 2 * n * d * hidden)
    assert per_block < block_flops(cfg, n)  # no 2·N²·C term
    # Linear in tokens: at 1024 px (4097 tokens) a block costs 4097/197 of a 224 px block, exactly.
    assert linear_block_flops(cfg, 4097, 4097) * 197 == linear_block_flops(cfg, 197, 197) * 4097
    big = cfg.with_img_size(1024)
    assert CASTLING.token_plan(big, {}).flops(big) < 0.5 * dense_flops(big)


def test_castling_takes_no_settings():
    with pytest.raises(VitedgeError, match="family 'castling' takes no settings"):
        CASTLING.resolve_settings(FMNIST, {"keep_rate": 0.7})


# --- attention semantics


def test_eval_attention_equals_the_formula():
    attn, sd, x = attention_module()
    attn.eval()
    with torch.no_grad():
        assert torch.allclose(attn(x), oracle_attention(sd, "a", x, 2), atol=1e-5)


def test_training_mode_adds_the_masked_softmax_branch():
    attn, sd, x = attention_module(seed=1, qkv_bias=False)
    attn.train()
    with torch.no_grad():
        train = attn(x)
        assert torch.allclose(train, oracle_attention(sd, "a", x, 2, branch=True), atol=1e-5)
        assert not torch.allclose(train, oracle_attention(sd, "a", x, 2), atol=1e-3)
        attn.sparse_reg = False  # the official module without the branch: the eval formula in training too
        assert torch.allclose(attn(x), oracle_attention(sd, "a", x, 2), atol=1e-5)


def test_the_branch_has_no_parameters_of_its_own():
    attn, _, _ = attention_module()
    assert sorted(attn.state_dict()) == ["dconv.weight", "proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]
    assert tuple(attn.dconv.weight.shape) == (2, 1, KERNEL, 1) and attn.dconv.padding == (4, 0)


def test_rewrite_is_linear_only_and_equals_the_eval_attention():
    attn, _, x = attention_module()
    attn.train()  # the rewrite serves inference: it drops the branch even from a module left in training mode
    static = to_static(torch.nn.Sequential(attn), CASTLING.token_plan(FMNIST, {}))[0]
    assert isinstance(static, LinearOnlyAttention)
    assert static.qkv is not attn.qkv  # a copy; the reference keeps its own parameters
    attn.eval()
    with torch.no_grad():
        assert torch.allclose(static(x), attn(x), atol=1e-6)


def test_the_doubled_inference_sum_normalises_to_the_same_bits():
    """2y = v + (2/π)·q̂(k̂ᵀv) in place of y = 0.5·v + (1/π)·q̂(k̂ᵀv): exact, so y/‖y‖ + dconv(v) is bit-identical."""
    attn, _, x = attention_module(seed=2)
    with torch.no_grad():
        q, k, v = split_heads(attn.qkv, x, attn.num_heads)
        official = linear_angular(q, k, v, attn.dconv)
        assert torch.equal(linear_angular_inference(q, k, v, attn.dconv), official)
        # the comparison is sharp enough to fail: a scale of 3 is the same in exact arithmetic, not in floats
        qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        tripled = 1.5 * v + (3.0 / math.pi) * (qn @ (kn.transpose(-2, -1) @ v))
        other = tripled / tripled.norm(dim=-1, keepdim=True) + attn.dconv(v)
        assert torch.allclose(other, official, atol=1e-6) and not torch.equal(other, official)


# --- whole models on real images


def test_official_checkpoint_loads_and_training_only_keys_are_dropped(ckpt, state, fmnist_batch):
    loaded = load_model(ckpt, family="castling", num_heads=HEADS)
    extra = sorted(training_only_keys(FMNIST))
    assert sorted(loaded.dropped_keys) == extra and len(extra) == 4 * FMNIST.depth
    assert not loaded.cfg.qkv_bias  # the official default, read off the weights
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits = loaded.model(images)
    weights = {k: v for k, v in state.items() if k not in extra}
    assert torch.allclose(logits, oracle_castling(weights, images, HEADS), atol=1e-4)


def test_checkpoint_with_qkv_bias_loads(tmp_path):
    path = tmp_path / "castling_bias.pth"
    torch.save(castling_state(seed=5, qkv_bias=True, extra=False), path)
    loaded = load_model(path, family="castling", num_heads=HEADS)
    assert loaded.cfg.qkv_bias and loaded.dropped_keys == []


def test_static_model_equals_the_reference_in_pytorch(ckpt, fmnist_batch):
    loaded = load_model(ckpt, family="castling", num_heads=HEADS)
    static = to_static(loaded.model, loaded.plan)
    assert not any(isinstance(m, LinAngularAttention) for m in static.modules())
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        ref, st = loaded.model(images), static(images)
    assert (ref.argmax(1) == st.argmax(1)).all()
    assert (ref - st).abs().max().item() <= 1e-5


def test_exported_graph_matches_the_reference_in_onnx_runtime(artifact, ckpt, fmnist_batch):
    loaded = load_model(ckpt, family="castling", num_heads=HEADS)
    images = fmnist_batch[0]
    (logits,) = run_batched(ort_session(artifact / "model.onnx"), images)
    with torch.no_grad():
        ref = loaded.model(torch.from_numpy(images)).numpy()
    assert len(images) == 64
    assert (logits.argmax(1) == ref.argmax(1)).all()
    assert np.abs(logits - ref).max() <= 1e-4
    report = read_json(artifact / "report.json")
    assert report["validate"]["passed"] and report["validate"]["top1_agreement"] == 1.0
    assert report["validate"]["max_abs_logit_diff"] <= 1e-4


def test_artifact_records_dropped_keys_flops_and_the_lint(artifact):
    meta = read_json(artifact / "vitedge.json")
    assert meta["family"] == "castling" and meta["outputs"] == ["logits"]
    assert sorted(meta["checkpoint"]["dropped_keys"]) == sorted(training_only_keys(FMNIST))
    assert meta["token_budgets"]["attention"].startswith("linear-angular")
    assert meta["flops"]["ratio"] < 1.0  # vs the softmax ViT of the same shape
    check = read_json(artifact / "report.json")["check"]
    assert check["passed"] and check["quadratic_tokens"] == TOKENS


def test_linear_only_graph_passes_the_quadratic_lint_and_softmax_fails_it(artifact, deit_artifact):
    linear = onnx.load(str(artifact / "model.onnx"))
    softmax = onnx.load(str(deit_artifact / "model.onnx"))
    assert "Softmax" not in {n.op_type for n in linear.graph.node}  # the training-only branch is gone
    result = check_model(linear, quadratic_tokens=TOKENS)
    assert result.passed, result.errors
    assert check_model(softmax).passed  # a fine graph, but quadratic:
    failed = check_model(softmax, quadratic_tokens=TOKENS)
    assert not failed.passed
    assert any(f"quadratic in the {TOKENS} tokens" in e for e in failed.errors)


def test_check_cli_applies_the_quadratic_rule_for_castling(artifact, deit_artifact, tmp_path):
    ok = run_cli("check", artifact)
    assert ok.exit_code == 0 and "check passed" in ok.stdout
    # A softmax graph that claims to be castling: `vitedge check` must catch the N x N maps.
    fake = tmp_path / "fake"
    shutil.copytree(deit_artifact, fake)
    meta = read_json(fake / "vitedge.json")
    (fake / "vitedge.json").write_text(json.dumps({**meta, "family": "castling"}))
    bad = run_cli("check", fake)
    assert bad.exit_code == 3
    assert f"quadratic in the {TOKENS} tokens" in bad.stdout and "check FAILED" in bad.stdout
    assert run_cli("check", deit_artifact).exit_code == 0  # no such rule for the softmax family


def test_export_at_a_non_native_resolution(ckpt, state, tmp_path):
    out = tmp_path / "castling56"
    report = vitedge.export(ckpt, out, family="castling", num_heads=HEADS, img_size=56, validate_limit=64, log=quiet)
    meta = read_json(out / "vitedge.json")
    assert meta["input"]["shape"] == [1, 1, 56, 56] and meta["arch"]["img_size"] == 56
    assert meta["token_budgets"]["tokens_per_block"][0] == {"attention": 197, "mlp": 197}
    assert report["check"]["passed"] and report["check"]["quadratic_tokens"] == 197
    assert report["validate"]["top1_agreement"] == 1.0 and report["validate"]["max_abs_logit_diff"] <= 1e-4
    assert check_model(onnx.load(str(out / "model.onnx")), quadratic_tokens=197).passed
    # timm's bicubic resampling of the 7 x 7 position grid to 14 x 14, class token untouched
    loaded = load_model(ckpt, family="castling", num_heads=HEADS, img_size=56)
    want = resample_pos_embed(state["pos_embed"], 14)
    assert torch.equal(loaded.model.pos_embed.data, want) and torch.equal(want[:, 0], state["pos_embed"][:, 0])


@pytest.fixture(scope="module")
def dynamic_artifact(tmp_path_factory, ckpt):
    """One linear-only graph for 16-40 px inputs (4-10 patches a side), optimum at 28 px."""
    out = tmp_path_factory.mktemp("castling-dynamic") / "castling"
    vitedge.export(ckpt, out, family="castling", num_heads=HEADS, dynamic_resolution="16:40", validate_limit=32,
                   log=quiet)
    return out


def test_dynamic_resolution_graph_is_checked_and_validated_at_min_opt_max(dynamic_artifact):
    meta = read_json(dynamic_artifact / "vitedge.json")
    assert meta["input"]["resolution"] == {"min": 16, "opt": 28, "max": 40}
    dims = onnx.load(str(dynamic_artifact / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [1, 1, "size", "size"]
    report = read_json(dynamic_artifact / "report.json")
    assert report["check"]["passed"] and report["check"]["sizes"] == [16, 28, 40]
    assert {k: report[k]["img_size"] for k in report if k.startswith("validate")} == {
        "validate_16px": 16, "validate": 28, "validate_40px": 40}
    for key in ("validate_16px", "validate", "validate_40px"):
        assert report[key]["passed"] and report[key]["top1_agreement"] == 1.0
        assert report[key]["max_abs_logit_diff"] <= 1e-4
    assert "dynamic resolution, checked at 16, 28, 40 px" in (dynamic_artifact / "report.md").read_text()


@pytest.mark.parametrize("size", [20, 28, 36])
def test_dynamic_resolution_graph_equals_the_reference_built_for_each_size(dynamic_artifact, ckpt, size):
    """In-graph bicubic resampling of the position table == timm-style resampling at load time."""
    images = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(size))
    reference = load_model(ckpt, family="castling", num_heads=HEADS, img_size=size).model
    with torch.inference_mode():
        want = reference(images).numpy()
    got = run_batched(ort_session(dynamic_artifact / "model.onnx", 1), images.numpy(), 1)[0]
    assert got.shape == (3, 10) and np.abs(got - want).max() <= 1e-4


def test_quadratic_lint_runs_at_every_size_of_the_range(dynamic_artifact):
    proto = onnx.load(str(dynamic_artifact / "model.onnx"))
    for size in (16, 40):
        tokens = (size // 4) ** 2 + 1
        assert check_model(proto, quadratic_tokens=tokens, input_size=size).passed
    without_size = check_model(proto, quadratic_tokens=TOKENS)
    assert without_size.errors == ["the image axes are symbolic (dynamic resolution); check at a concrete input size"]


def test_validate_and_profile_at_other_sizes(dynamic_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(dynamic_artifact, art)
    result = vitedge.validate(art, limit=16, img_size=24, threads=1)
    assert result["img_size"] == 24 and result["top1_agreement"] == 1.0
    assert "validate_24px" in read_json(art / "report.json")
    assert vitedge.profile(art, "ort", iterations=2, warmup=0, threads=1)["p50_ms"] > 0
    for size, message in [(44, "outside this graph's range 16-40 px"), (30, "not a multiple of the patch size 4")]:
        with pytest.raises(VitedgeError, match=message):
            vitedge.validate(art, limit=4, img_size=size)
    outside = run_cli("validate", art, "--img-size", "12", "--limit", "4")
    assert "outside this graph's range" in assert_clean_failure(outside)


def test_a_fixed_size_graph_validates_at_its_size_only(artifact):
    with pytest.raises(VitedgeError, match="this graph takes 28 px inputs only; export with --dynamic-resolution"):
        vitedge.validate(artifact, limit=4, img_size=32)


@pytest.mark.parametrize("family, value, message", [
    ("castling", "16:30", "must be multiples of the patch size 4 around the export size 28"),
    ("castling", "32:40", r"MIN <= 28 <= MAX"),
    ("castling", "big", "dynamic resolution must be MIN:MAX in pixels"),
    ("evit", "16:40", "family 'evit' fixes token counts in the graph"),
])
def test_dynamic_resolution_bad_input(family, value, message, ckpt, evit_ckpt, tmp_path):
    out = tmp_path / "out"
    source = ckpt if family == "castling" else evit_ckpt
    result = run_cli("export", source, "--family", family, "--num-heads", HEADS, "-o", out, "--dynamic-resolution", value)
    assert result.exit_code == 2
    assert message_in(message, assert_clean_failure(result, out))


def message_in(pattern: str, line: str) -> bool:
    import re

    return re.search(pattern, line) is not None


# --- bad input: one line, non-zero exit, nothing written


def test_wrong_head_count_is_one_clear_error(ckpt):
    with pytest.raises(VitedgeError, match=r"dconv\.weight has shape \(2, 1, 9, 1\), expected \(1, 1, 9, 1\)"):
        load_model(ckpt, family="castling")  # 64 channels per head by default: 1 head


@pytest.mark.parametrize("case", ["img-size", "softmax-as-castling", "castling-as-deit", "keep-rate"])
def test_cli_bad_input(case, ckpt, evit_ckpt, tmp_path):
    out = tmp_path / "out"
    args = {
        "img-size": ([ckpt, "--family", "castling", "--img-size", "30"], "not a positive multiple of the patch size 4"),
        "softmax-as-castling": ([evit_ckpt, "--family", "castling"], "is not a 'castling' checkpoint: missing 12 keys (e.g. blocks.0.attn.dconv.weight"),
        "castling-as-deit": ([ckpt, "--family", "deit"], "its keys look like family 'castling'"),
        "keep-rate": ([ckpt, "--family", "castling", "--keep-rate", "0.7"], "family 'castling' takes no settings"),
    }
    extra, message = args[case]
    result = run_cli("export", *extra, "--num-heads", HEADS, "-o", out)
    assert result.exit_code == 2
    assert message in assert_clean_failure(result, out)
