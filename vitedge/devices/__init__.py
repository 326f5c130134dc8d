"""Device profiles: one YAML per target (Jetson boards, an x86 GPU, x86 CPU).

A profile says which backends and precisions a device runs, its GPU compute capability (a
TensorRT plan only runs on the GPU it was built for), its DLA cores, memory, published peak
figures with their sources, and a default latency budget. The shipped files live beside this
module; users add their own with ``--devices-dir DIR`` or ``VITEDGE_DEVICES=DIR[:DIR...]``
(a user file with a shipped name replaces the shipped one).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import VitedgeError
from ..reading import read_yaml
from ..schema import DEVICE, check

ENV_VAR = "VITEDGE_DEVICES"
BACKENDS = ("trt", "ort", "torch")
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
REQUIRED = ("name", "description", "platform", "backends", "precisions")


@dataclass(frozen=True)
class Device:
    """One device profile, as read from its YAML file."""

    name: str
    description: str
    platform: str
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    dla_cores: int = 0
    compute_capability: str | None = None
    latency_budget_ms: float | None = None
    tensorrt: str | None = None
    source: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        """What ``vitedge.json`` / ``report.json`` record about the device."""
        return {"name": self.name, "description": self.description, "platform": self.platform,
                "compute_capability": self.compute_capability, "dla_cores": self.dla_cores,
                "precisions": list(self.precisions), "backends": list(self.backends),
                "latency_budget_ms": self.latency_budget_ms, "profile_file": self.source}


def _parse(path: Path) -> Device:
    data = read_yaml(path, "device profile")
    if not isinstance(data, dict):
        raise VitedgeError(f"device profile {path} is not a YAML mapping")
    check(data, DEVICE, path, "device profile")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise VitedgeError(f"device profile {path} lacks {', '.join(missing)}")
    backends = tuple(data["backends"] or ())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise VitedgeError(f"device profile {path}: backends must be a list from {', '.join(BACKENDS)}, got {data['backends']}")
    precisions = tuple(data["precisions"] or ())
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise VitedgeError(f"device profile {path}: precisions must be a list from {', '.join(PRECISIONS)}, got {data['precisions']}")
    budget = data.get("latency_budget_ms")
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget < math.inf):
        raise VitedgeError(f"device profile {path}: latency_budget_ms must be a positive number, got {budget!r}")
    dla = data.get("dla_cores", 0)
    if not isinstance(dla, int) or isinstance(dla, bool) or dla < 0:
        raise VitedgeError(f"device profile {path}: dla_cores must be an integer >= 0, got {dla!r}")
    cc = (data.get("gpu") or {}).get("compute_capability")
    return Device(
        name=str(data["name"]), description=str(data["description"]), platform=str(data["platform"]),
        backends=backends, precisions=precisions, dla_cores=dla,
        compute_capability=None if cc is None else str(cc),
        latency_budget_ms=None if budget is None else float(budget),
        tensorrt=None if (data.get("software") or {}).get("tensorrt") is None else str(data["software"]["tensorrt"]),
        source=str(path), raw=data,
    )


def _search_dirs(devices_dir=None) -> list[Path]:
    """Shipped profiles first, then VITEDGE_DEVICES entries, then ``devices_dir``: later ones win."""
    dirs = [Path(str(resources.files(__package__)))]
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry:
            dirs.append(Path(entry))
    if devices_dir is not None:
        dirs.append(Path(devices_dir))
    for folder in dirs[1:]:
        if not folder.is_dir():
            raise VitedgeError(f"device profile folder {folder} does not exist (--devices-dir / {ENV_VAR})")
    return dirs


def available_devices(devices_dir=None) -> dict[str, Device]:
    """Every known profile by name (shipped, then the user's folders)."""
    found: dict[str, Device] = {}
    for folder in _search_dirs(devices_dir):
        for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            device = _parse(path)
            if device.name != path.stem:
                raise VitedgeError(f"device profile {path} names itself '{device.name}'; the name must be the file name '{path.stem}'")
            found[device.name] = device
    return dict(sorted(found.items()))


def get_device(name: str, devices_dir=None) -> Device:
    """The profile called ``name``, or one line listing the known ones."""
    devices = available_devices(devices_dir)
    if name not in devices:
        raise VitedgeError(f"unknown device '{name}'; known devices: {', '.join(devices)} "
                           f"(add your own YAML with --devices-dir or {ENV_VAR})")
    return devices[name]


__all__ = ["Device", "ENV_VAR", "available_devices", "get_device"]
