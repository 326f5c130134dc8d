"""docker/: what each image does at build time and what it leaves to run time (no Docker here).

A Jetson's ``docker build`` RUN steps see the host's TensorRT, GPU driver and DLA libraries only
when the daemon's default runtime is nvidia, so the Jetson image must not load TensorRT or
build the TensorRT program then; docker/demo.sh does both when the container runs.
"""

from __future__ import annotations

import re
import subprocess

from support import REPO

DOCKER = REPO / "docker"


def run_steps(dockerfile: str) -> list[str]:
    """The RUN instructions of a Dockerfile, continuation lines joined."""
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def test_the_jetson_image_loads_no_tensorrt_at_build_time():
    steps = " ".join(run_steps("Dockerfile.jetson"))
    assert "import tensorrt" not in steps and "cmake -S" not in steps and "cmake --build" not in steps
    assert '-e ".[trt-jetpack6]"' in steps  # cuda-python of JetPack 6's CUDA 12.6
    demo = (DOCKER / "demo.sh").read_text()
    assert "import tensorrt" in demo and "--runtime nvidia" in demo and "cmake --build" in demo


def test_the_images_install_the_cpu_torch_pinned():
    for dockerfile in ("Dockerfile.jetson", "Dockerfile.x86"):
        steps = " ".join(run_steps(dockerfile))
        installs = re.findall(r'pip install "torch[^"]*"[^&]*', steps)
        assert installs and all("==${TORCH_VERSION}" in i and "download.pytorch.org/whl/cpu" in i for i in installs), installs
        assert "ARG TORCH_VERSION=" in (DOCKER / dockerfile).read_text()


def test_demo_builds_fp16_from_the_fp16_model():
    demo = (DOCKER / "demo.sh").read_text()
    assert demo.index("vitedge quantize \"$OUT\" --precision fp16") < demo.index("vitedge build")
    assert subprocess.run(["bash", "-n", str(DOCKER / "demo.sh")]).returncode == 0
