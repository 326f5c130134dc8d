"""ATS: settings and token plan, reference semantics (vs a transcription of the official eval code),
static twin (K masked slots), exported graph, the bundled model and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from support import (
    HEADS,
    _embed,
    _head,
    _layer_norm,
    _linear,
    assert_clean_failure,
    make_state_dict,
    REPO,
    quiet,
    read_json,
    run_cli,
    same_sets,
)

import vitedge
from vitedge.backbone import ARCHS
from vitedge.check import check_model
from vitedge.data import load_dataset
from vitedge.errors import VitedgeError
from vitedge.families import detect_family, get_family
from vitedge.families.ats import (MASKED, MASKED_KEY_BIAS, StaticATSBlock, attention_logits, duplicate_picks,
                                  sample_points, static_policy_softmax)
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched

ATS = get_family("ats")
FMNIST = ARCHS["vit_fmnist"]
BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fmnist-ats.safetensors"


# ---------------------------------------------------------------- the official eval code, transcribed


def _softmax_with_policy(attn, policy, eps=1e-6):
    batch, tokens, _ = policy.shape
    attn_policy = policy.reshape(batch, 1, 1, tokens)
    eye = torch.eye(tokens).view(1, 1, tokens, tokens)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    attn = (attn - attn.max(dim=-1, keepdim=True)[0]).exp() * attn_policy
    return (attn + eps / tokens) / (attn.sum(dim=-1, keepdim=True) + eps)


def _qkv(sd, i, x, heads):
    batch, tokens, dim = x.shape
    qkv = _linear(sd, f"blocks.{i}.attn.qkv", x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    return qkv


def _mlp_policy(sd, i, x, policy):
    x = x * policy
    hidden = F.gelu(_linear(sd, f"blocks.{i}.mlp.fc1", _layer_norm(sd, f"blocks.{i}.norm2", x, 1e-6)))
    return (x + _linear(sd, f"blocks.{i}.mlp.fc2", hidden)) * policy


def _official_block(sd, i, x, heads, policy):
    """transformer_block.Block.forward with a policy (ATS passes one to every block)."""
    batch, tokens, dim = x.shape
    q, k, v = _qkv(sd, i, _layer_norm(sd, f"blocks.{i}.norm1", x, 1e-6), heads)
    attn = _softmax_with_policy((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5, policy)
    x = x + _linear(sd, f"blocks.{i}.attn.proj", (attn @ v).transpose(1, 2).reshape(batch, tokens, dim))
    return _mlp_policy(sd, i, x, policy)


def _official_ats_block(sd, i, x, heads, policy, positions, n_tokens, n_ref_tokens):
    """ats_block.ATSBlock.forward / AdaptiveTokenSampler.forward, DROP_TOKENS True; also follows the positions."""
    batch, tokens, dim = x.shape
    n_tokens = min(n_tokens, tokens)
    raw_x = x
    qkv = _qkv(sd, i, _layer_norm(sd, f"blocks.{i}.norm1", x, 1e-6), heads)
    qkv = qkv * policy.unsqueeze(0).unsqueeze(2)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = _softmax_with_policy((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5, policy)
    # score_assignment_step
    v_norm = torch.linalg.norm(v.transpose(1, 2).reshape(batch, tokens, dim), ord=2, dim=2)
    score = (attn[:, :, 0].sum(dim=1) * v_norm)[:, 1:]
    score = score / score.sum(dim=1, keepdim=True)
    sorted_scores, sorted_indices = torch.sort(score, descending=False, dim=1)
    # inverse_transform_sampling
    cdf = torch.cumsum(sorted_scores, dim=1)
    normalized = (cdf - cdf.min(dim=1)[0].unsqueeze(1)) / ((cdf.max(dim=1)[0] - cdf.min(dim=1)[0]) / 1.0).unsqueeze(1)
    ys = torch.linspace(0, 1.0, n_ref_tokens - 1).unsqueeze(0).repeat(batch, 1)
    ys_start = torch.min(normalized + (normalized == 0).float() * 1e8, dim=1)[0].unsqueeze(-1).expand_as(ys)
    steps = torch.arange(0, n_ref_tokens - 1).float().unsqueeze(0).expand_as(ys_start)
    ys = (ys_start + ((ys * (n_ref_tokens - 2)) - ys_start * steps) / (n_ref_tokens - 2)).unsqueeze(2)
    diff = ys.shape[1] - (tokens - 1)
    expanded_ys = ys.expand(batch, ys.shape[1], ys.shape[1])
    pick = torch.min(torch.abs(expanded_ys - F.pad(normalized.unsqueeze(1), (diff, 0))), dim=2)[1] - diff
    attn_tmp = F.pad(torch.gather(attn[:, :, 1:], 2, sorted_indices[:, None, :, None].expand(batch, heads, tokens - 1, tokens)),
                     (0, 0, 0, 1), value=0.0)
    raw_tmp = F.pad(torch.gather(raw_x[:, 1:], 1, sorted_indices.unsqueeze(-1).expand(batch, tokens - 1, dim)),
                    (0, 0, 0, 1), value=0.0)
    pos_tmp = F.pad(torch.gather(positions, 1, sorted_indices), (0, 1), value=MASKED)
    # get_unique_indices
    sorted_pick = torch.sort(pick, dim=1)[0]
    shift_left = F.pad(sorted_pick[:, 1:], (0, 1), value=1.0)
    unique = torch.where(shift_left - sorted_pick == 0, (tokens - 1) * torch.ones_like(pick), sorted_pick)
    unique = torch.sort(unique, dim=1)[0][:, : tokens - 1]
    attn_tmp = torch.gather(attn_tmp, 2, unique[:, None, :, None].expand(batch, heads, n_tokens - 1, tokens))
    raw_tmp = torch.gather(raw_tmp, 1, unique.unsqueeze(2).expand(batch, n_tokens - 1, dim))
    attn = torch.cat([attn[:, :, 0:1], attn_tmp], dim=2)
    selected_x = torch.cat([raw_x[:, 0:1], raw_tmp], dim=1)
    positions = torch.gather(pos_tmp, 1, unique)
    policy = F.pad((unique != tokens - 1).unsqueeze(-1).float(), (0, 0, 1, 0), value=1.0)
    sampler = torch.nonzero(policy)
    x = (attn @ v).transpose(1, 2).reshape(batch, attn.shape[2], dim)
    # drop_tokens: compact to the largest live count of the batch (scatter-add onto zeros)
    out_size = int(policy.sum(1).max())
    sampler_out = sampler[:, 0] * out_size + sampler[:, 1]
    sampler_in = sampler[:, 0] * n_tokens + sampler[:, 1]
    zeros = torch.zeros(batch * out_size, dim)
    x = zeros.scatter_add(0, sampler_out.unsqueeze(-1).expand(-1, dim), x.reshape(-1, dim)[sampler_in])
    selected_x = zeros.scatter_add(0, sampler_out.unsqueeze(-1).expand(-1, dim), selected_x.reshape(-1, dim)[sampler_in])
    x, selected_x = x.reshape(batch, out_size, dim), selected_x.reshape(batch, out_size, dim)
    policy = zeros[:, 0].scatter_add(0, sampler_out, torch.ones(len(sampler_out))).reshape(batch, out_size, 1)
    positions = positions[:, : out_size - 1]
    x = _linear(sd, f"blocks.{i}.attn.proj", x) * policy
    x = (selected_x + x) * policy
    return _mlp_policy(sd, i, x, policy), policy, positions


@torch.no_grad()
def official_ats(sd, images, heads, ats_blocks=tuple(range(3, 12)), patch=4):
    """libs/models/transformers/vit.py ``forward_features`` + head at K = N (the official config)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = _embed(sd, images, patch)
    init_n = x.shape[1]
    policy = torch.ones(x.shape[0], init_n, 1)
    positions = torch.arange(init_n - 1).unsqueeze(0).expand(x.shape[0], -1)
    kept = []
    for i in range(depth):
        if i in ats_blocks:
            x, policy, positions = _official_ats_block(sd, i, x, heads, policy, positions, init_n, init_n)
            kept.append(positions)
        else:
            x = _official_block(sd, i, x, heads, policy)
    return _head(sd, x), kept


def official_ats_state(cfg=FMNIST, seed=4, ats_blocks=range(3, 12)) -> dict[str, torch.Tensor]:
    """DeiT keys plus the sampler's all-zero ``out_zero_mask`` [1, dim] in every ATS block."""
    state = make_state_dict("deit", cfg, seed=seed)
    for i in ats_blocks:
        state[f"blocks.{i}.attn.out_zero_mask"] = torch.zeros(1, cfg.embed_dim)
    return state


@pytest.fixture(scope="module")
def ats_state():
    return official_ats_state()


@pytest.fixture(scope="module")
def ats_ckpt(tmp_path_factory, ats_state) -> Path:
    """As libs/utils/checkpoint.py saves it: epoch, model_state, optimizer_state, cfg (YAML text)."""
    path = tmp_path_factory.mktemp("ats") / "checkpoint_epoch_00001.pyth"
    torch.save({"epoch": 0, "model_state": ats_state, "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "cfg": "VIT:\n  ATS_BLOCKS: [3, 4, 5, 6, 7, 8, 9, 10, 11]\n"}, path)
    return path


@pytest.fixture(scope="module")
def ats_artifact(tmp_path_factory, ats_ckpt) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "ats"
    vitedge.export(ats_ckpt, out, family="ats", num_heads=HEADS, validate_limit=128, log=quiet)
    return out


# ---------------------------------------------------------------- settings and plan


def plan_for(arch, **overrides):
    cfg = ARCHS[arch]
    settings = ATS.resolve_settings(cfg, overrides)
    return ATS.token_plan(cfg, settings), settings


def test_deit_small_default_is_the_official_setup():
    plan, settings = plan_for("deit_small")
    assert settings == {"prune_blocks": list(range(3, 12)), "num_tokens": [197] * 9}
    # K = 197 slots everywhere: the static graph runs dense shapes (plus the sampler).
    assert all(b.attention == b.mlp == 197 for b in plan.blocks)
    assert [s["kept_patches"] for s in plan.selections] == [196] * 9


def test_lower_and_per_block_budgets():
    plan, settings = plan_for("vit_fmnist", num_tokens=25)
    assert settings["num_tokens"] == [25] * 9
    assert [(b.attention, b.mlp) for b in plan.blocks][2:5] == [(50, 50), (50, 25), (25, 25)]
    plan, settings = plan_for("vit_fmnist", prune_blocks=[6, 3], num_tokens=[20, 40])
    assert settings == {"prune_blocks": [3, 6], "num_tokens": [40, 20]}
    assert [s["tokens_after"] for s in plan.selections] == [40, 20]
    # A budget above the live slot count keeps the slots (K - 1 points, at most slots - 1 unique).
    plan, _ = plan_for("vit_fmnist", prune_blocks=[3, 6], num_tokens=[20, 40])
    assert [s["tokens_after"] for s in plan.selections] == [20, 20]
    _, settings = plan_for("vit_fmnist", keep_rate=0.5)
    assert settings["num_tokens"] == [25] * 9


@pytest.mark.parametrize("overrides, message", [
    ({"num_tokens": 51}, "larger than the model's 50 tokens"),
    ({"num_tokens": 4}, "below the official minimum of 8"),
    ({"num_tokens": 20.5}, "whole number"),
    ({"num_tokens": [25, 25]}, "2 ATS token budgets given for 9 ATS blocks"),
    ({"prune_blocks": [3, 12]}, "prune blocks"),
    ({"keep_rate": 1.5}, "keep rate must be in"),
    ({"ratio": 0.5}, "has no setting ratio"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(VitedgeError, match=message):
        ATS.resolve_settings(FMNIST, overrides)


# ---------------------------------------------------------------- pieces of the mechanism


def test_duplicates_follow_the_official_shift_compare_including_its_last_pad():
    picks = torch.tensor([[1, 1, 2, 4, 4, 5]])
    assert duplicate_picks(picks).tolist() == [[True, False, False, True, False, False]]
    # The official pads the shifted picks with 1: a last pick at sorted position 1 counts as a duplicate.
    assert duplicate_picks(torch.tensor([[1, 1, 1]])).tolist() == [[True, True, True]]


def test_sample_points_run_from_the_smallest_nonzero_cdf_value_to_one():
    cdf = torch.tensor([[0.0, 0.2, 0.5, 1.0]])
    ys = sample_points(cdf, torch.where(cdf == 0, 1e8, cdf), 5)
    assert torch.allclose(ys, torch.tensor([[0.2, 0.4, 0.6, 0.8, 1.0]]))


# ---------------------------------------------------------------- reference vs official, static vs reference


def test_reference_matches_the_official_code_per_image(ats_ckpt, ats_state, fmnist_batch):
    loaded = load_model(ats_ckpt, family="ats", num_heads=HEADS)
    assert sorted(loaded.dropped_keys) == sorted(f"blocks.{i}.attn.out_zero_mask" for i in range(3, 12))
    images = torch.from_numpy(fmnist_batch[0][:24])
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(images)
    for n, image in enumerate(images.split(1)):
        want_logits, want_kept = official_ats(ats_state, image, HEADS)
        assert torch.allclose(logits[n : n + 1], want_logits, atol=1e-5)
        for ours, official in zip(kept, want_kept):
            ours = ours[n][ours[n] != MASKED]
            assert ours.tolist() == official[0].tolist()  # same tokens, same (ascending significance) order
    # The sampler does drop tokens: fewer and fewer unique ones per block.
    live = [float((k != MASKED).sum(1).float().mean()) for k in kept]
    assert live[0] < 49 and live[-1] < live[0]


def test_official_batches_change_an_images_result(ats_state, fmnist_batch):
    """Why vitedge's semantics are per image: the official code pads a batch to its largest count,
    and the padded tokens' zero scores move the CDF normalisation of the other images."""
    images = torch.from_numpy(fmnist_batch[0][:16])
    batched, _ = official_ats(ats_state, images, HEADS)
    alone = torch.cat([official_ats(ats_state, image, HEADS)[0] for image in images.split(1)])
    assert (batched - alone).abs().amax(dim=1).max() > 1e-3


@pytest.mark.parametrize("settings", [{}, {"num_tokens": 25}, {"num_tokens": [40, 30, 20], "prune_blocks": [2, 5, 8]},
                                      {"num_tokens": [12, 30], "prune_blocks": [4, 9]}])
def test_static_twin_equals_reference(ats_ckpt, fmnist_batch, settings):
    loaded = load_model(ats_ckpt, family="ats", num_heads=HEADS, settings=settings)
    static = to_static(loaded.model, loaded.plan)
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        ref_logits, ref_kept = loaded.model.forward_tokens(images)
        st_logits, st_kept = static.forward_tokens(images)
    assert (ref_logits - st_logits).abs().max() <= 1e-4
    assert (ref_logits.argmax(1) == st_logits.argmax(1)).all()
    for ref, st, step in zip(ref_kept, st_kept, loaded.plan.selections):
        assert st.shape == ref.shape == (len(images), step["kept_patches"])
        assert same_sets(ref, st)


def test_with_all_points_on_few_tokens_the_static_form_masks_what_the_reference_drops(ats_ckpt, fmnist_batch):
    """K = 8 keeps at most 7 of 49 patches, then the live count collapses below the budget:
    the reference shrinks, the static form masks slots, and both agree."""
    loaded = load_model(ats_ckpt, family="ats", num_heads=HEADS, settings={"num_tokens": 8})
    images = torch.from_numpy(fmnist_batch[0][:32])
    with torch.no_grad():
        ref_logits, ref_kept = loaded.model.forward_tokens(images)
        st_logits, st_kept = to_static(loaded.model, loaded.plan).forward_tokens(images)
    assert torch.allclose(ref_logits, st_logits, atol=1e-4)
    assert (st_kept[-1] == MASKED).any()
    for ref, st in zip(ref_kept, st_kept):
        assert same_sets(ref, st)


@pytest.mark.parametrize("settings", [{}, {"num_tokens": 8}])
def test_masked_slots_are_class_token_copies_whose_key_weight_is_bounded(ats_ckpt, fmnist_batch, settings):
    """A masked slot leaves its ATS block as a copy of the class token's row, so as a key in the next
    block its logit is the class token's + MASKED_KEY_BIAS: its weight is at most e^-32 of the class
    token's (what lets the bias be -32 instead of -1e4, whose exp is denormal in ONNX Runtime)."""
    loaded = load_model(ats_ckpt, family="ats", num_heads=HEADS, settings=settings)
    static = to_static(loaded.model, loaded.plan)
    seen = []
    blocks = list(static.blocks)
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: seen.append((i, out)))
             for i, block in enumerate(blocks) if isinstance(block, StaticATSBlock)]
    with torch.no_grad():
        static.forward_tokens(torch.from_numpy(fmnist_batch[0][:64]))
        masked_total = 0
        for i, (x, valid, _) in seen:
            masked = ~valid
            masked_total += int(masked.sum())
            copies = x.masked_select(masked[..., None]).reshape(-1, x.shape[2])
            rows = x[:, :1].expand_as(x).masked_select(masked[..., None]).reshape(-1, x.shape[2])
            assert torch.equal(copies, rows)
            if i + 1 < len(blocks):
                block = blocks[i + 1]
                logits, _ = attention_logits(block.attn, block.norm1(x))
                weights = static_policy_softmax(logits, valid)
                relative = (weights / weights[..., :1]).masked_select(masked[:, None, None, :])
                assert (relative <= np.exp(MASKED_KEY_BIAS) * (1 + 1e-4)).all()
    for hook in hooks:
        hook.remove()
    assert masked_total > 0  # the case is exercised: some slots were masked


# ---------------------------------------------------------------- exported graph


def test_exported_graph_passes_check_and_matches_in_onnx_runtime(ats_artifact, ats_ckpt, fmnist_batch):
    proto = onnx.load(str(ats_artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"NonZero", "Unique", "Loop", "If", "Scan", "Compress"}
    assert {"TopK", "ArgMin", "CumSum"} <= ops
    assert "Pow" not in ops  # ‖v‖ as v * v summed in v's own layout (static_significance)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes == {"logits": [1, 10], **{f"kept_tokens_{i}": [1, 49] for i in range(3, 12)}}
    report = vitedge.check(ats_artifact)
    assert report["passed"]
    validate = (ats_artifact / "report.json").read_text()
    assert '"top1_agreement": 1.0' in validate
    loaded = load_model(ats_ckpt, family="ats", num_heads=HEADS)
    images = fmnist_batch[0][:32]
    outputs = run_batched(ort_session(ats_artifact / "model.onnx"), images)
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(torch.from_numpy(images))
    np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
    for ort_kept, ref in zip(outputs[1:], kept):
        assert ort_kept.dtype == np.int32
        assert same_sets(ort_kept, ref.numpy())


def test_lower_budget_export_through_the_cli(ats_ckpt, tmp_path):
    out = tmp_path / "ats25"
    result = run_cli("export", ats_ckpt, "-o", out, "--family", "ats", "--num-heads", str(HEADS),
                     "--keep-rate", "0.5", "--validate-limit", "64")
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out / "model.onnx"))
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes["kept_tokens_3"] == [1, 24] and shapes["kept_tokens_11"] == [1, 24]
    assert check_model(proto).passed


# ---------------------------------------------------------------- bad input


def test_budget_above_the_token_count_is_one_line_and_writes_nothing(ats_ckpt, tmp_path):
    recipe = tmp_path / "ats.yaml"
    recipe.write_text("family: ats\nnum_heads: 2\nsettings:\n  num_tokens: 60\n")
    out = tmp_path / "out"
    message = assert_clean_failure(run_cli("export", ats_ckpt, "-o", out, "--recipe", recipe), out)
    assert "K=60 is larger than the model's 50 tokens" in message


def test_checkpoint_of_another_family_is_one_line(dynamicvit_ckpt, tmp_path):
    out = tmp_path / "out"
    message = assert_clean_failure(run_cli("export", dynamicvit_ckpt, "-o", out, "--family", "ats", "--num-heads", "2"), out)
    assert "is not a 'ats' checkpoint" in message and "dynamicvit" in message


def test_nonzero_out_zero_mask_is_refused(ats_state, tmp_path):
    state = dict(ats_state)
    state["blocks.3.attn.out_zero_mask"] = torch.ones(1, FMNIST.embed_dim)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(VitedgeError, match="out_zero_mask is not all zeros"):
        load_model(path, family="ats", num_heads=HEADS)


def test_plain_deit_checkpoint_loads_as_ats(evit_ckpt, fmnist_batch):
    """ATS has no parameters: a DeiT checkpoint without the buffers is an ATS model too."""
    loaded = load_model(evit_ckpt, family="ats", num_heads=HEADS, settings={"num_tokens": 30})
    assert loaded.dropped_keys == [] and loaded.settings["num_tokens"] == [30] * 9
    with torch.no_grad():
        _, kept = loaded.model.forward_tokens(torch.from_numpy(fmnist_batch[0][:4]))
    assert [k.shape for k in kept] == [(4, 29)] * 9


def test_ats_keys_are_recognised(ats_state, ats_ckpt):
    assert detect_family(ats_state) == "ats"
    with pytest.raises(VitedgeError, match="keys look like 'ats'"):
        load_model(ats_ckpt, num_heads=HEADS)


# ---------------------------------------------------------------- the bundled model


def test_bundled_model_exports_and_validates_with_its_settings(tmp_path, fmnist_spec):
    """models/fmnist-ats.safetensors (scripts/train_fmnist.py ats): K = 50 from its metadata, 512 real images.

    In PyTorch the static twin equals the reference exactly (same kept sets, logits to 1e-4). ONNX
    Runtime rounds differently, and where two tokens' significance is a few ulp apart the image
    keeps the other one (1 of these 512): the recipe's thresholds allow that, nothing more.
    """
    loaded = load_model(BUNDLED)
    assert loaded.family.name == "ats"
    assert loaded.settings == {"prune_blocks": list(range(3, 12)), "num_tokens": [50] * 9}
    images, labels = next(load_dataset("fashion-mnist", limit=512).batches(fmnist_spec, 512))
    with torch.no_grad():
        ref_logits, ref_kept = loaded.model.forward_tokens(torch.from_numpy(images))
        st_logits, st_kept = to_static(loaded.model, loaded.plan).forward_tokens(torch.from_numpy(images))
    assert (ref_logits - st_logits).abs().max() <= 1e-4
    assert all(same_sets(r, s) for r, s in zip(ref_kept, st_kept))
    out = tmp_path / "ats"
    result = run_cli("export", BUNDLED, "-o", out, "--recipe", REPO / "export_recipes" / "fmnist-ats.yaml",
                     "--validate-limit", "512")
    assert result.exit_code == 0, result.output
    report = read_json(out / "report.json")["validate"]
    assert report["passed"] and report["images"] == 512 and report["top1_agreement"] >= 0.998
    assert all(value >= 0.99 for value in report["kept_agreement"].values())
    assert report["exported_accuracy"] > 0.75  # trained: dense 81 %, ATS fine-tuned 79 %
