"""vitedge: deploy adaptive Vision Transformers as static, validated ONNX artifacts.

Public API (each CLI command is a thin shell over one of these)::

    import vitedge
    vitedge.export("models/fmnist-evit.safetensors", "out/evit")
    vitedge.validate("out/evit", data="fashion-mnist", limit=1000)
    vitedge.profile("out/evit", backend="ort")
"""

__version__ = "0.1.0"

from .artifact import Artifact  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .errors import ValidationFailed, VitedgeError  # noqa: E402
from .families import available_families, get_family  # noqa: E402
from .load import load_model  # noqa: E402
from .pipeline import check, export, inspect, predict, predict_file  # noqa: E402
from .profile import profile  # noqa: E402
from .rewrite import to_static  # noqa: E402
from .validate import Thresholds, validate  # noqa: E402

__all__ = [
    "Artifact", "available_families", "calibrate", "check", "export", "get_family", "inspect", "load_model", "predict",
    "predict_file", "profile", "to_static", "validate", "Thresholds", "ValidationFailed", "VitedgeError",
]
