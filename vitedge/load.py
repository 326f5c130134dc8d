"""Stage 1, load: a checkpoint file → the family's reference model with its weights.

Accepts what the official repos save: a raw state dict, ``{"model": ...}`` /
``{"state_dict": ...}`` wrappers (and DDP's ``module.`` prefix), as ``.pth`` (loaded with
``weights_only=True``) or ``.safetensors``. vitedge's own checkpoints carry a ``vitedge``
metadata entry (family, arch, settings, normalisation) that fills in what flags leave out.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbone import ViTConfig, arch_config, default_normalization, resample_pos_embed
from .backbones import adapt_state_dict as adapt_backbone_keys
from .backbones import check_support, infer_config, lvvit
from .errors import VitedgeError
from .families import Family, TokenPlan, detect_family, get_family
from .reading import file_sha256, reading
from .resources import forward_bytes, require_memory
from .schema import CHECKPOINT_METADATA, check

WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    sha256: str
    metadata: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A reference model plus everything the later stages record about it."""

    model: nn.Module
    family: Family
    cfg: ViTConfig
    settings: dict
    plan: TokenPlan
    checkpoint: Checkpoint
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dropped_keys: list[str] = field(default_factory=list)



def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise VitedgeError(f"checkpoint not found: {path}")
    metadata: dict = {}
    with reading(path, "checkpoint"):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}
            if "vitedge" in raw:
                metadata = check(json.loads(raw["vitedge"]), CHECKPOINT_METADATA, path, "checkpoint metadata of")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        sha256 = file_sha256(path)
    unknown = sorted(set(metadata.get("arch") or {}) - {f.name for f in dataclasses.fields(ViTConfig)})
    if unknown:  # the schema types the fields; which fields exist is the backbone config's business
        raise VitedgeError(f"checkpoint metadata of {path}: field 'arch' has unknown key(s) {', '.join(unknown)}; "
                           "re-save it with this vitedge")
    state = _unwrap(state, path)
    return Checkpoint(path, state, sha256, metadata)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(2):
        if isinstance(state, dict):
            wrapped = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
            if wrapped is not None:
                state = wrapped
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitedgeError(f"{path} holds no state dict of tensors (expected a raw state dict or a 'model'/'state_dict' wrapper)")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def resolve_config(
    checkpoint: Checkpoint, arch: str | None, num_heads: int | None, img_size: int | None, fam: Family | None = None
) -> ViTConfig:
    for name, value in (("--num-heads", num_heads), ("--img-size", img_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise VitedgeError(f"{name} must be a positive integer, got {value!r}")
    if arch:
        cfg = arch_config(arch)
        if num_heads:
            cfg = ViTConfig(**{**cfg.to_dict(), "num_heads": num_heads})
    elif "arch" in checkpoint.metadata and not num_heads:
        cfg = ViTConfig(**checkpoint.metadata["arch"])
    else:
        state = adapt_backbone_keys(checkpoint.state_dict)
        state = fam.config_state_dict(state) if fam else state
        try:
            cfg = infer_config(state, num_heads)
        except VitedgeError:
            other = detect_family(checkpoint.state_dict)
            if fam and other and other != fam.name:
                raise VitedgeError(
                    f"{checkpoint.path} is not a '{fam.name}' checkpoint: its keys look like family '{other}'; pass --family {other}"
                ) from None
            raise
    zero = [f"{name} {getattr(cfg, name)}" for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "img_size")
            if getattr(cfg, name) < 1]
    if zero:
        raise VitedgeError(f"{checkpoint.path} describes an impossible model ({', '.join(zero)}); "
                           "is this a ViT checkpoint in an official layout?")
    cfg = cfg.with_img_size(img_size) if img_size is not None else cfg
    if cfg.embed_dim % cfg.num_heads:
        raise VitedgeError(f"{cfg.num_heads} heads do not divide the embedding width {cfg.embed_dim}; pass --num-heads "
                           f"with a divisor of {cfg.embed_dim}")
    require_memory(forward_bytes(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, 1, cfg.in_chans),
                   f"a {cfg.img_size} px input ({cfg.num_patches + 1} tokens)", "pick a smaller --img-size")
    return cfg


def load_model(
    checkpoint: str | Path | Checkpoint,
    family: str | None = None,
    arch: str | None = None,
    settings: dict | None = None,
    img_size: int | None = None,
    num_heads: int | None = None,
) -> LoadedModel:
    """Read ``checkpoint`` and build the reference model of ``family`` (eval mode) with its weights."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    family_name = family or ckpt.metadata.get("family")
    if not family_name:
        guess = detect_family(ckpt.state_dict)
        hint = f" (its keys look like '{guess}')" if guess else ""
        raise VitedgeError(f"{ckpt.path} does not say its family{hint}; pass --family")
    fam = get_family(family_name)
    cfg = resolve_config(ckpt, arch, num_heads, img_size, fam)
    check_support(fam.name, cfg, fam.backbone_features)
    # Settings a vitedge checkpoint was trained with are defaults for its own family only.
    trained = ckpt.metadata.get("settings", {}) if family_name == ckpt.metadata.get("family") else {}
    resolved = fam.resolve_settings(cfg, {**trained, **(settings or {})})
    state, dropped = fam.adapt_state_dict(adapt_backbone_keys(ckpt.state_dict))
    if "pos_embed" in state and state["pos_embed"].shape[1] != cfg.num_patches + cfg.pos_prefix_tokens:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], cfg.grid_size, cfg.pos_prefix_tokens)
    model = fam.reference(cfg, resolved)
    _load_weights(model, state, ckpt.path, fam, cfg)
    model.eval()
    model.set_fused_attention(True)
    mean, std = default_normalization(cfg.in_chans)
    mean = tuple(ckpt.metadata.get("mean", mean))
    std = tuple(ckpt.metadata.get("std", std))
    return LoadedModel(model, fam, cfg, resolved, fam.token_plan(cfg, resolved), ckpt, mean, std, dropped)


def _load_weights(model: nn.Module, state: dict, path: Path, fam: Family, cfg: ViTConfig) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        other = detect_family(state)
        hint = f"; its keys look like family '{other}'" if other and other != fam.name else ""
        if lvvit.matches(state) != (cfg.backbone == "lvvit"):
            layout = "an LV-ViT (conv stem patch_embed.conv1..3)" if lvvit.matches(state) else "a timm ViT (no conv stem)"
            hint += f"; the checkpoint is {layout} but the arch is {cfg.backbone}: drop --arch to read the backbone off the weights"
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise VitedgeError(f"{path} is not a '{fam.name}' checkpoint: {'; '.join(parts)}{hint}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise VitedgeError(
                f"{path} does not match arch (embed {cfg.embed_dim}, depth {cfg.depth}, {cfg.img_size}px): "
                f"{key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
            )
    check_weights(state, expected, path)
    model.load_state_dict(state, strict=True)


def reference_from_metadata(metadata: dict, checkpoint=None, img_size: int | None = None) -> LoadedModel:
    """Rebuild the reference model an artifact was exported from (checks the checkpoint's hash).

    ``img_size`` builds it for another input size of a dynamic-resolution artifact.
    """
    source = metadata["checkpoint"]
    path = Path(checkpoint or source["path"])
    loaded = load_model(
        path,
        family=metadata["family"],
        settings=metadata["settings"],
        img_size=img_size or metadata["arch"]["img_size"],
        num_heads=metadata["arch"]["num_heads"],
    )
    if loaded.checkpoint.sha256 != source["sha256"]:
        raise VitedgeError(f"{path} is not the checkpoint this artifact was exported from (sha256 differs); re-export")
    return loaded


def check_weights(state: dict, expected: dict, path: Path) -> None:
    """Refuse weights an export would carry silently: integer or bool tensors where the model has floats, NaN, Inf.

    Casting an int or bool tensor to float hides a wrong file; NaN and Inf propagate into
    every logit, and Inf even passes a logit-difference check (inf - inf is NaN).
    """
    def names(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    wrong = [f"{k} ({state[k].dtype})".replace("torch.", "") for k, t in expected.items()
             if t.is_floating_point() and not state[k].is_floating_point()]
    if wrong:
        raise VitedgeError(f"{path} holds non-float weights where the model has float ones: {names(wrong)}; "
                           "is this the right checkpoint?")
    bad = [k for k, t in expected.items() if t.is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if bad:
        kinds = {"NaN" if bool(torch.isnan(state[k]).any()) else "Inf" for k in bad}
        raise VitedgeError(f"{path} holds {' and '.join(sorted(kinds))} weights in {len(bad)} tensor(s): {names(bad)}; "
                           "the checkpoint is damaged (or the training diverged)")
