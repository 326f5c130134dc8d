"""Shared fixtures: checkpoints in the official key layouts, real Fashion-MNIST images, and
one exported artifact per family (session-scoped: an export takes seconds, so each family is
exported once and every test that only reads an artifact shares it; tests that write into an
artifact work on a copy, see ``support.copy_artifact``).

Helpers (official key lists, checkpoint factory, CLI contract) live in ``support.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support import HEADS, make_state_dict, quiet, run_cli

import vitedge
from vitedge.data import InputSpec, load_dataset

# Two cores shared with other work: a 2-thread torch pool spins against them and runs the
# small models 10x slower than one thread. (ONNX Runtime sessions pin their own threads.)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """``vitedge.profile(backend="torch")`` sets the thread count; put it back for the next test."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def evit_state() -> dict[str, torch.Tensor]:
    return make_state_dict("evit", seed=0)


@pytest.fixture(scope="session")
def dynamicvit_state() -> dict[str, torch.Tensor]:
    return make_state_dict("dynamicvit", seed=3)


@pytest.fixture(scope="session")
def evit_ckpt(ckpt_dir, evit_state) -> Path:
    """An EViT checkpoint as youweiliang/evit saves it: ``{"model": state_dict}`` in a .pth."""
    path = ckpt_dir / "evit_fmnist.pth"
    torch.save({"model": evit_state}, path)
    return path


@pytest.fixture(scope="session")
def dynamicvit_ckpt(ckpt_dir, dynamicvit_state) -> Path:
    path = ckpt_dir / "dynamicvit_fmnist.pth"
    torch.save({"model": dynamicvit_state}, path)
    return path


@pytest.fixture(scope="session")
def other_evit_ckpt(ckpt_dir) -> Path:
    """Same layout as ``evit_ckpt``, other weights (a different file for sha checks)."""
    path = ckpt_dir / "evit_fmnist_other.pth"
    torch.save({"model": make_state_dict("evit", seed=7)}, path)
    return path


@pytest.fixture(scope="session")
def fmnist_spec() -> InputSpec:
    return InputSpec(28, 1, (0.2860,), (0.3530,))


@pytest.fixture(scope="session")
def fmnist_batch(fmnist_spec) -> tuple[np.ndarray, np.ndarray]:
    """The first 64 Fashion-MNIST test images, normalised NCHW float32, and their labels."""
    dataset = load_dataset("fashion-mnist", limit=64)
    images, labels = next(dataset.batches(fmnist_spec, 64))
    return images, labels


@pytest.fixture(scope="session")
def evit_artifact(tmp_path_factory, evit_ckpt) -> Path:
    """EViT at keep 0.7 (blocks 3/6/9), static batch 1, exported with the Python API."""
    out = tmp_path_factory.mktemp("artifacts") / "evit"
    vitedge.export(evit_ckpt, out, family="evit", num_heads=HEADS, validate_limit=128, log=quiet)
    return out


@pytest.fixture(scope="session")
def dynamicvit_recipe(tmp_path_factory) -> Path:
    """A recipe whose keep rate (0.5) the command line overrides (0.7); its opset 17 and thresholds stand."""
    path = tmp_path_factory.mktemp("recipes") / "dynamicvit.yaml"
    path.write_text(
        "family: dynamicvit\n"
        "num_heads: 2\n"
        "keep_rate: 0.5\n"
        "opset: 17\n"
        "validation:\n"
        "  thresholds:\n"
        "    min_top1_agreement: 0.99\n"
        "    min_kept_agreement: 0.98\n"
        "    max_abs_logit_diff: 0.0005\n"
    )
    return path


@pytest.fixture(scope="session")
def dynamicvit_export(tmp_path_factory, dynamicvit_ckpt, dynamicvit_recipe):
    """DynamicViT exported through the CLI with a recipe and ``--keep-rate 0.7`` on top of it."""
    out = tmp_path_factory.mktemp("artifacts") / "dynamicvit"
    result = run_cli("export", dynamicvit_ckpt, "-o", out, "--recipe", dynamicvit_recipe,
                     "--keep-rate", "0.7", "--validate-limit", "128")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="session")
def dynamicvit_artifact(dynamicvit_export) -> Path:
    return dynamicvit_export[0]


@pytest.fixture(params=["evit", "dynamicvit"])
def artifact(request) -> Path:
    """Each family's shared artifact in turn (read-only)."""
    return request.getfixturevalue(f"{request.param}_artifact")
