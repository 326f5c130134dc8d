"""vitedge: deploy adaptive Vision Transformers as static, validated ONNX artifacts.

Public API (each CLI command is a thin shell over one of these)::

    import vitedge
    vitedge.export("models/fmnist-evit.safetensors", "out/fmnist-evit")
    vitedge.validate("out/fmnist-evit", data="fashion-mnist", limit=1000)
    vitedge.profile("out/fmnist-evit", backend="ort", device="x86-cpu", latency_budget_ms=20)
    vitedge.build("out/fmnist-evit", precision="fp16", device="orin-nano-8gb")   # TensorRT
"""

from .version import __version__  # noqa: E402

from . import interrupts as _interrupts  # noqa: E402 - before torch/onnx load, so Ctrl-C at start-up exits cleanly

if _interrupts.running_as_command():
    _interrupts.install()

from .artifact import Artifact  # noqa: E402
from .build import build  # noqa: E402
from .bundle import export_bundle, load_bundle, profile_bundle, select  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .devices import available_devices, get_device  # noqa: E402
from .errors import BackendMissing, BudgetMissed, BuildFailed, ValidationFailed, VitedgeError  # noqa: E402
from .families import available_families, get_family  # noqa: E402
from .load import load_model  # noqa: E402
from .optimize import optimize  # noqa: E402
from .pipeline import check, export, inspect, predict, predict_file, predict_images  # noqa: E402
from .profile import profile  # noqa: E402
from .quantize import quantize, validate_quantized  # noqa: E402
from .rewrite import to_static  # noqa: E402
from .staircase import profile_tokens  # noqa: E402
from .tune import tune  # noqa: E402
from .validate import Thresholds, validate  # noqa: E402

__all__ = [
    "BackendMissing", "BudgetMissed", "BuildFailed", "available_devices", "build", "get_device",
    "Artifact", "available_families", "calibrate", "check", "export", "get_family", "inspect", "load_model", "optimize", "predict",
    "predict_file", "predict_images", "profile", "profile_tokens", "quantize", "to_static", "tune", "validate", "Thresholds",
    "ValidationFailed",
    "VitedgeError", "export_bundle", "load_bundle", "profile_bundle", "select", "validate_quantized",
]
