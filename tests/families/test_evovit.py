"""Evo-ViT: official-layout checkpoints (qks/vs/norms/projs, training-only head_cls/norm_cls),
the reference vs an independent transcription of the official eval forward, the static twin,
its ONNX graph in ONNX Runtime, the token plan, and the family's bad inputs."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from support import (
    FMNIST,
    HEADS,
    REPO,
    _embed,
    _layer_norm,
    _linear,
    assert_clean_failure,
    assert_static_matches_reference,
    make_state_dict,
    read_json,
    run_cli,
    same_sets,
)

from vitedge.backbone import ARCHS, ViTConfig, dense_flops
from vitedge.check import check_model
from vitedge.errors import VitedgeError
from vitedge.families import detect_family, get_family
from vitedge.families.evovit import StaticEvoViT
from vitedge.load import load_model, read_checkpoint
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched

EVOVIT = get_family("evovit")


# --- checkpoints in the official layout (YifanXu74/Evo-ViT, deit/evo_deit.py), written out by hand


def official_evovit_keys(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """``EvoVisionTransformer`` parameter names and shapes, head_cls/norm_cls included."""
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    keys = {
        "cls_token": (1, 1, d), "pos_embed": (1, cfg.num_patches + 1, d),
        "patch_embed.proj.weight": (d, cfg.in_chans, cfg.patch_size, cfg.patch_size), "patch_embed.proj.bias": (d,),
    }
    for i in range(cfg.depth):
        keys.update({
            f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (hidden, d), f"blocks.{i}.mlp.fc1.bias": (hidden,),
            f"blocks.{i}.mlp.fc2.weight": (d, hidden), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"qks.{i}.qk.weight": (2 * d, d), f"qks.{i}.qk.bias": (2 * d,),
            f"vs.{i}.v.weight": (d, d), f"vs.{i}.v.bias": (d,),
            f"norms.{i}.weight": (d,), f"norms.{i}.bias": (d,),
            f"projs.{i}.weight": (d, d), f"projs.{i}.bias": (d,),
        })
    keys.update({
        "norm.weight": (d,), "norm.bias": (d,), "head.weight": (cfg.num_classes, d), "head.bias": (cfg.num_classes,),
        "head_cls.weight": (cfg.num_classes, d), "head_cls.bias": (cfg.num_classes,),
        "norm_cls.weight": (d,), "norm_cls.bias": (d,),
    })
    return keys


def evovit_state(cfg: ViTConfig = FMNIST, seed: int = 21) -> dict[str, torch.Tensor]:
    """Random weights with the suite's scales (timm keys from ``make_state_dict``) moved to the official names."""
    base = make_state_dict("evit", cfg, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    state = {}
    for key, shape in official_evovit_keys(cfg).items():
        parts = key.split(".")
        if key.startswith("qks."):
            value = base[f"blocks.{parts[1]}.attn.qkv.{parts[-1]}"][: 2 * cfg.embed_dim]
        elif key.startswith("vs."):
            value = base[f"blocks.{parts[1]}.attn.qkv.{parts[-1]}"][2 * cfg.embed_dim :]
        elif key.startswith("norms."):
            value = base[f"blocks.{parts[1]}.norm1.{parts[-1]}"]
        elif key.startswith("projs."):
            value = base[f"blocks.{parts[1]}.attn.proj.{parts[-1]}"]
        elif key in base:
            value = base[key]
        else:  # head_cls / norm_cls
            value = 0.05 * torch.randn(shape, generator=gen)
        assert tuple(value.shape) == shape, key
        state[key] = value.contiguous()
    return state


# --- an independent oracle: the official eval forward, transcribed functionally over the state
# --- dict, in-place writes and views included (``x[:, 1:] = ...``, ``x = x_[:, :N_ + 1]``)


@torch.no_grad()
def official_evovit(sd, images, heads, patch=4, tradeoff=(1, 1, 1, 1) + (0.5,) * 8, stage_ratio=(0.5, 0.5)):
    """``EvoVisionTransformer.forward`` in eval mode (stage_wise_prune, prunecls=False): logits and
    the original patch indices of the slow tokens chosen at blocks 4 and 8."""

    def easy_gather(x, indices):
        batch, tokens = x.shape[:2]
        offset = torch.arange(batch).view(batch, 1) * tokens
        rows = x.reshape(batch * tokens, *x.shape[2:])[(indices + offset).view(-1)]
        return rows.reshape(batch, indices.shape[1], *x.shape[2:])

    x = _embed(sd, images, patch)
    positions = torch.arange(x.shape[1] - 1).unsqueeze(0).repeat(x.shape[0], 1)
    cls_attn, stage_index, kept, x_, n_keep = 0, -1, [], None, None
    for index in range(12):
        if index in (4, 8):
            stage_index += 1
            x_patch = x[:, 1:, :]
            batch, n, c = x_patch.shape
            n_keep = int(n * stage_ratio[stage_index])
            cls_attn, indices = torch.sort(cls_attn, dim=1, descending=True, stable=True)
            x_patch = easy_gather(x_patch, indices)
            positions = easy_gather(positions, indices)
            kept.append(positions[:, :n_keep].clone())
            x[:, 1:, :] = x_patch
            x_ = x
            x = x_[:, : n_keep + 1]
        tmp_x = x
        batch, n, c = x.shape
        x = _layer_norm(sd, f"norms.{index}", x, 1e-6)
        v = _linear(sd, f"vs.{index}.v", x).reshape(batch, n, 1, heads, c // heads).permute(2, 0, 3, 1, 4)[0]
        qk = _linear(sd, f"qks.{index}.qk", x).reshape(batch, n, 2, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((qk[0] @ qk[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        if index < 4:
            row = torch.sum(attn[:, :, 0, 1:], dim=1)
            cls_attn = row if index == 0 else (1 - tradeoff[index]) * cls_attn + tradeoff[index] * row
        else:
            row = torch.sum(attn[:, :, 0, 1:], dim=1)
            cls_attn[:, :n_keep] = (1 - tradeoff[index]) * cls_attn[:, :n_keep] + tradeoff[index] * row
        x = (attn @ v).transpose(1, 2).reshape(batch, n, c)
        x = _linear(sd, f"projs.{index}", x) + tmp_x
        hidden = F.gelu(_linear(sd, f"blocks.{index}.mlp.fc1", _layer_norm(sd, f"blocks.{index}.norm2", x, 1e-6)))
        x = x + _linear(sd, f"blocks.{index}.mlp.fc2", hidden)
        if index in (7, 11):
            x_[:, : n_keep + 1] = x
            x = x_
    pooled = _layer_norm(sd, "norm", x[:, 1:].mean(1), 1e-6)
    return _linear(sd, "head", pooled), kept


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return evovit_state()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, state):
    """As the official training script saves it: ``{"model": state_dict, ...}`` in a .pth."""
    path = tmp_path_factory.mktemp("evovit") / "evo_deit_fmnist.pth"
    torch.save({"model": state, "epoch": 299}, path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, ckpt):
    """The official checkpoint exported once through the CLI, static batch 8 (one export: they take seconds)."""
    out = tmp_path_factory.mktemp("artifacts") / "evovit"
    result = run_cli("export", ckpt, "-o", out, "--family", "evovit", "--num-heads", HEADS, "--keep-rate", "0.5",
                     "--batch-size", "8", "--validate-limit", "128")
    assert result.exit_code == 0, result.output
    return out


def plan_for(arch: str, **overrides):
    cfg = ARCHS[arch]
    settings = EVOVIT.resolve_settings(cfg, overrides)
    return EVOVIT.token_plan(cfg, settings), settings


def test_deit_small_plan_is_the_official_one():
    plan, settings = plan_for("deit_small")
    assert settings == {"keep_rate": [0.5, 0.5], "split_blocks": [4, 8], "tradeoff": [1.0] * 4 + [0.5] * 8}
    assert [(s["block"], s["kept_patches"], s["tokens_after"], s["placeholders"]) for s in plan.selections] == [
        (4, 98, 99, 98), (8, 98, 99, 98)
    ]
    assert [b.attention for b in plan.blocks] == [197] * 4 + [99] * 8
    assert [b.mlp for b in plan.blocks] == [197] * 4 + [99] * 8
    cfg = ARCHS["deit_small"]
    assert plan.flops(cfg) / 2 == pytest.approx(3.0e9, rel=0.02)  # published comparisons: Evo-ViT-S about 3.0 GFLOPs
    assert plan.flops(cfg) / dense_flops(cfg) == pytest.approx(0.660, abs=0.005)


def test_fmnist_plan_rounds_down_like_the_official_code():
    plan, _ = plan_for("vit_fmnist")
    assert [s["kept_patches"] for s in plan.selections] == [24, 24]  # int(49 * 0.5)
    assert [s["placeholders"] for s in plan.selections] == [25, 25]
    plan, settings = plan_for("vit_fmnist", keep_rate=[0.7, 0.3], tradeoff=0.25)
    assert [s["kept_patches"] for s in plan.selections] == [34, 14]
    assert settings["tradeoff"] == [1.0] * 4 + [0.25] * 8


@pytest.mark.parametrize("overrides, message", [
    ({"keep_rate": 0}, "keep rate must be in"),
    ({"keep_rate": 1.5}, "keep rate must be in"),
    ({"keep_rate": 0.01}, r"keeps int\(49 x 0.01\) = 0 patch tokens; use a rate >= 1/49"),
    ({"keep_rate": [0.5, 0.5, 0.5]}, "3 keep rates given for 2 pruning blocks"),
    ({"split_blocks": [0, 8]}, "first split block must be >= 1"),
    ({"split_blocks": [4, 12]}, "must be distinct block indices in 0..11"),
    ({"tradeoff": 1.5}, r"must be in \[0, 1\]"),
    ({"tradeoff": [0.5] * 3}, "give one per block"),
    ({"prune_ratio": 0.5}, "has no setting prune_ratio"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(VitedgeError, match=message):
        EVOVIT.resolve_settings(FMNIST, overrides)


def test_official_checkpoint_loads_and_training_only_keys_are_dropped(ckpt, state):
    loaded = load_model(ckpt, family="evovit", num_heads=HEADS)
    assert loaded.cfg == FMNIST  # shape inferred from the official keys (qkv = cat(qk, v))
    assert loaded.dropped_keys == ["head_cls.bias", "head_cls.weight", "norm_cls.bias", "norm_cls.weight"]
    ours = loaded.model.state_dict()
    assert set(ours) == set(state) - set(loaded.dropped_keys)
    assert all(torch.equal(ours[k], state[k]) for k in ours)
    assert detect_family(state) == "evovit"


def test_checkpoint_saved_after_remove_cls_loads_the_same(tmp_path, state, fmnist_batch):
    """The official ``remove_cls()`` deletes head_cls / norm_cls before saving: nothing to drop, same model."""
    path = tmp_path / "evo_removed_cls.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith(("head_cls.", "norm_cls."))}}, path)
    loaded = load_model(path, family="evovit", num_heads=HEADS)
    assert loaded.dropped_keys == []
    images = torch.from_numpy(fmnist_batch[0][:8])
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), official_evovit(state, images, HEADS)[0], atol=1e-5)


@pytest.mark.parametrize("settings, tradeoff, ratio", [
    ({}, (1, 1, 1, 1) + (0.5,) * 8, (0.5, 0.5)),
    ({"keep_rate": [0.7, 0.3], "tradeoff": [1, 0.8, 0.6, 0.9] + [0.25] * 8}, (1, 0.8, 0.6, 0.9) + (0.25,) * 8, (0.7, 0.3)),
])
def test_reference_matches_official_eval_code(ckpt, state, fmnist_batch, settings, tradeoff, ratio):
    loaded = load_model(ckpt, family="evovit", num_heads=HEADS, settings=settings)
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(images)
    want_logits, want_kept = official_evovit(state, images, HEADS, tradeoff=tradeoff, stage_ratio=ratio)
    assert torch.allclose(logits, want_logits, atol=1e-5)
    assert [k.shape[1] for k in kept] == [int(49 * r) for r in ratio]
    for ours, official in zip(kept, want_kept):
        assert torch.equal(ours, official)  # same tokens, same (sorted) order


def test_never_slow_tokens_keep_their_block_3_values_and_the_class_token_is_not_pooled(ckpt, fmnist_batch, monkeypatch):
    model = load_model(ckpt, family="evovit", num_heads=HEADS).model
    images = torch.from_numpy(fmnist_batch[0][:1])
    orders, sort = [], model.sort_tokens
    monkeypatch.setattr(model, "sort_tokens", lambda scores: orders.append(sort(scores)) or orders[-1])
    with torch.no_grad():
        x, kept = model.forward_features(images)
        block3 = model.embed(images)
        for i in range(4):
            block3 = model.blocks[i](model.attention(i, block3)[0])
        shifted = x.clone()
        shifted[:, 0] += 100.0
        assert torch.equal(model.classify(shifted), model.classify(x))
    final = torch.arange(49)
    for order in orders:  # original patch index at each output position, through both sorts
        final = final[order[0]]
    assert torch.equal(final[:24], kept[1][0])  # the stage-1 slow tokens lead the output
    never_slow = set(range(49)) - set(kept[0][0].tolist()) - set(kept[1][0].tolist())
    assert never_slow, "every token was slow at some stage; pick other weights"
    for slot, patch in enumerate(final.tolist()):
        same = torch.allclose(x[0, 1 + slot], block3[0, 1 + patch], atol=1e-6)
        assert same == (patch in never_slow), patch


def test_keep_rate_one_is_dense_attention_with_mean_pooling(ckpt, state, fmnist_batch):
    loaded = load_model(ckpt, family="evovit", num_heads=HEADS, settings={"keep_rate": 1.0})
    images = torch.from_numpy(fmnist_batch[0][:8])
    with torch.no_grad():
        logits, kept = to_static(loaded.model, loaded.plan).forward_tokens(images)
        x = _embed(state, images, 4)
        for i in range(12):
            h = _layer_norm(state, f"norms.{i}", x, 1e-6)
            qkv = torch.cat([_linear(state, f"qks.{i}.qk", h), _linear(state, f"vs.{i}.v", h)], dim=-1)
            q, k, v = qkv.reshape(8, 50, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(8, 50, -1)
            x = x + _linear(state, f"projs.{i}", out)
            hidden = F.gelu(_linear(state, f"blocks.{i}.mlp.fc1", _layer_norm(state, f"blocks.{i}.norm2", x, 1e-6)))
            x = x + _linear(state, f"blocks.{i}.mlp.fc2", hidden)
        dense = _linear(state, "head", _layer_norm(state, "norm", x[:, 1:].mean(1), 1e-6))
    assert torch.allclose(logits, dense, atol=1e-5)
    assert all(k.shape == (8, 49) for k in kept)


@pytest.mark.parametrize("settings", [
    {},
    {"keep_rate": [0.7, 0.3], "tradeoff": 0.25},
    {"split_blocks": [2, 5, 9], "keep_rate": 0.6},
])
def test_static_twin_equals_reference(ckpt, fmnist_batch, settings):
    loaded, static, st_kept = assert_static_matches_reference(ckpt, "evovit", settings, fmnist_batch[0])
    assert isinstance(static, StaticEvoViT)
    assert [k.shape[1] for k in st_kept] == [s["kept_patches"] for s in loaded.plan.selections]


def test_exported_graph_is_static_scatter_free_and_equals_the_reference(artifact, ckpt, fmnist_batch):
    proto = onnx.load(str(artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    assert result.topk_k == [49, 49]  # the sort: K = every patch, a constant
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"ScatterND", "ScatterElements", "NonZero", "If", "Loop"}
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes == {"logits": [8, 10], "kept_tokens_4": [8, 24], "kept_tokens_8": [8, 24]}
    report = read_json(artifact / "report.json")["validate"]
    assert report["passed"] and report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= 1e-4
    assert report["kept_agreement"] == {"kept_tokens_4": 1.0, "kept_tokens_8": 1.0}
    meta = read_json(artifact / "vitedge.json")
    assert meta["settings"] == {"keep_rate": [0.5, 0.5], "split_blocks": [4, 8], "tradeoff": [1.0] * 4 + [0.5] * 8}
    assert [s["kept_patches"] for s in meta["token_budgets"]["selections"]] == [24, 24]
    assert meta["checkpoint"]["dropped_keys"] == ["head_cls.bias", "head_cls.weight", "norm_cls.bias", "norm_cls.weight"]
    # ORT on a batch of real images vs the reference model, per image
    loaded = load_model(ckpt, family="evovit", num_heads=HEADS)
    images = fmnist_batch[0][:16]
    outputs = run_batched(ort_session(artifact / "model.onnx"), images)
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(torch.from_numpy(images))
    assert np.abs(outputs[0] - logits.numpy()).max() <= 1e-4
    assert (outputs[0].argmax(1) == logits.numpy().argmax(1)).all()
    for ort_kept, ref_kept in zip(outputs[1:], kept):
        assert same_sets(ort_kept, ref_kept.numpy())


def test_plain_deit_keys_given_as_evovit_fail_cleanly(tmp_path, evit_ckpt):
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", evit_ckpt, "-o", out, "--family", "evovit", "--num-heads", HEADS), out)
    assert "is not a 'evovit' checkpoint" in line and "missing" in line


def test_evovit_keys_given_as_evit_fail_cleanly(tmp_path, ckpt):
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", ckpt, "-o", out, "--family", "evit", "--num-heads", HEADS), out)
    assert "look like family 'evovit'" in line and "--family evovit" in line
    out2 = tmp_path / "out2"  # with the arch given, the shape check passes and the key check says it
    line = assert_clean_failure(run_cli("export", ckpt, "-o", out2, "--family", "evit", "--arch", "vit_fmnist"), out2)
    assert "look like family 'evovit'" in line


@pytest.mark.parametrize("rate, message", [("0.01", "= 0 patch tokens"), ("1.5", "keep rate must be in")])
def test_keep_rate_out_of_range_fails_cleanly(tmp_path, ckpt, rate, message):
    out = tmp_path / "out"
    line = assert_clean_failure(
        run_cli("export", ckpt, "-o", out, "--family", "evovit", "--num-heads", HEADS, "--keep-rate", rate), out
    )
    assert message in line


def test_missing_official_key_is_one_line(tmp_path, state):
    broken = {k: v for k, v in state.items() if not k.startswith("vs.3.")}
    path = tmp_path / "broken.pth"
    torch.save({"model": broken}, path)
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", path, "-o", out, "--family", "evovit", "--num-heads", HEADS), out)
    assert "missing 2 keys" in line and "vs.3.v" in line


def test_bundled_fmnist_model_is_in_our_layout_and_trained(fmnist_batch):
    path = REPO / "models" / "fmnist-evovit.safetensors"
    if not path.is_file():
        pytest.skip(f"{path.relative_to(REPO)} is missing; train it with 'python scripts/train_fmnist.py evovit'")
    checkpoint = read_checkpoint(path)
    assert checkpoint.metadata["family"] == "evovit" and checkpoint.metadata["test_accuracy"] > 0.75
    official = set(official_evovit_keys(FMNIST))
    assert set(checkpoint.state_dict) == official - {k for k in official if k.startswith(("head_cls.", "norm_cls."))}
    loaded = load_model(path)  # family, arch and settings from the checkpoint's metadata
    assert loaded.settings["split_blocks"] == [4, 8] and [s["kept_patches"] for s in loaded.plan.selections] == [24, 24]
    images, labels = (torch.from_numpy(a) for a in fmnist_batch)
    with torch.no_grad():
        logits, _ = loaded.model.forward_tokens(images)
        static_logits, _ = to_static(loaded.model, loaded.plan).forward_tokens(images)
    assert torch.equal(logits.argmax(1), static_logits.argmax(1))
    assert (logits.argmax(1) == labels).float().mean() > 0.7


# --- Evo-LeViT (levit/evo_levit.py, evo_levit_384.py): stage-wise selection on the LeViT backbone


def _levit_cfg(dims, key_dim, heads, depths, img):
    from support import evo_levit_keys

    from vitedge.backbones import infer_config

    keys = evo_levit_keys(dims=dims, key_dim=key_dim, heads=heads, depths=depths, img=img, in_chans=3, num_classes=1000)
    return infer_config({k: torch.empty(s, device="meta") for k, s in keys.items()})


@pytest.mark.parametrize("img, kept", [(224, (98, 24, 8)), (384, (288, 72, 18))])
def test_levit_plans_are_the_official_prune_ratio_lists(img, kept):
    """prune_ratio_list [[1, 1, 0.5, ...], [0.5, 0.5, 0.5]]: blocks 0-1 dense, every later block of a stage selected
    (EvoLeViT_128 has a StageModule in all three stages; 128S's first stage is blocks 0-1 only)."""
    cfg = _levit_cfg((128, 256, 384), 16, (4, 8, 12), (4, 4, 4), img)
    settings = EVOVIT.resolve_settings(cfg, {})
    assert settings == {"keep_rate": [0.5, 0.5, 0.5], "split_blocks": [2, 4, 8]}
    plan = EVOVIT.token_plan(cfg, settings)
    assert [s["kept_patches"] for s in plan.selections] == list(kept)
    grid = [g * g + 1 for g in cfg.stage_grids]
    assert [b.attention for b in plan.blocks] == [grid[0]] * 2 + [kept[0] + 2] * 2 + [kept[1] + 2] * 4 + [kept[2] + 2] * 4
    small = _levit_cfg((128, 256, 384), 16, (4, 6, 8), (2, 3, 4), img)
    assert EVOVIT.resolve_settings(small, {})["split_blocks"] == [2, 5]
    assert EVOVIT.token_plan(small, EVOVIT.resolve_settings(small, {})).flops(small) < dense_flops(small)


@pytest.mark.parametrize("overrides, message", [
    ({"split_blocks": [2, 3]}, "split blocks 2 and 3 are both in stage 1"),
    ({"tradeoff": 0.5}, "learns its EMA coefficient per attention"),
    ({"keep_rate": 0.01}, "at block 4 keeps int(49 x 0.01) = 0 of stage 2's 49 tokens"),
    ({"keep_rate": 1.0}, "keeps at least 1 and drops at least 1"),
    ({"split_blocks": [0, 4, 8]}, "the first split block must be >= 1"),
])
def test_levit_bad_settings(overrides, message):
    cfg = _levit_cfg((128, 256, 384), 16, (4, 8, 12), (4, 4, 4), 224)
    with pytest.raises(VitedgeError, match=re.escape(message)):
        EVOVIT.resolve_settings(cfg, overrides)


def test_levit_cli_bad_setting_is_one_line_and_writes_nothing(tmp_path):
    from support import evo_levit_state

    path = tmp_path / "levit.pth"
    torch.save({"model": evo_levit_state()}, path)
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", path, "-o", out, "--family", "evovit", "--num-heads", HEADS,
                                        "--set", "split_blocks=1,2"), out)
    assert "both in stage 1" in line


def test_levit_checkpoint_without_training_heads_or_twins_loads_the_same(tmp_path, fmnist_batch):
    """``remove_cls()`` drops head_cls*; a state dict of ``blocks.*`` alone is the same model."""
    from support import evo_levit_state

    state = evo_levit_state(seed=2)
    full, trimmed = tmp_path / "full.pth", tmp_path / "trimmed.pth"
    torch.save({"model": state}, full)
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith(("head_cls", "stage_blocks."))}}, trimmed)
    a = load_model(full, family="evovit", num_heads=HEADS)
    b = load_model(trimmed, family="evovit", num_heads=HEADS)
    assert sorted(a.dropped_keys) == sorted(k for k in state if k.startswith("head_cls"))
    images = F.interpolate(torch.from_numpy(fmnist_batch[0][:4]), (128, 128), mode="bilinear")
    with torch.no_grad():
        assert torch.equal(a.model(images), b.model(images))
    assert detect_family(state) == "evovit"  # stage_blocks.* is Evo-LeViT's alone


def test_levit_tuning_never_offers_a_rate_that_drops_nothing():
    cfg = _levit_cfg((128, 256, 384), 16, (4, 6, 8), (2, 3, 4), 224)
    rates = [c["keep_rate"] for c in EVOVIT.tuning_candidates(cfg, {})]
    assert 1.0 not in rates and rates
    for rate in rates:
        EVOVIT.resolve_settings(cfg, {"keep_rate": rate})
