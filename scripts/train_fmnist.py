"""Train the small Fashion-MNIST demo models that ship in models/.

Stages (each reads the previous one's checkpoint):
  dense       a plain ViT (arch vit_fmnist) trained from scratch
  evit        the dense weights fine-tuned with EViT's token dropping + fusing (keep 0.7)
  dynamicvit  the dense weights plus DynamicViT score predictors, trained with the paper's
              Gumbel-softmax masking, keep-ratio loss and distillation from the dense model
  castling    a Castling-ViT (linear-angular attention + the training-only masked-softmax
              branch) trained from scratch exactly like 'dense', for a like-for-like accuracy
  evovit      the dense weights (qkv split into qk and v) fine-tuned as Evo-ViT (keep 0.5 at
              blocks 4 and 8), with the official loss on both the mean-token and class-token heads
  supervit    the dense weights as a SuperViT (position tables for 16/20/24/28 px, keep rates
              0.5/0.7/1), a random (size, keep rate) per batch distilled from the full model
              (1 epoch, two forward passes per batch)
  tome        the dense weights fine-tuned 1 epoch with ToMe merging on (r = 3 per block,
              proportional attention), as the paper fine-tunes with merging in the loop
  avit        the dense weights fine-tuned with A-ViT's per-token halting: ponder loss, the
              Gaussian halting-distribution prior (KL) and distillation from the dense model
  ats         the dense weights fine-tuned 1 epoch with ATS sampling (blocks 3..11, K = 50 =
              all tokens), batched through the static twin (same function as the reference)

Usage: python scripts/train_fmnist.py all|STAGE [--epochs N] [--out models/] [--threads N]
On 2 idle CPU cores a dense epoch takes about 1.7 min (5 epochs); the fine-tuning stages run
2 epochs each (avit: 1). The two fine-tuning stages can run side by side with --threads 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitedge.backbone import ARCHS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, VisionTransformer  # noqa: E402
from vitedge.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from vitedge.families import get_family  # noqa: E402


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0).unsqueeze(1)
    return (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 px (zero-padded crop)."""
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-FASHION_MNIST_MEAN[0] / FASHION_MNIST_STD[0])
    dx, dy = np.random.randint(0, 5, size=2)
    return padded[..., dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(images[start : start + batch])
        logits = logits[0] if isinstance(logits, tuple) else logits
        correct += (logits.argmax(-1) == labels[start : start + batch]).sum().item()
    return correct / len(images)


def train(model, loss_fn, epochs: int, lr: float, train_x, train_y, test_x, test_y, batch: int = 128):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(train_x) / batch)
    warmup = min(200, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x))
        started, seen, running = time.time(), 0, 0.0
        for start in range(0, len(train_x), batch):
            idx = order[start : start + batch]
            loss = loss_fn(model, augment(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            seen += 1
            running += loss.item()
            if seen % 100 == 0:
                print(f"  epoch {epoch + 1} step {seen} loss {running / 100:.4f} ({time.time() - started:.0f}s)", flush=True)
                running = 0.0
        accuracy = evaluate(model, test_x, test_y)
        print(f"epoch {epoch + 1}/{epochs}: test accuracy {accuracy:.4f} ({time.time() - started:.0f}s)", flush=True)
    return evaluate(model, test_x, test_y)


def save(model, path: Path, family: str, cfg, settings: dict, accuracy: float) -> None:
    from safetensors.torch import save_file

    info = {"family": family, "arch": cfg.to_dict(), "settings": settings,
            "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD,
            "trained_on": "fashion-mnist train (60k)", "test_accuracy": round(accuracy, 4)}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"vitedge": json.dumps(info)})


def cross_entropy(model, images, labels):
    return F.cross_entropy(model(images), labels, label_smoothing=0.1)


def build_dense(cfg, out: Path):
    return VisionTransformer(cfg), cross_entropy, 5, 1e-3, {}


def load_dense(out: Path) -> dict:
    from safetensors.torch import load_file

    path = out / "fmnist-deit.safetensors"
    if not path.exists():
        sys.exit(f"{path} is missing: run the 'dense' stage first")
    return load_file(str(path))


def build_evit(cfg, out: Path):
    settings = {"keep_rate": 0.7}
    family = get_family("evit")
    model = family.reference(cfg, family.resolve_settings(cfg, settings))
    model.load_state_dict(load_dense(out))
    model.set_fused_attention(True)
    return model, cross_entropy, 2, 2e-4, settings


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's training-time attention: dropped tokens (policy 0) are invisible to others."""
    tokens = policy.shape[1]
    visible = policy.reshape(policy.shape[0], 1, 1, tokens)
    eye = torch.eye(tokens, device=logits.device).view(1, 1, tokens, tokens)
    visible = visible + (1.0 - visible) * eye
    weights = (logits - logits.max(dim=-1, keepdim=True).values).exp() * visible
    return (weights + eps / tokens) / (weights.sum(dim=-1, keepdim=True) + eps)


def block_with_policy(block, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    q, k, v = attn.qkv_heads(block.norm1(x))
    weights = softmax_with_policy((q * attn.scale) @ k.transpose(-2, -1), policy)
    x = x + attn.merge_heads(weights @ v)
    return x + block.mlp(block.norm2(x))


def dynamicvit_train_forward(model, images):
    """The official training forward: Gumbel-softmax keep decisions, masked attention."""
    x = model.embed(images)
    batch, patches = x.shape[0], x.shape[1] - 1
    decision = torch.ones(batch, patches, 1)
    policy = torch.ones(batch, patches + 1, 1)
    decisions = []
    for i, block in enumerate(model.blocks):
        if i in model.prune_blocks:
            step = model.prune_blocks.index(i)
            scores = model.score_predictor[step](x[:, 1:], decision)
            decision = F.gumbel_softmax(scores, hard=True)[..., :1] * decision
            decisions.append(decision.squeeze(-1))
            policy = torch.cat([torch.ones(batch, 1, 1), decision], dim=1)
        x = block_with_policy(block, x, policy)
    return model.classify(x), decisions


def build_dynamicvit(cfg, out: Path):
    settings = {"keep_rate": 0.7}
    family = get_family("dynamicvit")
    model = family.reference(cfg, family.resolve_settings(cfg, settings))
    missing = model.load_state_dict(load_dense(out), strict=False).missing_keys
    assert all(k.startswith("score_predictor.") for k in missing), missing
    teacher = VisionTransformer(cfg)
    teacher.load_state_dict(load_dense(out))
    teacher.eval().set_fused_attention(True)
    targets = [settings["keep_rate"] ** (s + 1) for s in range(len(model.prune_blocks))]

    def loss_fn(model, images, labels):
        if not model.training:
            return cross_entropy(model, images, labels)
        logits, decisions = dynamicvit_train_forward(model, images)
        with torch.no_grad():
            teacher_logits = teacher(images)
        ratio = sum(((d.mean(dim=1) - t) ** 2).mean() for d, t in zip(decisions, targets))
        distill = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean", log_target=True)
        return F.cross_entropy(logits, labels, label_smoothing=0.1) + 2.0 * ratio + 0.5 * distill

    return model, loss_fn, 2, 3e-4, settings


def build_castling(cfg, out: Path):
    """Castling-ViT from scratch with the dense recipe; in train() mode its attention adds the
    auxiliary masked-softmax branch, which the exported inference graph drops."""
    model = get_family("castling").reference(cfg, {})
    return model, cross_entropy, 5, 1e-3, {}


def evovit_weights_from_dense(dense: dict) -> dict:
    """The dense ViT's weights in Evo-ViT's official layout: qkv split into ``qks.i.qk`` and ``vs.i.v``."""
    state = {}
    for key, value in dense.items():
        parts = key.split(".")
        if key.startswith("blocks.") and parts[2] in ("norm1", "attn"):
            i, name = parts[1], ".".join(parts[2:])
            channels = value.shape[0] // 3
            if name.startswith("attn.qkv."):
                state[f"qks.{i}.qk.{parts[-1]}"] = value[: 2 * channels].clone()
                state[f"vs.{i}.v.{parts[-1]}"] = value[2 * channels :].clone()
            elif name.startswith("attn.proj."):
                state[f"projs.{i}.{parts[-1]}"] = value
            else:
                state[f"norms.{i}.{parts[-1]}"] = value
        else:
            state[key] = value
    return state


def build_evovit(cfg, out: Path):
    """Evo-ViT (keep 0.5 at blocks 4 and 8) from the dense weights, with the official training loss:
    half on the head over the mean of patch tokens, half on a training-only class-token head
    (``head_cls`` / ``norm_cls``, initialised from the dense head and norm, not saved)."""
    settings = {"keep_rate": 0.5}
    family = get_family("evovit")
    model = family.reference(cfg, family.resolve_settings(cfg, settings))
    dense = load_dense(out)
    model.load_state_dict(evovit_weights_from_dense(dense))
    model.head_cls = torch.nn.Linear(cfg.embed_dim, cfg.num_classes)
    model.norm_cls = torch.nn.LayerNorm(cfg.embed_dim, eps=1e-6)
    model.head_cls.load_state_dict({k[len("head."):]: v for k, v in dense.items() if k.startswith("head.")})
    model.norm_cls.load_state_dict({k[len("norm."):]: v for k, v in dense.items() if k.startswith("norm.")})
    model.training_only_modules = ("head_cls", "norm_cls")

    def loss_fn(model, images, labels):
        x, _ = model.forward_features(images)
        loss_mean = F.cross_entropy(model.classify(x), labels, label_smoothing=0.1)
        loss_cls = F.cross_entropy(model.head_cls(model.norm_cls(x[:, 0])), labels, label_smoothing=0.1)
        return 0.5 * loss_mean + 0.5 * loss_cls

    return model, loss_fn, 2, 2e-4, settings


def build_supervit(cfg, out: Path):
    """SuperViT's recipe, simplified. The official step runs four sub-networks per batch: the
    largest size at keep 1 (cross-entropy), it at keep < 1 (KL to the former's detached output),
    a random smaller size at keep 1 (cross-entropy) and at keep < 1 (KL to it). Here each batch
    runs two: the full model (28 px, keep 1) learns from the labels, and one (size, keep rate)
    drawn uniformly from the other 11 variants learns from the full model's detached output
    (KL), half the cost per step. The smaller sizes' position tables start as the dense table
    resampled (bicubic) to their grids."""
    from vitedge.backbone import resample_pos_embed

    family = get_family("supervit")
    settings = {"resolutions": [16, 20, 24, 28], "keep_rates": [0.5, 0.7, 1.0]}
    resolved = family.resolve_settings(cfg, settings)
    model = family.reference(cfg, resolved)
    dense = load_dense(out)
    table = dense.pop("pos_embed")
    for i, size in enumerate(resolved["resolutions"]):
        dense[f"pos_embed_list.{i}"] = resample_pos_embed(table, size // cfg.patch_size)
    model.load_state_dict(dense)
    model.set_fused_attention(True)
    full = (max(resolved["resolutions"]), 1.0)
    others = [(s, r) for s in resolved["resolutions"] for r in resolved["keep_rates"] if (s, r) != full]

    def loss_fn(model, images, labels):
        model.set_variant(*full)
        full_logits = model(images)
        loss = F.cross_entropy(full_logits, labels, label_smoothing=0.1)
        model.set_variant(*others[torch.randint(len(others), ()).item()])
        sub = F.log_softmax(model(images), dim=-1)
        loss = loss + F.kl_div(sub, F.softmax(full_logits.detach(), dim=-1), reduction="batchmean")
        model.set_variant(resolved["resolution"], resolved["keep_rate"])  # evaluation: the default variant
        return loss

    return model, loss_fn, 1, 2e-4, settings


def build_tome(cfg, out: Path):
    """ToMe needs no new parameters: the dense weights, trained with 3 of the 50 tokens merged per block."""
    settings = {"merge_count": 3, "prop_attn": True}
    family = get_family("tome")
    model = family.reference(cfg, family.resolve_settings(cfg, settings))
    model.load_state_dict(load_dense(out))
    model.set_fused_attention(True)
    return model, cross_entropy, 1, 2e-4, settings


# A-ViT on the 12-block, 64-dim demo model. Channel 0 of the dense model's block outputs is
# about N(0, 1), so the official gates (10, 30) would never halt in one epoch; 5 / 3 gives
# h = 0.5 at channel 0 = 0.6. Loss weights are larger than the official ImageNet ones (0.0005,
# 0.001) for the same reason: one epoch instead of a hundred.
AVIT_SETTINGS = {"gate_scale": 5.0, "gate_center": 3.0}
AVIT_PONDER_SCALE = 0.03
AVIT_PRIOR_ALPHA = 0.1
AVIT_TARGET_DEPTH = 5


def halting_prior(depth: int, target_depth: int, buffer: float = 0.02) -> torch.Tensor:
    """The official Gaussian target over halting blocks (``get_distribution_target``): a unit-
    variance Gaussian centred at ``target_depth``, scaled so its first ``target_depth`` entries sum to 1 - buffer."""
    blocks = torch.arange(depth, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (blocks - target_depth) ** 2) / math.sqrt(2 * math.pi)
    return (pdf * (1.0 - buffer) / pdf[:target_depth].sum()).float()


def avit_train_forward(model, images):
    """The official training forward (``forward_features_act_token``): logits, the ponder cost
    per token (blocks run + remainder at halting) and the mean halting score of every block."""
    from vitedge.families.avit import act_weights, halting_score, masked_block

    x = model.embed(images)
    batch, tokens = x.shape[:2]
    c = x.new_zeros(batch, tokens)
    remainder = x.new_ones(batch, tokens)
    output = torch.zeros_like(x)
    ponder = x.new_zeros(batch, tokens)
    layer_scores = []
    for i, block in enumerate(model.blocks):
        active = c < 1 - model.eps
        x = masked_block(block, x, active)
        h = halting_score(x, model.gate_scale, model.gate_center)
        layer_scores.append(h.mean())
        if i == len(model.blocks) - 1:
            h = torch.ones_like(h)
        previous_remainder = remainder
        c, remainder, _, weight = act_weights(c, remainder, h, model.eps)
        reached = (c > 1 - model.eps) & active
        ponder = ponder + active.float() + previous_remainder * reached.float()
        output = output + x * (weight * active).unsqueeze(-1)
    return model.head(model.norm(output)[:, 0]), ponder, torch.stack(layer_scores)


def build_avit(cfg, out: Path):
    family = get_family("avit")
    settings = dict(AVIT_SETTINGS)
    model = family.reference(cfg, family.resolve_settings(cfg, settings))
    model.load_state_dict(load_dense(out))
    model.set_fused_attention(True)
    teacher = VisionTransformer(cfg)
    teacher.load_state_dict(load_dense(out))
    teacher.eval().set_fused_attention(True)
    target = halting_prior(cfg.depth, AVIT_TARGET_DEPTH)

    def loss_fn(model, images, labels):
        if not model.training:
            return cross_entropy(model, images, labels)
        logits, ponder, layer_scores = avit_train_forward(model, images)
        with torch.no_grad():
            teacher_logits = teacher(images)
        distribution = torch.clamp(layer_scores / layer_scores.sum(), 0.01, 0.99)
        prior = F.kl_div(distribution.log(), target, reduction="batchmean")
        distill = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean", log_target=True)
        return (F.cross_entropy(logits, labels, label_smoothing=0.1) + AVIT_PONDER_SCALE * ponder.mean()
                + AVIT_PRIOR_ALPHA * prior + 0.5 * distill)

    return model, loss_fn, 1, 3e-4, settings


def build_ats(cfg, out: Path):
    """ATS has no parameters: fine-tune the dense weights through the sampler. The static twin
    computes the per-image reference function on whole batches, so it is what trains."""
    from vitedge.rewrite import to_static

    settings = {}
    family = get_family("ats")
    resolved = family.resolve_settings(cfg, settings)
    reference = family.reference(cfg, resolved)
    reference.load_state_dict(load_dense(out))
    return to_static(reference, family.token_plan(cfg, resolved)), cross_entropy, 1, 2e-4, resolved


STAGES = {
    "dense": build_dense,
    "evit": build_evit,
    "dynamicvit": build_dynamicvit,
    "castling": build_castling,
    "evovit": build_evovit,
    "supervit": build_supervit,
    "tome": build_tome,
    "avit": build_avit,
    "ats": build_ats,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["all", *STAGES])
    parser.add_argument("--epochs", type=int, default=None, help="override the stage's default epochs")
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    data = (to_tensor(train_images), torch.from_numpy(train_labels), to_tensor(test_images), torch.from_numpy(test_labels))
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ARCHS["vit_fmnist"]
    started = time.time()
    for stage in STAGES if args.stage == "all" else [args.stage]:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        print(f"== stage {stage}", flush=True)
        model, loss_fn, epochs, lr, settings = STAGES[stage](cfg, args.out)
        accuracy = train(model, loss_fn, args.epochs or epochs, lr, *data)
        for name in getattr(model, "training_only_modules", ()):
            delattr(model, name)  # e.g. Evo-ViT's class-token head: it serves a training loss only
        family = "deit" if stage == "dense" else stage
        path = args.out / f"fmnist-{family}.safetensors"
        save(model, path, family, cfg, settings, accuracy)
        print(json.dumps({"checkpoint": str(path), "family": family, "test_accuracy": accuracy,
                          "minutes_so_far": round((time.time() - started) / 60, 1)}), flush=True)


if __name__ == "__main__":
    main()
