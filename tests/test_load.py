"""vitedge.load: official checkpoint layouts and wrappers, vitedge metadata, and clear errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from support import FMNIST, HEADS, lvvit_keys, make_state_dict, random_state, timm_vit_keys

from vitedge.errors import VitedgeError
from vitedge.load import load_model, read_checkpoint


def _save(path, payload):
    if path.suffix == ".safetensors":
        save_file(payload, str(path))
    else:
        torch.save(payload, path)
    return path


LAYOUTS = {
    "model-wrapper.pth": lambda sd: {"model": sd, "epoch": 300, "args": {"lr": 5e-4}},
    "raw.pth": lambda sd: sd,
    "state_dict-wrapper.pth": lambda sd: {"state_dict": sd},
    "ddp-module-prefix.pth": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    "weights.safetensors": lambda sd: sd,
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("family", ["evit", "dynamicvit"])
def test_every_official_layout_loads_the_same_weights(tmp_path, family, name, evit_state, dynamicvit_state, fmnist_batch):
    state = evit_state if family == "evit" else dynamicvit_state
    path = _save(tmp_path / name, LAYOUTS[name](state))
    loaded = load_model(path, family=family, num_heads=HEADS)
    assert loaded.cfg == FMNIST
    assert loaded.family.name == family
    assert not loaded.model.training
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert loaded.checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        assert loaded.model(torch.from_numpy(fmnist_batch[0][:4])).shape == (4, 10)


def test_vitedge_metadata_fills_in_family_arch_and_settings(tmp_path, dynamicvit_state):
    info = {"family": "dynamicvit", "arch": FMNIST.to_dict(), "settings": {"keep_rate": 0.5},
            "mean": [0.3], "std": [0.4]}
    path = tmp_path / "fmnist-dynamicvit.safetensors"
    save_file(dynamicvit_state, str(path), metadata={"vitedge": json.dumps(info)})
    loaded = load_model(path)
    assert loaded.family.name == "dynamicvit"
    assert loaded.cfg == FMNIST  # 2 heads from the metadata, not the 64-per-head default
    assert loaded.settings["keep_rate"] == 0.5
    assert (loaded.mean, loaded.std) == ((0.3,), (0.4,))
    # Explicit settings win over the metadata's.
    assert load_model(path, settings={"keep_rate": 0.7}).settings["keep_rate"] == 0.7


def test_img_size_resamples_position_embeddings(evit_ckpt, fmnist_batch):
    loaded = load_model(evit_ckpt, family="evit", num_heads=HEADS, img_size=32)
    assert loaded.cfg.img_size == 32 and loaded.model.pos_embed.shape == (1, 65, 64)
    assert [s["kept_patches"] for s in loaded.plan.selections] == [45, 33, 24]
    with torch.no_grad():
        logits, kept = loaded.model.forward_tokens(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10) and kept[0].shape == (2, 46)


def test_family_must_be_known_or_given(evit_ckpt, dynamicvit_ckpt):
    with pytest.raises(VitedgeError, match="does not say its family; pass --family"):
        load_model(evit_ckpt)
    with pytest.raises(VitedgeError, match="its keys look like 'dynamicvit'"):
        load_model(dynamicvit_ckpt)
    with pytest.raises(VitedgeError, match="unknown family 'no-such-family'"):
        load_model(evit_ckpt, family="no-such-family")


def test_checkpoint_of_another_family(evit_ckpt, dynamicvit_ckpt):
    with pytest.raises(VitedgeError, match=r"not a 'evit' checkpoint: \d+ unexpected keys .*score_predictor.*look like family 'dynamicvit'"):
        load_model(dynamicvit_ckpt, family="evit", num_heads=HEADS)
    with pytest.raises(VitedgeError, match=r"not a 'dynamicvit' checkpoint: missing 30 keys"):
        load_model(evit_ckpt, family="dynamicvit", num_heads=HEADS)


def test_checkpoint_of_another_architecture(evit_ckpt, tmp_path):
    with pytest.raises(VitedgeError, match=r"does not match arch \(embed 192, depth 12, 224px\)"):
        load_model(evit_ckpt, family="evit", arch="deit_tiny")
    shallow = {k: v for k, v in make_state_dict("evit").items() if not k.startswith("blocks.11.")}
    path = _save(tmp_path / "depth11.pth", {"model": shallow})
    with pytest.raises(VitedgeError, match="missing 12 keys"):
        load_model(path, family="evit", arch="vit_fmnist")


def test_not_a_vit(tmp_path):
    path = _save(tmp_path / "resnet.pth", {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)})
    with pytest.raises(VitedgeError, match="not a ViT with timm/DeiT key names"):
        load_model(path, family="evit")


def test_bad_head_count(evit_ckpt):
    with pytest.raises(VitedgeError, match="not divisible by 3 heads"):
        load_model(evit_ckpt, family="evit", num_heads=3)


def test_image_size_not_divisible_by_patch(evit_ckpt):
    with pytest.raises(VitedgeError, match="image size 30 is not a positive multiple of the patch size 4"):
        load_model(evit_ckpt, family="evit", num_heads=HEADS, img_size=30)


CORRUPT = {
    "random.pth": lambda p: p.write_bytes(bytes(range(256)) * 20),
    "random.safetensors": lambda p: p.write_bytes(b"\xff" * 16 + bytes(range(256)) * 20),
    "empty.pth": lambda p: p.write_bytes(b""),
    "truncated.pth": None,  # filled in by the test from a real checkpoint
    "list.pth": lambda p: torch.save([1, 2, 3], p),
    "no-tensors.pth": lambda p: torch.save({"model": {"epoch": 3}}, p),
    "empty.safetensors": lambda p: save_file({}, str(p)),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_unreadable_checkpoints_fail_in_one_line(tmp_path, evit_ckpt, name):
    path = tmp_path / name
    if CORRUPT[name] is None:
        path.write_bytes(evit_ckpt.read_bytes()[:3000])
    else:
        CORRUPT[name](path)
    with pytest.raises(VitedgeError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_pickled_code_is_refused(tmp_path):
    """``weights_only`` loading: a checkpoint that would run code on load is an error, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": print}, path)
    with pytest.raises(VitedgeError, match="cannot read checkpoint"):
        read_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(VitedgeError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(VitedgeError, match="checkpoint not found"):
        read_checkpoint(tmp_path)  # a folder is not a checkpoint


def test_deit3_official_layer_scale_names_load_as_timm(tmp_path):
    """facebookresearch/deit models_v2.py saves ``blocks.i.gamma_1``/``gamma_2``; timm calls them ``ls1/ls2.gamma``."""
    keys = timm_vit_keys(64, 2, layer_scale=True, no_embed_class=True)
    state = random_state(keys, seed=2)
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in state.items()}
    path = tmp_path / "deit_3_small_224_1k.pth"
    torch.save({"model": official}, path)
    loaded = load_model(path, family="tome", num_heads=HEADS, settings={"merge_count": 2})
    assert loaded.cfg.layer_scale and loaded.cfg.no_embed_class and loaded.cfg.sequence_length == 50
    assert torch.equal(loaded.model.blocks[1].ls2.gamma, official["blocks.1.gamma_2"])


def test_lvvit_checkpoint_loads_from_the_tokenlabeling_wrappers(tmp_path):
    state = random_state(lvvit_keys(64, 2), seed=4)
    for name, payload in {"lvvit_s-26M-224-83.3.pth.tar": state, "ema.pth": {"state_dict": state}}.items():
        path = tmp_path / name
        torch.save(payload, path)
        loaded = load_model(path, family="deit", num_heads=HEADS)
        assert loaded.cfg.backbone == "lvvit" and loaded.cfg.skip_lam == 2.0
        assert set(loaded.model.state_dict()) == set(state)


def test_a_family_on_a_backbone_it_does_not_support_is_one_line(tmp_path):
    path = tmp_path / "mae_finetuned_vit.pth"
    torch.save({"model": random_state(timm_vit_keys(64, 2, fc_norm=True))}, path)
    with pytest.raises(VitedgeError, match=r"family 'avit' does not support this backbone: global average pooling .*"
                                           r"it runs on DeiT/timm ViTs with a class token and token pooling, plus nothing else"):
        load_model(path, family="avit", num_heads=HEADS)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s["blocks.3.attn.qkv.weight"].__setitem__((0, 0), float("nan")), r"holds NaN weights in 1 tensor\(s\): blocks.3.attn.qkv.weight"),
    (lambda s: s["head.bias"].__setitem__(0, float("inf")), r"holds Inf weights in 1 tensor\(s\): head.bias"),
    (lambda s: s.update({"norm.weight": torch.ones(64, dtype=torch.int64)}), r"non-float weights .*: norm.weight \(int64\)"),
    (lambda s: s.update({"cls_token": torch.ones(1, 1, 64, dtype=torch.bool)}), r"non-float weights .*: cls_token \(bool\)"),
])
def test_damaged_weights_are_refused_with_their_names(tmp_path, damage, message):
    state = make_state_dict("evit")
    damage(state)
    path = tmp_path / "damaged.pth"
    torch.save({"model": state}, path)
    with pytest.raises(VitedgeError, match=message):
        load_model(path, family="evit", num_heads=HEADS)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_heads": 0}, "--num-heads must be a positive integer, got 0"),
    ({"img_size": 0}, "--img-size must be a positive integer, got 0"),
    ({"img_size": -28}, "--img-size must be a positive integer, got -28"),
    ({"num_heads": HEADS, "img_size": 4 * 100_000}, r"a 400000 px input .* needs about .* of memory"),
])
def test_sizes_that_used_to_fall_back_to_defaults(evit_ckpt, kwargs, message):
    with pytest.raises(VitedgeError, match=message):
        load_model(evit_ckpt, family="evit", **kwargs)


def test_the_memory_limit_is_overridable(evit_ckpt, monkeypatch):
    monkeypatch.setenv("VITEDGE_MEMORY_LIMIT", "1M")
    with pytest.raises(VitedgeError, match=r"a 56 px input .* 1.0 MiB is available; pick a smaller --img-size"):
        load_model(evit_ckpt, family="evit", num_heads=HEADS, img_size=56)
    monkeypatch.setenv("VITEDGE_MEMORY_LIMIT", "none")
    assert load_model(evit_ckpt, family="evit", num_heads=HEADS, img_size=56).cfg.img_size == 56
    monkeypatch.setenv("VITEDGE_MEMORY_LIMIT", "lots")
    with pytest.raises(VitedgeError, match="VITEDGE_MEMORY_LIMIT must be a number of bytes"):
        load_model(evit_ckpt, family="evit", num_heads=HEADS)
