"""vitedge.devices: the shipped device profiles, user profiles, and bad profiles or names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import REPO, run_cli

from vitedge.devices import ENV_VAR, available_devices, get_device
from vitedge.errors import VitedgeError

SHIPPED = {"orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "xavier-nx", "x86-l4", "x86-cpu"}


def test_the_shipped_profiles_carry_the_published_figures():
    devices = available_devices()
    assert SHIPPED <= set(devices)
    nano, nx, agx, xavier = (devices[n].raw for n in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "xavier-nx"))
    assert (nano["gpu"]["compute_capability"], nano["gpu"]["cuda_cores"], nano["gpu"]["tensor_cores"]) == ("8.7", 1024, 32)
    assert nano["dla_cores"] == 0 and nano["memory"]["bandwidth_gbs"] == 68
    assert (nano["peak"]["int8_tops_sparse"], nano["peak"]["int8_tops_sparse_super"]) == (40, 67)
    assert nx["gpu"]["compute_capability"] == "8.7" and nx["dla_cores"] == 2
    assert (nx["peak"]["int8_tops_sparse"], nx["peak"]["int8_tops_sparse_super"]) == (100, 157)
    assert agx["dla_cores"] == 2 and agx["peak"]["int8_tops_sparse"] == 275 and agx["memory"]["bandwidth_gbs"] == 204.8
    assert xavier["gpu"]["compute_capability"] == "7.2" and xavier["dla_cores"] == 2 and xavier["peak"]["int8_tops"] == 21
    for device in devices.values():
        assert device.raw["sources"], f"{device.name} cites no source"
        assert device.latency_budget_ms and device.latency_budget_ms > 0
    assert devices["x86-cpu"].backends == ("ort", "torch") and devices["x86-cpu"].compute_capability is None
    assert all(devices[n].backends == ("trt",) for n in SHIPPED - {"x86-cpu"})


def test_the_profiles_ship_as_package_data():
    """pyproject's package-data pattern covers every shipped YAML (else an installed vitedge has no devices)."""
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vitedge"]
    shipped = sorted((REPO / "vitedge" / "devices").glob("*.yaml"))
    assert len(shipped) >= 6
    assert all(any(p.relative_to(REPO / "vitedge").match(pattern) for pattern in patterns) for p in shipped)


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(VitedgeError, match="unknown device 'orin-nano'; known devices: agx-orin-64gb, orin-nano-8gb, "):
        get_device("orin-nano")


def _write(folder: Path, stem: str, **fields) -> Path:
    data = {"name": stem, "description": "my board", "platform": "jetson", "backends": ["trt"],
            "precisions": ["fp32", "fp16"], "dla_cores": 1, "gpu": {"compute_capability": "8.7"},
            "latency_budget_ms": 12.5, **fields}
    path = folder / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_profiles_from_a_folder_and_the_environment(tmp_path, monkeypatch):
    mine, env = tmp_path / "mine", tmp_path / "env"
    mine.mkdir(), env.mkdir()
    _write(mine, "my-board")
    _write(env, "env-board", latency_budget_ms=7)
    _write(mine, "orin-nano-8gb", latency_budget_ms=5)  # replaces the shipped one
    monkeypatch.setenv(ENV_VAR, str(env))
    devices = available_devices(mine)
    assert {"my-board", "env-board"} | SHIPPED <= set(devices)
    assert devices["my-board"].dla_cores == 1 and devices["my-board"].latency_budget_ms == 12.5
    assert devices["env-board"].latency_budget_ms == 7.0
    assert devices["orin-nano-8gb"].latency_budget_ms == 5.0
    result = run_cli("devices", "--devices-dir", mine)
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == sorted(names) and "my-board" in names and "env-board" in names


@pytest.mark.parametrize("fields, message", [
    ({"backends": ["tensorflow"]}, "backends must be a list from trt, ort, torch"),
    ({"precisions": ["int4"]}, "precisions must be a list from"),
    ({"latency_budget_ms": 0}, "latency_budget_ms must be a positive number"),
    ({"latency_budget_ms": "fast"}, "latency_budget_ms must be a positive number"),
    ({"dla_cores": -1}, "dla_cores must be an integer >= 0"),
    ({"name": "other-name"}, "names itself 'other-name'; the name must be the file name 'bad'"),
])
def test_bad_user_profiles_fail_in_one_line(tmp_path, fields, message):
    _write(tmp_path, "bad", **fields)
    with pytest.raises(VitedgeError, match=message):
        available_devices(tmp_path)


def test_unreadable_profiles_and_folders(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(VitedgeError, match="cannot read device profile .*broken.yaml"):
        available_devices(tmp_path)
    (tmp_path / "broken.yaml").write_text("- a list\n")
    with pytest.raises(VitedgeError, match="is not a YAML mapping"):
        available_devices(tmp_path)
    (tmp_path / "broken.yaml").write_text("name: broken\n")
    with pytest.raises(VitedgeError, match="lacks description, platform, backends, precisions"):
        available_devices(tmp_path)
    with pytest.raises(VitedgeError, match="device profile folder .*nowhere does not exist"):
        available_devices(tmp_path / "nowhere")
    result = run_cli("devices", "--devices-dir", tmp_path / "nowhere")
    assert result.exit_code == 2 and result.stderr.startswith("vitedge: error: device profile folder")


def _extras() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _spec(extra: list[str], package: str):
    from packaging.requirements import Requirement

    return next(Requirement(r).specifier for r in extra if Requirement(r).name == package)


def test_trt_extras_pin_tensorrt_and_cuda_python_per_cuda_major():
    """[trt-cu12] must not resolve to TensorRT 11 / cuda-python 13 (driver R580+, strongly typed only)."""
    extras = _extras()
    for name in ("trt", "trt-cu12"):
        tensorrt, cuda = _spec(extras[name], "tensorrt-cu12"), _spec(extras[name], "cuda-python")
        assert tensorrt.contains("10.3.0") and tensorrt.contains("10.16.1.11") and not tensorrt.contains("11.4.0")
        assert cuda.contains("12.6.2") and not cuda.contains("13.0.0")
    tensorrt, cuda = _spec(extras["trt-cu13"], "tensorrt-cu13"), _spec(extras["trt-cu13"], "cuda-python")
    assert tensorrt.contains("11.4.0") and not tensorrt.contains("10.16.1") and cuda.contains("13.0.1")


def test_jetpack_profiles_name_their_tensorrt_and_cuda_and_the_extra_pins_that_cuda():
    """cuda-python 12.9 fails on JetPack 6's CUDA 12.6 driver: the jetpack6 extra keeps to 12.6.x."""
    cuda = _spec(_extras()["trt-jetpack6"], "cuda-python")
    for name in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb"):
        software = get_device(name).raw["software"]
        assert (software["jetpack"], software["tensorrt"], software["cuda"]) == ("6.x", "10.3", "12.6")
        assert get_device(name).tensorrt == "10.3"
        assert cuda.contains(f"{software['cuda']}.2") and not cuda.contains("12.9.0")
    assert get_device("xavier-nx").tensorrt == "8.5" and get_device("x86-l4").tensorrt == "10.x"
