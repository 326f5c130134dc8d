"""LeViT in Evo-LeViT's layout: config read off the released shapes (224 and 384 px), keys rebuilt, FLOPs
against the LeViT paper, BatchNorm folding, the blocks/stage_blocks twins, and bad checkpoints (one line,
nothing written)."""

from __future__ import annotations

import copy

import pytest
import torch
from support import assert_clean_failure, evo_levit_keys, evo_levit_state, run_cli

from vitedge.backbones import FEATURE_NAMES, dense_flops, infer_config, levit
from vitedge.errors import VitedgeError
from vitedge.families import available_families
from vitedge.load import load_model

# specification in levit/evo_levit.py (C, D, N, X) and LeViT's paper FLOPs (M, Table 3; 224 px, no class token)
RELEASED = {
    "128S": ((128, 256, 384), 16, (4, 6, 8), (2, 3, 4), 305),
    "128": ((128, 256, 384), 16, (4, 8, 12), (4, 4, 4), 406),
    "192": ((192, 288, 384), 32, (3, 5, 6), (4, 4, 4), 658),
    "256": ((256, 384, 512), 32, (4, 6, 8), (4, 4, 4), 1120),
    "384": ((384, 512, 768), 32, (6, 9, 12), (4, 4, 4), 2353),
}


def _shapes_only(keys):
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


@pytest.mark.parametrize("img", [224, 384])
@pytest.mark.parametrize("name", list(RELEASED))
def test_released_shapes_are_read_off_the_weights(name, img):
    dims, key_dim, heads, depths, _ = RELEASED[name]
    keys = evo_levit_keys(dims=dims, key_dim=key_dim, heads=heads, depths=depths, img=img, in_chans=3, num_classes=1000)
    cfg = infer_config(_shapes_only(keys))
    assert isinstance(cfg, levit.LeViTConfig) and cfg.backbone == "levit" and cfg.features == {"levit"}
    assert (cfg.stage_dims, cfg.stage_heads, cfg.stage_depths, cfg.key_dim) == (dims, heads, depths, key_dim)
    assert cfg.subsample_heads == (dims[0] // key_dim, dims[1] // key_dim)  # down_ops: C_i // D heads
    assert (cfg.img_size, cfg.patch_size, cfg.num_classes, cfg.num_heads, cfg.depth) == (img, 16, 1000, heads[0], sum(depths))
    assert cfg.stage_grids == ([14, 7, 4] if img == 224 else [24, 12, 6])


@pytest.mark.parametrize("name", list(RELEASED))
def test_dense_flops_match_the_levit_paper(name):
    """LeViT's FLOPs at 224 px; Evo-LeViT adds the class token to every stage (and drops the attention biases)."""
    dims, key_dim, heads, depths, paper = RELEASED[name]
    keys = evo_levit_keys(dims=dims, key_dim=key_dim, heads=heads, depths=depths, img=224, in_chans=3, num_classes=1000)
    cfg = infer_config(_shapes_only(keys))
    assert dense_flops(cfg) / 2 == pytest.approx(paper * 1e6, rel=0.03)
    assert dense_flops(cfg) > paper * 2e6  # the class token only adds


def test_model_rebuilds_the_official_blocks_keys():
    keys = evo_levit_keys()
    with pytest.raises(VitedgeError, match="key dim 16 does not divide the head channels 24; pass --num-heads"):
        infer_config(_shapes_only(keys))  # not a released shape: LeViT's smallest key dim does not fit
    cfg = infer_config(_shapes_only(keys), num_heads=2)
    assert (cfg.key_dim, cfg.stage_heads, cfg.subsample_heads) == (8, (2, 3, 4), (4, 6))
    ours = {k: tuple(v.shape) for k, v in levit.LeViT(cfg).state_dict().items()}
    official = {k: v for k, v in keys.items() if not k.startswith(("stage_blocks.", "head_cls"))}
    assert ours == official


def test_batch_norms_fold_into_convs_and_linears():
    state = evo_levit_state(seed=1)
    cfg = infer_config(state, num_heads=2)
    model = levit.LeViT(cfg).eval()
    model.load_state_dict(levit.deduplicate_stage_blocks({k: v for k, v in state.items() if not k.startswith("head_cls")}))
    folded = levit.fold_batch_norms(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, levit.LinearBN) for m in model.modules())
    images = torch.randn(3, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(model(images), folded(images), atol=1e-5)


def test_stage_blocks_twins_are_checked_then_dropped():
    state = evo_levit_state()
    deduplicated = levit.deduplicate_stage_blocks(state)
    assert not any(k.startswith("stage_blocks.") for k in deduplicated)
    assert len(deduplicated) < len(state)
    changed = dict(state)
    key = next(k for k in state if k.startswith("stage_blocks.") and k.endswith("qkv.c.weight"))
    changed[key] = state[key] + 1e-3
    with pytest.raises(VitedgeError, match=f"{key.split('.m.qkv')[0]}.*differs from blocks"):
        levit.deduplicate_stage_blocks(changed)


def test_levit_is_a_feature_families_must_declare():
    assert "levit" in FEATURE_NAMES


def _save(tmp_path, state, name="levit.pth"):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def test_cli_refuses_blocks_and_stage_blocks_that_differ(tmp_path):
    state = evo_levit_state()
    key = next(k for k in state if k.startswith("stage_blocks.") and k.endswith("poss"))
    state[key] = state[key].clone() * 2
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", _save(tmp_path, state), "-o", out, "--family", "evovit",
                                        "--num-heads", "2"), out)
    assert f"{key} differs from blocks." in line and "re-save" in line


@pytest.mark.parametrize("family", [name for name in available_families() if name != "evovit"])
def test_cli_refuses_levit_for_a_family_without_it(family, tmp_path):
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", _save(tmp_path, evo_levit_state()), "-o", out, "--family", family,
                                        "--num-heads", "2"), out)
    assert f"family '{family}' does not support this backbone: the LeViT backbone" in line and "it runs on" in line


# The default shape (3/2/2 blocks): pairs blocks.0-2, subsampling 3 + MLP 4, pairs 5-6, 7 + 8, pairs 9-10.
@pytest.mark.parametrize("cut, message", [
    (lambda i, rest: i >= 9, "stage 3 ends with a subsampling and no attention block"),
    (lambda i, rest: i == 1 and rest.startswith("m2."), "blocks.1 has an attention without its MLP"),
    (lambda i, rest: i == 4, "no blocks.4 but has blocks up to 10"),
])
def test_cli_refuses_a_truncated_stage(cut, message, tmp_path):
    state = {}
    for key, value in evo_levit_state().items():
        parts = key.split(".", 2)
        if key.startswith("stage_blocks.") or (parts[0] == "blocks" and cut(int(parts[1]), parts[2])):
            continue
        state[key] = value
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", _save(tmp_path, state), "-o", out, "--family", "evovit",
                                        "--num-heads", "2"), out)
    assert message in line and "truncated" in line


def test_other_input_sizes_and_head_counts_are_one_line():
    state = evo_levit_state()
    with pytest.raises(VitedgeError, match="position tables .* for 128 px inputs only"):
        load_model_from(state, img_size=256, num_heads=2)
    with pytest.raises(VitedgeError, match="3 heads do not divide stage 1's 16 head channels"):
        load_model_from(state, num_heads=3)


def load_model_from(state, **options):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "levit.pth"
        torch.save({"model": state}, path)
        return load_model(path, family="evovit", **options)


def test_profile_tokens_refuses_a_backbone_whose_width_changes(tmp_path):
    out = tmp_path / "staircase"
    line = assert_clean_failure(run_cli("profile-tokens", _save(tmp_path, evo_levit_state()), "-o", out,
                                        "--family", "evovit", "--num-heads", "2", "--tokens", "8:16"), out)
    assert "change width from stage to stage" in line and "vitedge profile" in line
