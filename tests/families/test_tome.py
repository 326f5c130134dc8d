"""ToMe: merge schedule and token plan, reference semantics (vs the official eval code), static twin, exported graph."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from support import (
    HEADS,
    _embed,
    _head,
    _layer_norm,
    _linear,
    _mlp,
    assert_clean_failure,
    make_state_dict,
    read_json,
    run_cli,
)

from vitedge.backbone import ARCHS, dense_flops
from vitedge.check import check_model
from vitedge.errors import VitedgeError
from vitedge.export import export_onnx
from vitedge.families import get_family
from vitedge.families.tome import (
    StaticToMe,
    bipartite_soft_matching,
    merge_schedule,
    merge_weighted_average,
    static_merge,
)
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched
from vitedge.validate import kept_agreement

TOME = get_family("tome")
FMNIST = ARCHS["vit_fmnist"]


def plan_for(arch: str, **overrides):
    cfg = ARCHS[arch]
    settings = TOME.resolve_settings(cfg, overrides)
    return TOME.token_plan(cfg, settings), settings


# ---------------------------------------------------------------- an independent oracle

@torch.no_grad()
def official_tome(sd, images, heads, schedule, prop_attn=True, patch=4):
    """facebookresearch/ToMe's timm patch at eval (``ToMeBlock``/``ToMeAttention``, ``bipartite_soft_matching``,
    ``merge_wavg``, ``merge_source``), written functionally over an official state dict.

    Returns the logits and, per merging block, every patch's token index (argmax of ``source``).
    """
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = _embed(sd, images, patch)
    size = source = None
    assignments = []
    for i in range(depth):
        h = _layer_norm(sd, f"blocks.{i}.norm1", x, 1e-6)
        batch, tokens, dim = h.shape
        q, k, v = _linear(sd, f"blocks.{i}.attn.qkv", h).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + _linear(sd, f"blocks.{i}.attn.proj", out)
        r = min(schedule[i], (tokens - 1) // 2)
        if r > 0:
            metric = k.mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
            scores[:, 0, :] = -math.inf  # the class token is never merged
            node_max, node_idx = scores.max(dim=-1)
            edges = node_max.argsort(dim=-1, descending=True)[..., None]
            src, unm = edges[:, :r], edges[:, r:].sort(dim=1).values
            dst = node_idx[..., None].gather(1, src)

            def merge(t, mode):
                even, odd = t[:, ::2], t[:, 1::2]
                c = t.shape[-1]
                kept = even.gather(1, unm.expand(-1, -1, c))
                odd = odd.scatter_reduce(1, dst.expand(-1, -1, c), even.gather(1, src.expand(-1, -1, c)), reduce=mode)
                return torch.cat([kept, odd], dim=1)

            if source is None:
                source = torch.eye(tokens)[None].expand(batch, -1, -1)
            source = merge(source, "amax")
            weights = torch.ones_like(x[..., :1]) if size is None else size
            x, size = merge(x * weights, "sum"), merge(weights, "sum")
            x = x / size
            assignments.append(source[:, :, 1:].argmax(dim=1))
        x = x + _mlp(sd, i, _layer_norm(sd, f"blocks.{i}.norm2", x, 1e-6))
    return _head(sd, x), assignments


@pytest.fixture(scope="module")
def tome_state():
    return make_state_dict("evit", seed=11)  # ToMe checkpoints are plain timm / DeiT weights


@pytest.fixture(scope="module")
def tome_ckpt(tmp_path_factory, tome_state):
    """A DeiT checkpoint as the DeiT / timm training code saves it: ``{"model": state_dict}``."""
    path = tmp_path_factory.mktemp("tome") / "deit_fmnist.pth"
    torch.save({"model": tome_state}, path)
    return path


@pytest.fixture(scope="module")
def tome_export(tmp_path_factory, tome_ckpt):
    """ToMe r=3 exported through the CLI (static batch 1), validated on 128 images."""
    out = tmp_path_factory.mktemp("tome-artifact") / "tome"
    result = run_cli("export", tome_ckpt, "-o", out, "--family", "tome", "--num-heads", HEADS, "--merge-count", "3",
                     "--validate-limit", "128")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def tome_artifact(tome_export):
    return tome_export[0]


# ---------------------------------------------------------------- schedule and plan

def test_schedule_follows_parse_r():
    assert merge_schedule(12, 13) == [13] * 12
    assert merge_schedule(12, [4, 2]) == [4, 2] + [0] * 10  # a short list is padded with zeros
    # (r, -1): the paper's decreasing schedule, from 2r down to 0 in equal steps, truncated
    assert merge_schedule(12, 8, -1.0) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert merge_schedule(12, 8, 1.0) == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]


def test_deit_small_r13_plan_and_flops_match_the_paper():
    plan, settings = plan_for("deit_small")
    assert settings == {"merge_count": 13, "inflection": 0.0, "prop_attn": True}
    assert [b.attention for b in plan.blocks] == [197 - 13 * i for i in range(12)]
    assert [b.mlp for b in plan.blocks] == [197 - 13 * (i + 1) for i in range(12)]  # merged after attention
    assert [s["merged"] for s in plan.selections] == [13] * 12
    assert plan.selections[-1]["tokens_after"] == 41
    cfg = ARCHS["deit_small"]
    assert plan.flops(cfg) / 2 == pytest.approx(2.7e9, rel=0.02)  # ToMe ViT-S/16 r=13: 2.7 GFLOPs (MACs)
    assert 0 < plan.extra_flops < 0.01 * plan.flops(cfg)  # matching + assignment product: under 1 %
    assert plan.flops(cfg) / dense_flops(cfg) == pytest.approx(0.59, abs=0.01)


def test_r_is_clamped_to_half_the_patch_tokens_as_the_official_code():
    plan, _ = plan_for("vit_fmnist", merge_count=4)
    tokens = [b.attention for b in plan.blocks]
    assert tokens == [50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6]
    assert [s["merged"] for s in plan.selections] == [4] * 11 + [2]  # 6 tokens: at most (6 - 1) // 2
    assert plan.selections[-1]["requested"] == 4 and plan.selections[-1]["tokens_after"] == 4
    plan, _ = plan_for("vit_fmnist", merge_count=24)
    assert [s["tokens_after"] for s in plan.selections] == [26, 14, 8, 5, 3, 2]  # then nothing left to merge


def test_fmnist_default_is_the_paper_rate_scaled_and_zero_merges_nothing():
    plan, settings = plan_for("vit_fmnist")
    assert settings["merge_count"] == 3  # 13 * 49 / 196, rounded
    assert [b.attention for b in plan.blocks][-1] == 17 and plan.selections[-1]["tokens_after"] == 14
    plan, _ = plan_for("vit_fmnist", merge_count=0)
    assert plan.selections == () and all(b.attention == b.mlp == 50 for b in plan.blocks)


def test_decreasing_schedule_plan():
    plan, settings = plan_for("vit_fmnist", merge_count=3, inflection=-1)
    assert merge_schedule(12, 3, -1.0) == [6, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0]
    assert [s["block"] for s in plan.selections] == list(range(10))
    assert plan.selections[-1]["tokens_after"] == 50 - 31


@pytest.mark.parametrize("overrides, message", [
    ({"merge_count": 25}, r"merge at most 24 of the 49 patch tokens \(half\); use merge_count <= 24"),
    ({"merge_count": [0, 30]}, "use merge_count <= 24"),
    ({"merge_count": 13, "inflection": -1}, "asks to merge 26 tokens in one block"),
    ({"merge_count": -1}, "merge_count must be >= 0, got -1"),
    ({"merge_count": 2.5}, "must be a whole number"),
    ({"merge_count": "many"}, "must be a whole number"),
    ({"merge_count": True}, "must be a whole number"),
    ({"merge_count": [1] * 13}, "merge_count lists 13 blocks; this model has 12"),
    ({"inflection": 2}, r"inflection must be in \[-1, 1\], got 2"),
    ({"merge_count": [1, 2], "inflection": -1}, "not to a list"),
    ({"prop_attn": "yes"}, "prop_attn must be true or false"),
    ({"keep_rate": 0.7}, "family 'tome' has no setting keep_rate"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(VitedgeError, match=message):
        TOME.resolve_settings(FMNIST, overrides)


# ---------------------------------------------------------------- the mechanism

def test_matching_merges_the_most_similar_pairs_and_protects_the_class_token():
    # tokens 0..5: a = 0, 2, 4 (0 is the class token), b = 1, 3, 5
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.1], [0.0, 1.0]]])
    matching = bipartite_soft_matching(metric, 1)
    # token 2 equals token 5 (cosine 1) and beats token 4 (cosine 0.995 to token 1); the class
    # token would be a perfect match for token 1 but is protected
    assert matching.merged.tolist() == [[1]] and matching.destination.tolist() == [[2]]
    assert matching.unmerged.tolist() == [[0, 2]]
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0], [1.0]]])
    merged, new_size = merge_weighted_average(x, size, matching)
    # [class, token 4, b: 1, 3, (5 * 1 + 2 * 3) / 4]
    assert merged.flatten().tolist() == [0.0, 4.0, 1.0, 3.0, 11.0 / 4.0]
    assert new_size.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 4.0]
    static_x, static_size, destination = static_merge(x, size, metric, 1)
    assert torch.equal(static_x, merged) and torch.equal(static_size, new_size)
    assert destination.tolist() == [[0, 2, 4, 3, 1, 4]]  # the new index of every input token


@pytest.mark.parametrize("tokens, r", [(50, 3), (49, 24), (50, 24), (17, 8), (7, 1)])
def test_static_merge_equals_the_reference_merge(tokens, r):
    gen = torch.Generator().manual_seed(tokens + r)
    x = torch.randn(3, tokens, 8, generator=gen)
    metric = torch.randn(3, tokens, 4, generator=gen)
    size = torch.randint(1, 5, (3, tokens, 1), generator=gen).float()
    matching = bipartite_soft_matching(metric, r)
    want_x, want_size = merge_weighted_average(x, size, matching)
    for merge_with in ("matmul", "scatter"):
        got_x, got_size, destination = static_merge(x, size, metric, r, merge_with)
        assert torch.allclose(got_x, want_x, atol=1e-6) and torch.equal(got_size, want_size)
    # every token lands where the reference puts it: check by moving a one-hot of each token
    source = torch.eye(tokens).expand(3, -1, -1)
    from vitedge.families.tome import merge_source

    moved = merge_source(source, matching)  # [B, tokens after, tokens]
    assert torch.equal(moved.argmax(dim=1), destination)


# ---------------------------------------------------------------- reference vs the official code

@pytest.mark.parametrize("settings", [
    {"merge_count": 3},
    {"merge_count": 4},  # clamped in the last block
    {"merge_count": 3, "prop_attn": False},
    {"merge_count": [0, 8, 0, 5, 24]},
    {"merge_count": 3, "inflection": -1},
])
def test_reference_matches_official_eval_code(tome_ckpt, tome_state, fmnist_batch, settings):
    loaded = load_model(tome_ckpt, family="tome", num_heads=HEADS, settings=settings)
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        logits, assignments = loaded.model.forward_tokens(images)
        eager = loaded.model(images)  # logits only, SDPA attention, no source tracing
    schedule = merge_schedule(12, loaded.settings["merge_count"], loaded.settings["inflection"])
    want_logits, want_assignments = official_tome(tome_state, images, HEADS, schedule, loaded.settings["prop_attn"])
    assert torch.allclose(logits, want_logits, atol=1e-4)
    assert torch.allclose(eager, want_logits, atol=1e-4)
    assert len(assignments) == len(want_assignments) == len(loaded.plan.selections)
    for ours, official, step in zip(assignments, want_assignments, loaded.plan.selections):
        assert torch.equal(ours, official)
        assert int(ours.max()) == step["tokens_after"] - 1 and int(ours.min()) >= 1


@pytest.mark.parametrize("settings", [
    {"merge_count": 3},
    {"merge_count": 4},
    {"merge_count": 3, "prop_attn": False},
    {"merge_count": [0, 8, 0, 5, 24]},
    {"merge_count": 3, "inflection": -1},
    {"merge_count": 0},
])
def test_static_twin_equals_reference(tome_ckpt, fmnist_batch, settings):
    loaded = load_model(tome_ckpt, family="tome", num_heads=HEADS, settings=settings)
    static = to_static(loaded.model, loaded.plan)
    assert isinstance(static, StaticToMe)
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        ref_logits, ref_assign = loaded.model.forward_tokens(images)
        st_logits, st_assign = static.forward_tokens(images)
    assert (ref_logits.argmax(1) == st_logits.argmax(1)).all()
    assert (ref_logits - st_logits).abs().max() <= 1e-4
    assert len(st_assign) == len(loaded.plan.selections)
    for ref, st in zip(ref_assign, st_assign):
        assert torch.equal(ref, st)


def test_merge_count_zero_equals_dense_deit(tome_ckpt, fmnist_batch):
    tome = load_model(tome_ckpt, family="tome", num_heads=HEADS, settings={"merge_count": 0})
    dense = load_model(tome_ckpt, family="deit", num_heads=HEADS)
    images = torch.from_numpy(fmnist_batch[0])
    with torch.no_grad():
        assert torch.allclose(tome.model(images), dense.model(images), atol=1e-5)


# ---------------------------------------------------------------- the exported graph

def test_exported_graph_is_static_and_merges_by_matmul(tome_artifact):
    proto = onnx.load(str(tome_artifact / "model.onnx"))
    result = check_model(proto)
    assert result.passed, result.errors
    # per block: TopK 1 (best matches), TopK r (merged tokens), TopK n_a - r (unmerged, in order)
    assert sorted(result.topk_k) == sorted([1] * 12 + [3] * 12 + [(50 - 3 * i - 1) // 2 - 3 for i in range(12)])
    for node in proto.graph.node:
        if node.op_type in ("ScatterElements", "ScatterND"):
            assert all(a.name != "reduction" or a.s == b"none" for a in node.attribute)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert shapes == {"logits": [1, 10], **{f"assignment_{i}": [1, 49] for i in range(12)}}
    meta = read_json(tome_artifact / "vitedge.json")
    assert meta["outputs"] == ["logits", *[f"assignment_{i}" for i in range(12)]]
    assert [b["attention"] for b in meta["token_budgets"]["tokens_per_block"]] == [50 - 3 * i for i in range(12)]


def test_validation_compares_assignments_element_wise(tome_artifact):
    report = read_json(tome_artifact / "report.json")["validate"]
    assert report["passed"] and report["images"] == 128
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= 1e-4
    assert report["kept_agreement"] == {f"assignment_{i}": 1.0 for i in range(12)}
    # a permutation of the same values is a different assignment (sets would call it equal)
    row = np.array([[1, 2, 2, 3]])
    assert kept_agreement(row, row[:, ::-1]).all() and not kept_agreement(row, row[:, ::-1], ordered=True).any()


def test_onnx_runtime_matches_the_static_model(tome_artifact, tome_ckpt, fmnist_batch):
    loaded = load_model(tome_ckpt, family="tome", num_heads=HEADS, settings={"merge_count": 3})
    images = fmnist_batch[0][:16]
    outputs = run_batched(ort_session(tome_artifact / "model.onnx"), images)
    with torch.no_grad():
        logits, assignments = to_static(loaded.model, loaded.plan).forward_tokens(torch.from_numpy(images))
    np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
    for ort_assign, torch_assign in zip(outputs[1:], assignments):
        assert ort_assign.dtype == np.int32
        np.testing.assert_array_equal(ort_assign, torch_assign.numpy())


def test_scatter_variant_runs_but_fails_the_tensorrt_lint(fmnist_batch, tmp_path):
    """The official op (ScatterElements with reduction add) gives the same numbers; the lint says why vitedge avoids it.

    A 3-block model keeps the two exports quick.
    """
    from dataclasses import replace

    cfg = replace(FMNIST, depth=3)
    settings = TOME.resolve_settings(cfg, {"merge_count": 8})
    plan = TOME.token_plan(cfg, settings)
    torch.manual_seed(0)
    reference = TOME.reference(cfg, settings).eval()
    images = fmnist_batch[0][:8]
    with torch.no_grad():
        logits, assignments = reference.forward_tokens(torch.from_numpy(images))
    for merge_with, passes in (("matmul", True), ("scatter", False)):
        static = to_static(reference, plan)
        static.merge_with = merge_with
        proto = export_onnx(static, cfg, plan, tmp_path / f"{merge_with}.onnx", batch_size=8)
        result = check_model(proto)
        assert result.passed is passes, result.errors
        reductions = [n for n in proto.graph.node if n.op_type == "ScatterElements" and any(a.name == "reduction" and a.s == b"add" for a in n.attribute)]
        assert len(reductions) == (0 if passes else 3)
        outputs = run_batched(ort_session(tmp_path / f"{merge_with}.onnx"), images)
        np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
        for ort_assign, ref_assign in zip(outputs[1:], assignments):
            np.testing.assert_array_equal(ort_assign, ref_assign.numpy())


# ---------------------------------------------------------------- command line and bad input

def test_cli_export_with_merge_count(tome_export):
    out, result = tome_export
    meta = read_json(out / "vitedge.json")
    assert meta["family"] == "tome" and meta["settings"] == {"merge_count": 3, "inflection": 0.0, "prop_attn": True}
    assert meta["token_budgets"]["selections"][-1]["tokens_after"] == 14
    summary = json.loads(result.stdout)
    assert summary["check"] is True and summary["kept_agreement"]["assignment_11"] == 1.0
    inspect = run_cli("inspect", out)
    assert inspect.exit_code == 0 and "block 11:" in inspect.stdout


@pytest.mark.parametrize("args, message", [
    (["--merge-count", "25"], "use merge_count <= 24"),
    (["--merge-count", "-2"], "merge_count must be >= 0, got -2"),
    (["--keep-rate", "0.7"], "family 'tome' has no setting keep_rate"),
])
def test_cli_bad_settings_one_line_nothing_written(tome_ckpt, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("export", tome_ckpt, "-o", out, "--family", "tome", "--num-heads", HEADS, *args)
    line = assert_clean_failure(result, out)
    assert message in line


def test_checkpoint_of_another_family_is_one_line(dynamicvit_ckpt, tmp_path):
    out = tmp_path / "out"
    result = run_cli("export", dynamicvit_ckpt, "-o", out, "--family", "tome", "--num-heads", HEADS)
    line = assert_clean_failure(result, out)
    assert "is not a 'tome' checkpoint" in line and "family 'dynamicvit'" in line


def test_recipe_settings(tome_ckpt, tmp_path):
    from vitedge.recipe import load_recipe, merge

    recipe = tmp_path / "tome.yaml"
    recipe.write_text("family: tome\nnum_heads: 2\nsettings:\n  merge_count: [4, 4, 4]\n  prop_attn: false\n")
    options = merge(load_recipe(recipe), {})
    loaded = load_model(tome_ckpt, family=options["family"], num_heads=options["num_heads"], settings=options["settings"])
    assert loaded.settings == {"merge_count": [4, 4, 4], "inflection": 0.0, "prop_attn": False}
    assert [s["block"] for s in loaded.plan.selections] == [0, 1, 2]
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: tome\nsettings:\n  merge_count: lots\n")
    line = assert_clean_failure(run_cli("export", tome_ckpt, "-o", tmp_path / "o2", "--recipe", bad), tmp_path / "o2")
    assert "'merge_count' must be a whole number or a list of whole numbers >= 0, got 'lots'" in line
