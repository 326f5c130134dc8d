"""Train the small Fashion-MNIST demo models that ship in models/.

Stages (each reads the previous one's checkpoint):
  dense       a plain ViT (arch vit_fmnist) trained from scratch
  evit        the dense weights fine-tuned with EViT's token dropping + fusing (keep 0.7)
  dynamicvit  the dense weights plus DynamicViT score predictors, trained with the paper's
              Gumbel-softmax masking, keep-ratio loss and distillation from the dense model
  castling    a Castling-ViT (linear-angular attention + the training-only masked-softmax
              branch) trained from scratch exactly like 'dense', for a like-for-like accuracy
  ats         the dense weights fine-tuned 1 epoch with ATS sampling (blocks 3..11, K = 50 =
              all tokens), batched through the static twin (same function as the reference)

Usage: python scripts/train_fmnist.py all|dense|evit|dynamicvit|castling|ats [--epochs N] [--out models/]
On 2 idle CPU cores a dense epoch takes about 1.7 min (5 epochs); the fine-tuning stages run
2 epochs each. The two fine-tuning stages can run side by side with --threads 1.
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


STAGES = {"dense": build_dense, "evit": build_evit, "dynamicvit": build_dynamicvit, "castling": build_castling,
          "ats": build_ats}


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
        family = "deit" if stage == "dense" else stage
        path = args.out / f"fmnist-{family}.safetensors"
        save(model, path, family, cfg, settings, accuracy)
        print(json.dumps({"checkpoint": str(path), "family": family, "test_accuracy": accuracy,
                          "minutes_so_far": round((time.time() - started) / 60, 1)}), flush=True)


if __name__ == "__main__":
    main()
