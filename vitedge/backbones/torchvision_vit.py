"""torchvision's and SWAG's ViT layouts, renamed to timm's keys (the backbone is the same).

Two releases save the plain pre-norm ViT (class token, learned positions over the class
token + patches, LayerNorm eps 1e-6, exact GELU, ``nn.MultiheadAttention``) under other names:

- torchvision ``models/vision_transformer.py`` (its ``vit_*`` weights, SWAG's end-to-end and
  linear ones included): ``conv_proj``, ``class_token``, ``encoder.pos_embedding`` [1, S, D],
  ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention.in_proj_weight/in_proj_bias,
  self_attention.out_proj, ln_2, mlp.0, mlp.3}`` (``mlp.linear_1`` / ``linear_2`` before
  torchvision 0.12, which its ``MLPBlock`` still loads), ``encoder.ln``, ``heads.head``;
- SWAG's torch-hub models (facebookresearch/SWAG ``models/vision_transformer.py``, from
  ClassyVision): the same modules as ``encoder.layers.layer_{i}`` with ``mlp.linear_1`` /
  ``linear_2``, the position table as [S, 1, D] (the encoder runs sequence-first),
  ``head.layers.head``; ``classifier="gap"`` drops ``class_token`` and averages every token.

``in_proj_weight`` stacks q, k and v, each head a contiguous slice, which is timm's ``qkv``
layout, so every tensor maps one to one (as timm's ``checkpoint_filter_fn`` renames OpenAI
CLIP's). What has no timm counterpart is refused in one line: a pre-logits layer
(torchvision ``representation_size``: ``heads.pre_logits`` + tanh), a convolutional stem,
a head-less pretrained trunk.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import VitedgeError

# The layer prefix of each layout, its MLP names, its head and its pre-logits layer.
LAYOUTS = {
    "torchvision": {"layer": "encoder.layers.encoder_layer_", "mlp": (("mlp.0", "mlp.linear_1"), ("mlp.3", "mlp.linear_2")),
                    "head": "heads.head", "pre_logits": "heads.pre_logits"},
    "swag": {"layer": "encoder.layers.layer_", "mlp": (("mlp.linear_1",), ("mlp.linear_2",)),
             "head": "head.layers.head", "pre_logits": "head.layers.pre_logits"},
}
# timm name of each per-layer module (the MLP's come from the layout).
BLOCK_NAMES = {"ln_1": "norm1", "self_attention.out_proj": "attn.proj", "ln_2": "norm2"}
ATTENTION_NAMES = {"self_attention.in_proj_weight": "attn.qkv.weight", "self_attention.in_proj_bias": "attn.qkv.bias"}
SIGNATURE_KEY = "encoder.pos_embedding"


def matches(state_dict: dict[str, torch.Tensor]) -> bool:
    return SIGNATURE_KEY in state_dict or any(k.startswith("encoder.layers.") for k in state_dict)


def to_timm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision / SWAG ViT state dict under timm's names (others are returned as they are)."""
    if not matches(state_dict):
        return state_dict
    layout = _layout(state_dict)
    names = LAYOUTS[layout]
    _refuse_what_timm_lacks(state_dict, layout)
    out: dict[str, torch.Tensor] = {}
    depth = _check_layers(state_dict, layout)
    for i in range(depth):
        prefix = f"{names['layer']}{i}."
        for theirs, ours in {**BLOCK_NAMES, **_mlp_names(state_dict, prefix, layout)}.items():
            for param in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{param}"] = state_dict[f"{prefix}{theirs}.{param}"]
        for theirs, ours in ATTENTION_NAMES.items():
            out[f"blocks.{i}.{ours}"] = state_dict[prefix + theirs]
    embed_dim = state_dict["conv_proj.weight"].shape[0]
    out["patch_embed.proj.weight"] = state_dict["conv_proj.weight"]
    out["patch_embed.proj.bias"] = state_dict["conv_proj.bias"]
    if "class_token" in state_dict:
        out["cls_token"] = state_dict["class_token"]
    out["pos_embed"] = _position_table(state_dict[SIGNATURE_KEY], layout, embed_dim, "class_token" in state_dict)
    for param in ("weight", "bias"):
        out[f"norm.{param}"] = state_dict[f"encoder.ln.{param}"]
        out[f"head.{param}"] = state_dict[f"{names['head']}.{param}"]
    known = {k for k in state_dict if _owned(k)}
    used = _source_keys(state_dict, layout, depth)
    unknown = sorted(known - used)
    if unknown:
        raise VitedgeError(f"{layout} ViT checkpoint has {len(unknown)} key(s) this layout does not define "
                           f"(e.g. {', '.join(unknown[:3])}); is it a modified model?")
    out.update({k: v for k, v in state_dict.items() if not _owned(k)})  # family additions, checked at load
    return out


def _owned(key: str) -> bool:
    """Keys in the torchvision / SWAG namespaces (everything else is left for the loader to judge)."""
    return key.startswith(("conv_proj.", "encoder.", "heads.", "head.layers.")) or key == "class_token"


def _layout(state_dict: dict[str, torch.Tensor]) -> str:
    timm = sorted(k for k in state_dict if k.startswith(("blocks.", "patch_embed.")))
    if timm:
        raise VitedgeError(f"checkpoint mixes torchvision ViT keys (encoder.*) with timm keys ({timm[0]}); it fits neither layout")
    found = [name for name, v in LAYOUTS.items() if any(k.startswith(v["layer"]) for k in state_dict)]
    if len(found) != 1:
        what = "both encoder.layers.encoder_layer_i and layer_i" if found else "no encoder.layers.encoder_layer_i or layer_i"
        raise VitedgeError(f"checkpoint has {SIGNATURE_KEY} but {what}: not a torchvision or SWAG ViT")
    return found[0]


def _refuse_what_timm_lacks(state_dict: dict[str, torch.Tensor], layout: str) -> None:
    names = LAYOUTS[layout]
    if any(k.startswith(names["pre_logits"] + ".") for k in state_dict):
        raise VitedgeError(
            f"{layout} ViT checkpoint has a pre-logits layer ({names['pre_logits']} + tanh, torchvision's "
            "representation_size), which vitedge does not build; export a checkpoint whose head is one linear "
            f"layer ({names['head']}), as the released ImageNet-1k ones are"
        )
    stem = sorted(k for k in state_dict if k.startswith("conv_proj.") and k not in ("conv_proj.weight", "conv_proj.bias"))
    if stem:
        raise VitedgeError(f"{layout} ViT checkpoint has a convolutional stem ({stem[0]}: torchvision conv_stem_configs / "
                           "SWAG conv_stem_layers), which vitedge does not build; export a ViT whose stem is one patch "
                           "projection (conv_proj.weight)")
    if not any(k.startswith(names["head"] + ".") for k in state_dict):
        raise VitedgeError(
            f"{layout} ViT checkpoint has no classification head ({names['head']}): a pretrained trunk "
            "(SWAG vit_b16, not vit_b16_in1k) gives features, not logits; export a fine-tuned classifier"
        )
    missing = [k for k in ("conv_proj.weight", "conv_proj.bias", SIGNATURE_KEY, "encoder.ln.weight", "encoder.ln.bias",
                           f"{names['head']}.weight", f"{names['head']}.bias") if k not in state_dict]
    if missing:
        raise VitedgeError(f"{layout} ViT checkpoint lacks {', '.join(missing)}; is the file complete?")


def _mlp_names(state_dict: dict[str, torch.Tensor], prefix: str, layout: str) -> dict[str, str]:
    """This layer's MLP names (torchvision's ``mlp.0``/``mlp.3``, or the older ``linear_1``/``linear_2``)."""
    names = {}
    for choices, ours in zip(LAYOUTS[layout]["mlp"], ("mlp.fc1", "mlp.fc2")):
        theirs = next((c for c in choices if f"{prefix}{c}.weight" in state_dict), choices[0])
        names[theirs] = ours
    return names


def _layer_suffixes(state_dict: dict[str, torch.Tensor], prefix: str, layout: str) -> list[str]:
    suffixes = [f"{m}.{p}" for m in (*BLOCK_NAMES, *_mlp_names(state_dict, prefix, layout)) for p in ("weight", "bias")]
    return suffixes + list(ATTENTION_NAMES)


def _check_layers(state_dict: dict[str, torch.Tensor], layout: str) -> int:
    """The depth, after checking that layers 0..depth-1 are all there, each complete."""
    prefix = LAYOUTS[layout]["layer"]
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})
    if not indices:
        raise VitedgeError(f"{layout} ViT checkpoint has no numbered layers ({prefix}0.ln_1.weight, ...)")
    depth = indices[-1] + 1
    absent = sorted(set(range(depth)) - set(indices))
    if absent:
        raise VitedgeError(f"{layout} ViT checkpoint has layers up to {prefix}{depth - 1} but not "
                           f"{', '.join(f'{prefix}{i}' for i in absent[:3])}; is the file truncated?")
    for i in range(depth):
        lacking = [s for s in _layer_suffixes(state_dict, f"{prefix}{i}.", layout) if f"{prefix}{i}.{s}" not in state_dict]
        if lacking:
            raise VitedgeError(f"{layout} ViT checkpoint: {prefix}{i} lacks {', '.join(lacking[:3])}"
                               f"{f' and {len(lacking) - 3} more' if len(lacking) > 3 else ''}; is the file truncated?")
    return depth


def _source_keys(state_dict: dict[str, torch.Tensor], layout: str, depth: int) -> set[str]:
    names = LAYOUTS[layout]
    keys = {"conv_proj.weight", "conv_proj.bias", "class_token", SIGNATURE_KEY, "encoder.ln.weight", "encoder.ln.bias",
            f"{names['head']}.weight", f"{names['head']}.bias"}
    for i in range(depth):
        prefix = f"{names['layer']}{i}."
        keys.update(prefix + s for s in _layer_suffixes(state_dict, prefix, layout))
    return keys


def _position_table(table: torch.Tensor, layout: str, embed_dim: int, class_token: bool) -> torch.Tensor:
    """timm's [1, S, D] table from torchvision's [1, S, D] or SWAG's sequence-first [S, 1, D], its length checked."""
    want = "[1, S, D]" if layout == "torchvision" else "[S, 1, D]"
    axis = 1 if layout == "torchvision" else 0
    if table.dim() != 3 or table.shape[1 - axis] != 1 or table.shape[2] != embed_dim:
        raise VitedgeError(f"{layout} ViT checkpoint has {SIGNATURE_KEY} of shape {list(table.shape)}; "
                           f"expected {want} with D = {embed_dim} (conv_proj's width)")
    positions = table.shape[axis]
    patches = positions - int(class_token)
    if patches < 1 or math.isqrt(patches) ** 2 != patches:
        near = max(1, round(math.sqrt(max(patches, 1))))
        tokens = "the class token plus " if class_token else ""
        raise VitedgeError(
            f"{layout} ViT checkpoint has {SIGNATURE_KEY} with {positions} positions: not {tokens}a square grid of "
            f"patches (e.g. {int(class_token)} + {near} x {near} = {int(class_token) + near * near}); "
            "only square inputs are supported"
        )
    return table if layout == "torchvision" else table.transpose(0, 1).contiguous()
