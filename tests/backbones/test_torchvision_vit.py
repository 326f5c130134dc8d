"""vitedge.backbones.torchvision_vit: torchvision's and SWAG's ViT layouts load as timm ViTs.

Checkpoints are written from the official key lists (``support.torchvision_vit_layout``); the
reference below is torchvision's / SWAG's ``VisionTransformer.forward`` at eval over the official
names, sequence-first through ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention``
runs), so neither the rename nor timm's qkv reshape is taken on trust.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from support import assert_clean_failure, read_json, run_cli, torchvision_vit_layout, torchvision_vit_state

from vitedge.backbones import adapt_state_dict, infer_config
from vitedge.load import load_model

HEADS = 2
D = 32  # the width of the checkpoints below


@torch.no_grad()
def official_forward(sd: dict, images: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """torchvision ``VisionTransformer.forward`` / SWAG's (token or ``gap`` classifier), eval mode."""
    swag = "encoder.layers.layer_0.ln_1.weight" in sd
    x = F.conv2d(images, sd["conv_proj.weight"], sd["conv_proj.bias"], stride=patch)
    n, d = x.shape[:2]
    x = x.reshape(n, d, -1).permute(2, 0, 1)  # (S, N, E)
    if "class_token" in sd:
        x = torch.cat([sd["class_token"].expand(-1, n, -1), x], dim=0)
    pos = sd["encoder.pos_embedding"]
    x = x + (pos if swag else pos.transpose(0, 1))  # SWAG stores [S, 1, D]; torchvision [1, S, D], batch first
    layer = "encoder.layers.layer_{}." if swag else "encoder.layers.encoder_layer_{}."
    i = 0
    while layer.format(i) + "ln_1.weight" in sd:
        p = layer.format(i)
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-6)
        h, _ = F.multi_head_attention_forward(
            h, h, h, d, heads, sd[p + "self_attention.in_proj_weight"], sd[p + "self_attention.in_proj_bias"],
            None, None, False, 0.0, sd[p + "self_attention.out_proj.weight"], sd[p + "self_attention.out_proj.bias"],
            training=False, need_weights=False)
        x = x + h
        fc1, fc2 = ("mlp.0", "mlp.3") if p + "mlp.0.weight" in sd else ("mlp.linear_1", "mlp.linear_2")
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + fc1 + ".weight"], sd[p + fc1 + ".bias"])), sd[p + fc2 + ".weight"],
                         sd[p + fc2 + ".bias"])
        i += 1
    x = F.layer_norm(x, (d,), sd["encoder.ln.weight"], sd["encoder.ln.bias"], eps=1e-6)
    pooled = x[0] if "class_token" in sd else x.mean(dim=0)
    head = "head.layers.head" if swag else "heads.head"
    return F.linear(pooled, sd[head + ".weight"], sd[head + ".bias"])


VARIANTS = {
    "torchvision": {"layout": "torchvision"},
    "torchvision-linear_1": {"layout": "torchvision", "old_mlp": True},
    "swag": {"layout": "swag"},
    "swag-gap": {"layout": "swag", "class_token": False},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_model_equals_the_official_forward(variant, tmp_path, fmnist_batch):
    official, timm = torchvision_vit_state(torchvision_vit_layout(32, 3, **VARIANTS[variant]), seed=4)
    path = tmp_path / "vit.torch"
    torch.save(official, path)  # SWAG's .torch files and torchvision's .pth hold the bare state dict
    loaded = load_model(path, family="deit", num_heads=HEADS)
    ours = loaded.model.state_dict()
    assert set(ours) == set(timm)
    for key, value in ours.items():
        assert torch.equal(value, timm[key]), key
    assert loaded.cfg.class_token == VARIANTS[variant].get("class_token", True)
    images = torch.from_numpy(fmnist_batch[0][:16])
    with torch.no_grad():
        logits = loaded.model(images)
    want = official_forward(official, images, HEADS, 4)
    assert torch.allclose(logits, want, atol=1e-5), (logits - want).abs().max()
    assert (logits.argmax(1) == want.argmax(1)).all()


def _meta_state(**shape) -> dict:
    return {k: torch.empty(s, device="meta") for k, (_, s) in torchvision_vit_layout(**shape).items()}


@pytest.mark.parametrize("name, shape, want", [
    ("vit_b16_in1k", {"embed_dim": 768, "depth": 12, "patch": 16, "img": 384}, (384, 16, 12, 12)),
    ("vit_l16_in1k", {"embed_dim": 1024, "depth": 24, "patch": 16, "img": 512}, (512, 16, 24, 16)),
    ("vit_h14_in1k", {"embed_dim": 1280, "depth": 32, "patch": 14, "img": 518}, (518, 14, 32, 16)),  # 16 heads of 80
])
def test_released_swag_shapes_read_off_the_weights(name, shape, want):
    """SWAG models/vision_transformer.py ViTB16 / ViTL16 / ViTH14 at hubconf.py's fine-tuned sizes."""
    cfg = infer_config(adapt_state_dict(_meta_state(**shape, in_chans=3, num_classes=1000, layout="swag")))
    assert (cfg.img_size, cfg.patch_size, cfg.depth, cfg.num_heads) == want
    assert (cfg.mlp_ratio, cfg.num_classes, cfg.features, cfg.norm_eps) == (4.0, 1000, frozenset(), 1e-6)


def _rgb_checkpoint(tmp_path, layout: str, img: int, patch: int, depth: int = 2, **change):
    """A 32-wide RGB checkpoint at ``img`` px, ``change`` applied (None: drop the keys with that prefix)."""
    shape = torchvision_vit_layout(32, depth, patch=patch, img=img, in_chans=3, layout=layout)
    official, _ = torchvision_vit_state(shape, seed=9)
    for key, value in change.items():
        if value is None:
            official = {k: v for k, v in official.items() if not k.startswith(key)}
        else:
            official[key] = value
    path = tmp_path / f"{layout}-{img}.torch"
    torch.save(official, path)
    return path


@pytest.mark.parametrize("layout, img, patch, family", [
    ("swag", 384, 16, ["--family", "deit"]),  # ViT-B/16 @ 384: 24 x 24 patches
    ("torchvision", 518, 14, ["--family", "tome", "--merge-count", "40"]),  # ViT-H/14 @ 518: 37 x 37, ToMe's r 40
])
def test_cli_exports_checks_and_validates_at_the_released_sizes(layout, img, patch, family, tmp_path):
    path = _rgb_checkpoint(tmp_path, layout, img, patch)
    out = tmp_path / "out"
    result = run_cli("export", path, "-o", out, *family, "--num-heads", HEADS, "--transform", "swag", "--limit", 8)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["check"] and summary["top1_agreement"] == 1.0
    metadata = read_json(out / "vitedge.json")
    assert metadata["arch"]["img_size"] == img and metadata["arch"]["patch_size"] == patch
    assert metadata["input"]["transform"]["preset"] == "swag" and metadata["input"]["transform"]["resize"] == img
    check = run_cli("check", out)
    assert check.exit_code == 0, check.output
    validate = run_cli("validate", out, "--limit", 8)
    assert validate.exit_code == 0, validate.output


BAD = [
    ("a missing layer", {"encoder.layers.layer_0.": None},
     "has layers up to encoder.layers.layer_1 but not encoder.layers.layer_0; is the file truncated?"),
    ("a missing tensor", {"encoder.layers.layer_1.ln_2.bias": None},
     "encoder.layers.layer_1 lacks ln_2.bias; is the file truncated?"),
    ("a pre-logits layer", {"head.layers.pre_logits.weight": torch.zeros(D, D), "head.layers.pre_logits.bias": torch.zeros(D)},
     "has a pre-logits layer (head.layers.pre_logits + tanh"),
    ("a pretrained trunk", {"head.layers.head.": None}, "has no classification head (head.layers.head)"),
    ("a conv stem", {"conv_proj.conv_0.weight": torch.zeros(8, 3, 3, 3)}, "has a convolutional stem (conv_proj.conv_0.weight"),
    ("an unknown tensor", {"encoder.layers.layer_0.self_attention.bias_k": torch.zeros(1, 1, D)},
     "1 key(s) this layout does not define (e.g. encoder.layers.layer_0.self_attention.bias_k)"),
    ("a position table off the grid", {"encoder.pos_embedding": torch.zeros(1 + 24 * 24 + 2, 1, D)},
     "encoder.pos_embedding with 579 positions: not the class token plus a square grid of patches (e.g. 1 + 24 x 24 = 577)"),
    ("a batch-first table in SWAG's layout", {"encoder.pos_embedding": torch.zeros(1, 1 + 24 * 24, D)},
     "encoder.pos_embedding of shape [1, 577, 32]; expected [S, 1, D]"),
]


@pytest.mark.parametrize("what, change, message", BAD, ids=[b[0] for b in BAD])
def test_bad_swag_checkpoints_are_one_line_and_write_nothing(what, change, message, tmp_path):
    path = _rgb_checkpoint(tmp_path, "swag", 384, 16, **change)
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", path, "-o", out, "--family", "deit", "--num-heads", HEADS), out)
    assert message in line, line


TORCHVISION_BAD = [
    ("a position table off the grid", {"encoder.pos_embedding": torch.zeros(1, 1 + 37 * 37 - 1, D)},
     "encoder.pos_embedding with 1369 positions: not the class token plus a square grid of patches (e.g. 1 + 37 x 37 = 1370)"),
    ("a pre-logits layer", {"heads.pre_logits.weight": torch.zeros(D, D), "heads.pre_logits.bias": torch.zeros(D)},
     "has a pre-logits layer (heads.pre_logits + tanh, torchvision's representation_size)"),
    ("a missing middle layer", {"encoder.layers.encoder_layer_1.": None},
     "has layers up to encoder.layers.encoder_layer_2 but not encoder.layers.encoder_layer_1"),
    ("no position table", {"encoder.pos_embedding": None}, "torchvision ViT checkpoint lacks encoder.pos_embedding"),
    ("timm keys mixed in", {"blocks.0.norm1.weight": torch.ones(D)}, "mixes torchvision ViT keys (encoder.*) with timm keys"),
]


@pytest.mark.parametrize("what, change, message", TORCHVISION_BAD, ids=[b[0] for b in TORCHVISION_BAD])
def test_bad_torchvision_checkpoints_are_one_line_and_write_nothing(what, change, message, tmp_path):
    path = _rgb_checkpoint(tmp_path, "torchvision", 518, 14, depth=3, **change)
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("export", path, "-o", out, "--family", "tome", "--num-heads", HEADS), out)
    assert message in line, line
