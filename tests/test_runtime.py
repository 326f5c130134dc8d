"""vitedge.runtime: the ONNX Runtime sessions every stage runs, and their batching."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vitedge.errors import VitedgeError
from vitedge.runtime import FLUSH_DENORMALS, ort_session, run_batched


def product_graph(path, batch=None):
    """y = x * 1e-10: a denormal result for x = 1e-30 (float32's normal range ends at 1.18e-38)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch or "batch", 4])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1], [1e-10])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "scale"], ["y"])], "product", [x], [y], [scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_sessions_flush_denormals_to_zero(tmp_path):
    path = product_graph(tmp_path / "product.onnx")
    session = ort_session(path)
    assert session.get_session_options().get_session_config_entry(FLUSH_DENORMALS) == "1"
    (y,) = session.run(None, {"x": np.full((2, 4), 1e-30, np.float32)})
    assert np.all(y == 0.0)
    normal = session.run(None, {"x": np.full((1, 4), 1e-20, np.float32)})[0]
    np.testing.assert_allclose(normal, 1e-30, rtol=1e-6)  # only the denormal range is flushed


def test_flush_can_be_turned_off_for_measurements(tmp_path):
    """In a fresh process (the first session decides the calling thread's mode), off keeps denormals."""
    path = product_graph(tmp_path / "product.onnx")
    script = textwrap.dedent(f"""
        import numpy as np
        from vitedge.runtime import ort_session
        session = ort_session({str(path)!r}, threads=1, flush_denormals=False)
        print(float(session.run(None, {{"x": np.full((1, 4), 1e-30, np.float32)}})[0][0, 0]))
    """)
    value = float(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert 0.0 < value < 1.2e-38


def test_unloadable_model_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(VitedgeError, match="ONNX Runtime cannot load"):
        ort_session(bad)


def test_run_batched_pads_a_fixed_batch_and_trims(tmp_path):
    session = ort_session(product_graph(tmp_path / "fixed.onnx", batch=4))
    images = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    (y,) = run_batched(session, images)
    assert y.shape == (10, 4)
    np.testing.assert_allclose(y, images * np.float32(1e-10), rtol=1e-6)
