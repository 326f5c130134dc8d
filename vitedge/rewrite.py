"""Reference model → static model, by per-module-type rewrites (MMDeploy's rewriter registry).

A family registers, for each of its dynamic module types, a function that returns a static
twin sharing the same parameters, given the constant token counts of the plan. ``to_static``
walks a copy of the model and swaps every registered module.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

from torch import nn

from .backbones import prepare_for_export

if TYPE_CHECKING:  # families register their rewrites here, so this module must not import them
    from .families import TokenPlan

_REWRITES: dict[type, Callable[[nn.Module, TokenPlan], nn.Module]] = {}


def rewrites(module_type: type):
    """Register ``fn(module, plan) -> static module`` for ``module_type``."""

    def register(fn):
        _REWRITES[module_type] = fn
        return fn

    return register


def to_static(model: nn.Module, plan: TokenPlan) -> nn.Module:
    """A copy of ``model`` with every dynamic module replaced by its static twin, in eval mode.

    The copy uses the explicit attention path (no SDPA) so that it exports as plain ONNX ops.
    """
    static = copy.deepcopy(model).eval()
    root_rewrite = _REWRITES.get(type(static))
    if root_rewrite is not None:
        static = root_rewrite(static, plan)
    else:
        _swap(static, plan)
    prepare_for_export(static)
    for module in static.modules():
        if hasattr(module, "fused"):
            module.fused = False
    return static.eval()


def _swap(parent: nn.Module, plan: TokenPlan) -> None:
    for name, child in list(parent.named_children()):
        rewrite = _REWRITES.get(type(child))
        if rewrite is not None:
            setattr(parent, name, rewrite(child, plan))
        else:
            _swap(child, plan)
