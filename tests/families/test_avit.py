"""A-ViT: reference semantics (vs the official eval loop), masked and fixed-budget static forms,
calibration of budgets, exported graphs, and the bad-input contract."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from support import (
    FMNIST, HEADS, _embed, _head, _layer_norm, _linear, _mlp, assert_clean_failure, folder_listing, make_state_dict,
    quiet, read_json, run_cli, same_sets,
)

import vitedge
from vitedge.backbone import ARCHS, dense_flops
from vitedge.calibrate import read_calibration, with_settings
from vitedge.check import check_model
from vitedge.errors import VitedgeError
from vitedge.families import get_family
from vitedge.families.avit import HALTED_POSITION, budgets_from_counts, check_budgets, live_patch_counts, round_budget
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched

AVIT = get_family("avit")
# Random official-layout weights: channel 0 of the block outputs is spread enough that with
# these gates tokens halt anywhere from block 1 to the last (checked in test_gates_give_varied_halting).
GATES = {"gate_scale": 4.0, "gate_center": 2.0}
TOKENS = FMNIST.num_patches + 1  # 50


# --- An independent oracle: NVlabs/A-ViT ``forward_features_act_token`` at eval, written over the
# --- official state dict (plain timm keys) with no vitedge module involved.

def _official_masked_attention(sd, i, x, mask, heads):
    batch, tokens, dim = x.shape
    qkv = _linear(sd, f"blocks.{i}.attn.qkv", x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5
    attn = attn + mask.view(batch, 1, 1, tokens) * -1000.0
    out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return _linear(sd, f"blocks.{i}.attn.proj", out)


@torch.no_grad()
def official_avit(sd, images, heads, gate_scale, gate_center, patch=4, eps=0.01):
    """Logits, the tokens running in each block [B, N] (mask_token), and counter_token."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = _embed(sd, images, patch)
    bs, n = out.shape[:2]
    c_token, r_token, mask_token = torch.zeros(bs, n), torch.ones(bs, n), torch.ones(bs, n)
    counter_token = torch.ones(bs, n)
    output, running = None, []
    for i in range(depth):
        running.append(mask_token.bool())
        out = out * mask_token.view(bs, n, 1)
        m = (1.0 - mask_token).view(bs, n, 1)
        x = out
        x = x + _official_masked_attention(sd, i, _layer_norm(sd, f"blocks.{i}.norm1", x * (1 - m), 1e-6) * (1 - m),
                                           1.0 - mask_token, heads)
        x = x + _mlp(sd, i, _layer_norm(sd, f"blocks.{i}.norm2", x * (1 - m), 1e-6) * (1 - m))
        h_token = torch.sigmoid(x[:, :, 0] * gate_scale - gate_center)
        out = x.clone()
        block_output = x * mask_token.view(bs, n, 1)
        if i == depth - 1:
            h_token = torch.ones(bs, n)
        c_token = c_token + h_token
        reached = (c_token > 1 - eps).float() * mask_token
        delta1 = block_output * r_token.view(bs, n, 1) * reached.view(bs, n, 1)
        not_reached = (c_token < 1 - eps).float()
        r_token = r_token - not_reached * h_token
        delta2 = block_output * h_token.view(bs, n, 1) * not_reached.view(bs, n, 1)
        counter_token = counter_token + not_reached
        mask_token = (c_token < 1 - eps).float()
        output = delta1 + delta2 if output is None else output + delta1 + delta2
    return _head(sd, output), running, counter_token


@pytest.fixture(scope="module")
def avit_state():
    return make_state_dict("deit", seed=11)


@pytest.fixture(scope="module")
def avit_ckpt(tmp_path_factory, avit_state):
    """An A-ViT checkpoint as the official training saves it: ``{"model": state_dict}``, timm keys."""
    path = tmp_path_factory.mktemp("avit") / "avit_fmnist.pth"
    torch.save({"model": avit_state}, path)
    return path


@pytest.fixture(scope="module")
def loaded(avit_ckpt):
    return load_model(avit_ckpt, family="avit", num_heads=HEADS, settings=GATES)


@pytest.fixture(scope="module")
def live_counts(loaded):
    """Live patch tokens per block on 256 calibration (train) images."""
    from vitedge.data import InputSpec, load_dataset

    spec = InputSpec(FMNIST.img_size, FMNIST.in_chans, tuple(loaded.mean), tuple(loaded.std))
    return live_patch_counts(loaded.model, (b for b, _ in load_dataset("fashion-mnist", 256, split="train").batches(spec, 100)))


@pytest.fixture(scope="module")
def budgets_file(tmp_path_factory, avit_ckpt):
    path = tmp_path_factory.mktemp("budgets") / "avit-budgets.json"
    vitedge.calibrate(avit_ckpt, path, family="avit", num_heads=HEADS, settings=GATES, budget_quantile=0.9, limit=256, log=quiet)
    return path


def test_default_gates_are_the_released_models():
    assert AVIT.resolve_settings(ARCHS["deit_tiny"], {}) == {"gate_scale": 10.0, "gate_center": 30.0, "token_budgets": None}
    assert AVIT.resolve_settings(ARCHS["deit_small"], {})["gate_center"] == 75.0


def test_masked_plan_is_dense_and_reports_every_block():
    plan = AVIT.token_plan(ARCHS["deit_small"], AVIT.resolve_settings(ARCHS["deit_small"], {}))
    assert all(b.attention == b.mlp == 197 for b in plan.blocks)
    assert [s["block"] for s in plan.selections] == list(range(12))
    assert plan.flops(ARCHS["deit_small"]) == dense_flops(ARCHS["deit_small"])


def test_gates_give_varied_halting(live_counts):
    """Precondition of the tests below: tokens halt, at different blocks, and not all at once."""
    means = live_counts.mean(axis=0)
    assert means[0] == TOKENS - 1 and means[-1] < 0.8 * (TOKENS - 1)
    assert len(np.unique(live_counts[:, 6])) > 5  # live counts differ between images


def test_reference_matches_official_eval_loop(loaded, avit_state, fmnist_batch):
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits, running = loaded.model.forward_act(images)
        _, kept = loaded.model.forward_tokens(images)
    want_logits, want_running, counter = official_avit(avit_state, images, HEADS, **GATES)
    assert torch.allclose(logits, want_logits, atol=1e-4)
    assert (logits.argmax(1) == want_logits.argmax(1)).all()
    for ours, official, positions in zip(running, want_running, kept):
        assert torch.equal(ours, official)
        assert torch.equal(positions >= 0, official[:, 1:])
    # counter_token: blocks each token ran in (the mean depth the report gives)
    assert torch.equal(torch.stack(running).sum(0).float(), counter)


def test_masked_static_form_equals_reference(loaded, fmnist_batch):
    static = to_static(loaded.model, loaded.plan)
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        ref_logits, ref_kept = loaded.model.forward_tokens(images)
        st_logits, st_kept = static.forward_tokens(images)
    assert (st_logits - ref_logits).abs().max() <= 1e-5
    for ref, st in zip(ref_kept, st_kept):
        assert torch.equal(ref, st)  # same width, same live tokens, -1 for halted ones


def test_fixed_budget_is_exact_when_every_live_count_fits(loaded, live_counts, fmnist_batch):
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        ref_logits, running = loaded.model.forward_act(images)
        _, ref_kept = loaded.model.forward_tokens(images)
    live = torch.stack([r[:, 1:].sum(1) for r in running], dim=1).max(0).values.tolist()
    budgets = [min(TOKENS, 1 + n) for n in live]  # exactly the largest live count of this batch
    assert sum(budgets) < 0.8 * TOKENS * len(budgets)  # a real budget, not the masked form
    budgeted = with_settings(loaded, {"token_budgets": budgets})
    static = to_static(budgeted.model, budgeted.plan)
    with torch.no_grad():
        st_logits, st_kept = static.forward_tokens(images)
    assert (st_logits - ref_logits).abs().max() <= 1e-4
    for ref, st, budget in zip(ref_kept, st_kept, budgets):
        assert st.shape[1] == budget - 1
        padded = np.concatenate([st.numpy(), np.full((len(st), ref.shape[1] - st.shape[1]), HALTED_POSITION)], axis=1)
        assert same_sets(ref.numpy(), padded)


def test_budgets_round_up_to_multiples_of_8_and_never_grow(live_counts):
    budgets = budgets_from_counts(live_counts, 0.9, TOKENS)
    assert all(b % 8 == 0 or b == TOKENS for b in budgets)
    assert budgets == sorted(budgets, reverse=True)
    for block, budget in enumerate(budgets):  # at least 90 % of the images fit every block's budget
        assert (1 + live_counts[:, block] <= budget).mean() >= 0.9
    assert round_budget(41, 50) == 48 and round_budget(49, 50) == 50 and round_budget(1, 197) == 8
    assert budgets_from_counts(live_counts, 1.0, TOKENS) == [
        min(TOKENS, round_budget(1 + m, TOKENS)) for m in np.minimum.accumulate(live_counts.max(0))
    ]


def test_flops_target_picks_the_largest_quantile_within_it(loaded, live_counts):
    budgets, quantile = AVIT.choose_budgets(FMNIST, loaded.settings, live_counts, flops_ratio=0.7)
    ratio = with_settings(loaded, {"token_budgets": budgets}).plan.flops(loaded.cfg) / dense_flops(loaded.cfg)
    assert ratio <= 0.7 and 0 < quantile < 1
    higher = budgets_from_counts(live_counts, min(1.0, quantile + 0.02), TOKENS)
    assert with_settings(loaded, {"token_budgets": higher}).plan.flops(loaded.cfg) / dense_flops(loaded.cfg) > 0.7 or higher == budgets
    with pytest.raises(VitedgeError, match="below what any quantile reaches"):
        AVIT.choose_budgets(FMNIST, loaded.settings, live_counts, flops_ratio=0.01)


def test_calibration_file(budgets_file, avit_ckpt, loaded):
    content = read_json(budgets_file)
    assert content["kind"] == "vitedge-token-budgets" and content["family"] == "avit"
    assert content["quantile"] == 0.9 and content["data"] == {"source": "fashion-mnist", "split": "train", "images": 256}
    assert content["settings"] == GATES and content["arch"]["depth"] == 12
    halting = content["halting"]
    assert 1 < halting["mean_depth"] < 12 and len(halting["active_patches_mean"]) == 12
    assert read_calibration(budgets_file, loaded)["token_budgets"] == content["token_budgets"]
    assert content["flops"]["ratio"] < 1


@pytest.fixture(scope="module")
def masked_artifact(tmp_path_factory, avit_ckpt):
    out = tmp_path_factory.mktemp("avit-art") / "masked"
    vitedge.export(avit_ckpt, out, family="avit", num_heads=HEADS, settings=GATES, validate_limit=128, log=quiet)
    return out


@pytest.fixture(scope="module")
def budget_artifact(tmp_path_factory, avit_ckpt, budgets_file):
    out = tmp_path_factory.mktemp("avit-art") / "budget"
    vitedge.export(avit_ckpt, out, family="avit", num_heads=HEADS, settings=GATES, calibration=budgets_file,
                   validate_limit=256, log=quiet)
    return out


def test_masked_export_is_static_and_exact(masked_artifact):
    proto = onnx.load(str(masked_artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    assert result.topk_k == []  # masked: every block sees all 50 tokens
    report = read_json(masked_artifact / "report.json")["validate"]
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= 1e-4
    assert all(v == 1.0 for v in report["kept_agreement"].values())
    assert "budget_exceeded" not in report
    assert 1 < report["halting"]["mean_depth"] < 12


def test_budget_export_uses_constant_topk_and_reports_overflow(budget_artifact, budgets_file):
    budgets = read_json(budgets_file)["token_budgets"]
    meta = read_json(budget_artifact / "vitedge.json")
    assert meta["settings"]["token_budgets"] == budgets
    assert [b["attention"] for b in meta["token_budgets"]["tokens_per_block"]] == budgets
    assert meta["token_budgets"]["tokens_per_block"][-1]["mlp"] == 1  # the last block: class token only
    proto = onnx.load(str(budget_artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    shrinking = [b - 1 for prev, b in zip([TOKENS] + budgets, budgets) if b < prev]
    assert result.topk_k == shrinking and shrinking
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes == {"logits": [1, 10], **{f"kept_tokens_{i}": [1, b - 1] for i, b in enumerate(budgets)}}
    report = read_json(budget_artifact / "report.json")["validate"]
    assert report["passed"] and report["top1_agreement"] >= 0.99
    assert set(report["budget_exceeded"]) == {f"kept_tokens_{i}" for i, b in enumerate(budgets) if b < TOKENS}
    # q = 0.9 on train images: on test images too, most images fit each block
    assert all(rate <= 0.25 for rate in report["budget_exceeded"].values())
    assert max(report["budget_exceeded"].values()) > 0  # with q < 1 some image does not fit


def test_onnx_runtime_matches_the_static_budget_model(budget_artifact, avit_ckpt, budgets_file, fmnist_batch):
    loaded = load_model(avit_ckpt, family="avit", num_heads=HEADS, settings=GATES)
    budgeted = with_settings(loaded, {"token_budgets": read_calibration(budgets_file, loaded)["token_budgets"]})
    images = fmnist_batch[0][:16]
    outputs = run_batched(ort_session(budget_artifact / "model.onnx"), images)
    with torch.no_grad():
        logits, kept = to_static(budgeted.model, budgeted.plan).forward_tokens(torch.from_numpy(images))
    np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
    for ort_kept, torch_kept in zip(outputs[1:], kept):
        assert ort_kept.dtype == np.int32 and same_sets(ort_kept, torch_kept.numpy())


def test_cli_calibrate_then_export_with_budgets(tmp_path, avit_ckpt):
    """The CLI path: a recipe carries the gates (an official .pth has none), calibrate, export."""
    recipe = tmp_path / "avit.yaml"
    recipe.write_text(f"family: avit\nnum_heads: {HEADS}\nsettings:\n  gate_scale: 4.0\n  gate_center: 2.0\n"
                      "validation:\n  thresholds:\n    min_top1_agreement: 0.95\n    min_kept_agreement: 0.8\n")
    budgets = tmp_path / "budgets.json"
    result = run_cli("calibrate", avit_ckpt, "-o", budgets, "--recipe", recipe, "--limit", "128", "--quantile", "0.95")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quantile"] == 0.95 and summary["token_budgets"] == read_json(budgets)["token_budgets"]
    out = tmp_path / "cli"
    result = run_cli("export", avit_ckpt, "-o", out, "--recipe", recipe, "--budgets", budgets, "--validate-limit", "64")
    assert result.exit_code == 0, result.output
    assert read_json(out / "vitedge.json")["settings"]["token_budgets"] == summary["token_budgets"]
    result = run_cli("validate", out, "--limit", "64")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) >= {"budget_exceeded", "halting", "top1_agreement"}
    result = run_cli("inspect", out)
    assert result.exit_code == 0 and "mean depth" in result.stdout
    # Without the recipe the export uses other gates (the DeiT-Tiny defaults): the budgets do not apply.
    result = run_cli("export", avit_ckpt, "-o", tmp_path / "nogates", "--family", "avit", "--num-heads", HEADS,
                     "--budgets", budgets)
    assert "was calibrated with gate_scale 4, gate_center 2" in assert_clean_failure(result, tmp_path / "nogates")


def test_export_quantile_calibrates_in_place(tmp_path, avit_ckpt):
    out = tmp_path / "q"
    report = vitedge.export(avit_ckpt, out, family="avit", num_heads=HEADS, settings=GATES, budget_quantile=1.0,
                            validate_limit=64, log=quiet)
    assert report["validate"]["passed"]
    settings = read_json(out / "vitedge.json")["settings"]
    budgets = settings["token_budgets"]
    assert budgets[0] == TOKENS and budgets[-1] < TOKENS
    assert settings["budget_quantile"] == 1.0  # where the budgets came from


@pytest.mark.parametrize("quantile", ["0", "1.5", "-0.2", "nan"])
def test_quantile_outside_0_1_fails_cleanly(tmp_path, avit_ckpt, quantile):
    target = tmp_path / "budgets.json"
    result = run_cli("calibrate", avit_ckpt, "-o", target, "--family", "avit", "--num-heads", HEADS, "--quantile", quantile)
    quantile_must_be = re.compile(r"quantile'?:? must be")  # nan: the CLI's "'--quantile': must be a finite number"
    assert quantile_must_be.search(assert_clean_failure(result))
    assert not target.exists() and list(tmp_path.iterdir()) == []
    out = tmp_path / "out"
    result = run_cli("export", avit_ckpt, "-o", out, "--family", "avit", "--num-heads", HEADS, "--quantile", quantile)
    assert quantile_must_be.search(assert_clean_failure(result, out))


def test_budgets_for_another_depth_or_model_fail_cleanly(tmp_path, avit_ckpt, budgets_file):
    content = read_json(budgets_file)
    shallow = tmp_path / "shallow.json"
    shallow.write_text(json.dumps({**content, "arch": {**content["arch"], "depth": 6}, "token_budgets": [50] * 6}))
    other_ckpt = tmp_path / "other.pth"
    torch.save({"model": make_state_dict("deit", seed=12)}, other_ckpt)
    for ckpt, budgets, expected in [
        (avit_ckpt, shallow, "6 blocks"),
        (other_ckpt, budgets_file, "another checkpoint"),
        (avit_ckpt, tmp_path / "missing.json", "not found"),
    ]:
        out = tmp_path / f"out-{budgets.stem}-{ckpt.stem}"
        loaded = load_model(ckpt, family="avit", num_heads=HEADS, settings=GATES)
        with pytest.raises(VitedgeError, match=expected):
            read_calibration(budgets, loaded)["token_budgets"]
        before = folder_listing(tmp_path)
        result = run_cli("export", ckpt, "-o", out, "--family", "avit", "--num-heads", HEADS, "--budgets", budgets)
        assert_clean_failure(result, out)
        assert folder_listing(tmp_path) == before


def test_budgets_for_a_non_halting_family_fail_cleanly(tmp_path, avit_ckpt, budgets_file):
    out = tmp_path / "evit"
    result = run_cli("export", avit_ckpt, "-o", out, "--family", "evit", "--num-heads", HEADS, "--budgets", budgets_file)
    assert "family 'avit'" in assert_clean_failure(result, out)


def test_checkpoint_with_a_missing_block_fails_cleanly(tmp_path, avit_state):
    broken = {k: v for k, v in avit_state.items() if not k.startswith("blocks.5.")}
    path = tmp_path / "broken.pth"
    torch.save({"model": broken}, path)
    out = tmp_path / "out"
    result = run_cli("export", path, "-o", out, "--family", "avit", "--num-heads", HEADS)
    assert "block(s) 5 are missing" in assert_clean_failure(result, out)
    result = run_cli("calibrate", path, "-o", tmp_path / "b.json", "--family", "avit", "--num-heads", HEADS)
    assert "block(s) 5 are missing" in assert_clean_failure(result)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("budgets, expected", [
    ([50] * 11, "11 token budgets"),
    ([50, 40, 48] + [40] * 9, "grow"),
    ([50] * 11 + [0], "1..50"),
    ([60] * 12, "1..50"),
    ([50] * 11 + [8.5], "whole numbers"),
])
def test_bad_budget_settings(budgets, expected):
    with pytest.raises(VitedgeError, match=expected):
        check_budgets(budgets, FMNIST)


def test_bundled_model_halts_and_its_committed_budgets_export(tmp_path):
    """models/fmnist-avit.safetensors with calibration/fmnist-avit-budgets.json (both committed)."""
    from support import REPO

    model, budgets = REPO / "models" / "fmnist-avit.safetensors", REPO / "calibration" / "fmnist-avit-budgets.json"
    if not model.is_file() or not budgets.is_file():
        pytest.skip("train with 'python scripts/train_fmnist.py avit', then 'vitedge calibrate' it")
    content = read_json(budgets)
    assert content["halting"]["mean_depth"] < 10  # halting is not trivial: well below 12 blocks
    assert content["token_budgets"][-1] < TOKENS
    out = tmp_path / "bundled"
    result = run_cli("export", model, "-o", out, "--budgets", budgets, "--validate-limit", "512")
    assert result.exit_code == 0, result.output
    report = read_json(out / "report.json")["validate"]
    assert report["top1_agreement"] >= 0.99 and report["exported_accuracy"] > 0.75
    assert report["halting"]["mean_depth"] < 10


# --- vitedge tune: budget quantiles resolved on calibration images -----------------------------


def test_tune_hook_calibrates_each_candidate_with_its_own_gates(loaded):
    """``calibrate_candidates`` gives what ``vitedge calibrate`` would, for the gates each candidate has."""
    from vitedge.data import InputSpec, load_dataset

    spec = InputSpec(FMNIST.img_size, FMNIST.in_chans, tuple(loaded.mean), tuple(loaded.std))
    images = np.concatenate([b for b, _ in load_dataset("fashion-mnist", 256, split="train").batches(spec, 128)])
    later = {**GATES, "gate_center": 3.0}  # halts later: more live tokens per block
    grid = [AVIT.resolve_settings(FMNIST, {**loaded.settings, **s}) for s in
            ({"token_budgets": None}, {"budget_quantile": 0.9}, {**later, "budget_quantile": 0.9})]
    masked, same_gates, later_gates = AVIT.calibrate_candidates(loaded.model, FMNIST, grid, images)
    assert masked == grid[0]
    assert same_gates["budget_quantile"] == 0.9 and same_gates["gate_center"] == GATES["gate_center"]
    assert same_gates["token_budgets"] == AVIT.choose_budgets(FMNIST, loaded.settings, live_counts_of(loaded, images), 0.9)[0]
    other = load_model(loaded.checkpoint.path, family="avit", num_heads=HEADS, settings=later)
    assert later_gates["token_budgets"] == AVIT.choose_budgets(FMNIST, other.settings, live_counts_of(other, images), 0.9)[0]
    assert sum(later_gates["token_budgets"]) > sum(same_gates["token_budgets"])
    assert (loaded.model.gate_scale, loaded.model.gate_center) == tuple(GATES.values())  # the loaded model is untouched


def live_counts_of(loaded, images):
    from vitedge.families.avit import live_patch_counts

    return live_patch_counts(loaded.model, [images])


def test_budget_quantile_without_budgets_is_refused_at_load(avit_ckpt):
    settings = AVIT.resolve_settings(FMNIST, {**GATES, "budget_quantile": 0.9})
    assert settings["budget_quantile"] == 0.9 and settings["token_budgets"] is None
    with pytest.raises(VitedgeError, match=r"budget_quantile 0.9 becomes token budgets only on calibration images: "
                                           r"use 'vitedge export --quantile 0.9' or 'vitedge tune'"):
        load_model(avit_ckpt, family="avit", num_heads=HEADS, settings={**GATES, "budget_quantile": 0.9})
