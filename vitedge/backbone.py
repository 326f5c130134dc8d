"""The timm ViT backbone under its historical import path; it lives in ``vitedge.backbones.vit``."""

from .backbones.vit import *  # noqa: F401,F403
from .backbones.vit import _init_weights  # noqa: F401
from .backbones import dense_flops  # noqa: F401,E402 - every backbone's, over vit.py's ViT-only count
