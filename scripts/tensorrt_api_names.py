"""Regenerate tests/data/tensorrt_api/<version>.txt: the names each TensorRT Python binding exports.

The ``tensorrt-cu12-bindings`` / ``tensorrt-cu13-bindings`` wheels on PyPI hold the pybind11
module (``tensorrt_bindings/tensorrt.so``) and a small ``__init__.py``. The module cannot be
imported without NVIDIA's libraries, but pybind11 registers every class, attribute, method and
enum member by a C string, so the strings of the .so's read-only data (``.rodata``) are the
API's names. This keeps the identifier-like ones plus the names ``__init__.py`` defines, one per
line. tests/test_trt_runtime.py checks vitedge's TensorRT calls against them.

    python scripts/tensorrt_api_names.py                      # the versions in WHEELS
    python scripts/tensorrt_api_names.py tensorrt-cu12-bindings==10.3.0=10.3

Needs network (pip download) and binutils' ``objcopy``; the test itself needs neither.
"""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "tensorrt_api"
# requirement = the name of the list: JetPack 6's TensorRT, the newest 10.x (trt-cu12), the newest 11.x (trt-cu13)
WHEELS = {
    "tensorrt-cu12-bindings==10.3.0": "10.3",
    "tensorrt-cu12-bindings==10.16.1.11": "10.16",
    "tensorrt-cu13-bindings==11.4.0.106": "11.4",
}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def download(requirement: str, folder: Path) -> Path:
    """One x86-64 CPython 3.12 wheel of ``requirement`` (the API is the same on every platform)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-q", "-d", str(folder), requirement], check=True)
    return next(folder.glob("*.whl"))


def module_names(binary: bytes) -> set[str]:
    """Identifier-like C strings of a shared object's read-only data (where pybind11's names live)."""
    with tempfile.TemporaryDirectory() as tmp:
        module, rodata = Path(tmp) / "module.so", Path(tmp) / "rodata.bin"
        module.write_bytes(binary)
        subprocess.run(["objcopy", "-O", "binary", "--only-section=.rodata", str(module), str(rodata)], check=True)
        strings = rodata.read_bytes().split(b"\0")
    return {s.decode() for s in strings if IDENTIFIER.fullmatch(s.decode("latin-1"))}


def init_names(source: str) -> set[str]:
    """Top-level functions, classes and assignments of the wheel's ``__init__.py`` (nptype, __version__, ...)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def names_of_wheel(wheel: Path) -> tuple[set[str], str]:
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        binary = next(m for m in members if re.search(r"tensorrt_bindings/tensorrt[^/]*\.so$", m))
        names = module_names(archive.read(binary))
        names |= init_names(archive.read("tensorrt_bindings/__init__.py").decode())
    return names, binary


def write_list(requirement: str, version: str) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download(requirement, Path(tmp))
        names, binary = names_of_wheel(wheel)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        header = [f"# TensorRT {version} Python API names: .rodata strings of {binary} and names of __init__.py",
                  f"# from {wheel.name} (sha256 {digest}); regenerate: python scripts/tensorrt_api_names.py",
                  "# pybind11 names are C strings and the linker may store one as the tail of a longer one",
                  "# ('INT8' inside 'UINT8'): a name is present if it ends an identifier listed here."]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{version}.txt"
    path.write_text("\n".join(header + sorted(names)) + "\n")
    return path


def main(argv: list[str]) -> None:
    wanted = dict(arg.rsplit("=", 1) for arg in argv) if argv else WHEELS
    for requirement, version in wanted.items():
        print(f"{requirement} -> {write_list(requirement, version).relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
