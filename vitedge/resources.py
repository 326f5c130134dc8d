"""Input limits before allocation: a size or batch the machine cannot hold is one line, not an allocator crash.

The estimate is deliberately rough (the attention maps and activations of one forward
pass, times a margin for the exporter's and ONNX Runtime's copies); it only has to tell
"fits" from "hundreds of gigabytes". ``VITEDGE_MEMORY_LIMIT`` overrides the memory
available (bytes, or with a K/M/G/T suffix; ``none`` turns the check off).
"""

from __future__ import annotations

import os

from .errors import VitedgeError

ENV_VAR = "VITEDGE_MEMORY_LIMIT"
# The exporter traces, ONNX Runtime plans its arena and the reference runs beside it.
MARGIN = 4


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``VITEDGE_MEMORY_LIMIT``, else MemAvailable (None: unknown/unlimited)."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        if override.lower() in ("none", "off", "unlimited"):
            return None
        try:
            scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(override[-1].lower(), 1)
            return int(float(override[:-1] if scale > 1 else override) * scale)
        except ValueError:
            raise VitedgeError(f"{ENV_VAR} must be a number of bytes such as 64G (or 'none'), got {override!r}") from None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"


def require_memory(nbytes: float, what: str, hint: str) -> None:
    """Refuse ``what`` when it needs more than the memory available (one line, before anything is allocated)."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise VitedgeError(f"{what} needs about {_size(nbytes)} of memory, {_size(available)} is available; {hint} "
                           f"(or set {ENV_VAR} to override)")


def forward_bytes(img_size: int, patch_size: int, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                  batch: int = 1, in_chans: int = 3) -> float:
    """Float32 bytes of one ViT forward pass of ``batch`` images, with the margin for the tools around it."""
    tokens = (img_size // max(1, patch_size)) ** 2 + 1
    per_image = num_heads * tokens * tokens + tokens * embed_dim * (4 + 2 * mlp_ratio) + in_chans * img_size * img_size
    return 4.0 * MARGIN * batch * per_image


__all__ = ["ENV_VAR", "available_memory", "forward_bytes", "require_memory"]
