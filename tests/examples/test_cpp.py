"""examples/cpp: the C++ embedding sample's host part (metadata, preprocessing, top-k) under ctest,
checked against a real export of the bundled EViT model, Python's preprocessing and ONNX Runtime.

The TensorRT program (vitedge_trt_infer) builds only where CMake finds TensorRT; here CMake must
say so and build the rest.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from support import REPO, quiet

import vitedge
from vitedge.data import InputSpec, load_dataset, preprocess

SOURCE = REPO / "examples" / "cpp"
pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or (shutil.which("c++") or shutil.which("g++")) is None,
    reason="cmake and a C++ compiler are needed to build examples/cpp (apt-get install cmake g++)",
)


def _pnm(path, pixels: np.ndarray) -> None:
    height, width = pixels.shape[:2]
    magic = b"P5" if pixels.ndim == 2 else b"P6"
    path.write_bytes(magic + f"\n# written by vitedge's tests\n{width} {height}\n255\n".encode() + pixels.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A real export of the bundled EViT, real Fashion-MNIST images as PGM/PPM, and Python's answers."""
    root = tmp_path_factory.mktemp("cpp")
    art = root / "evit"
    vitedge.export(REPO / "models" / "fmnist-evit.safetensors", art, validate_data=None, log=quiet)
    meta = json.loads((art / "vitedge.json").read_text())
    spec = InputSpec(meta["input"]["shape"][2], meta["input"]["shape"][1], tuple(meta["input"]["mean"]), tuple(meta["input"]["std"]))
    raw = load_dataset("fashion-mnist", limit=6).images
    images = []
    for i in range(4):  # the test images as they are (28 x 28 grey)
        images.append((f"fmnist{i}.pgm", raw[i]))
    # RGB and other sizes exercise the channel average and the antialiased resize (up and down)
    up = np.kron(raw[4], np.ones((2, 2), np.uint8))[:, :, None] * np.array([1.0, 0.8, 0.6])
    images.append(("rgb_up.ppm", np.clip(up + np.arange(56)[None, :, None], 0, 255).astype(np.uint8)))
    images.append(("grey_down.pgm", np.kron(raw[5], np.ones((3, 3), np.uint8))[5:80, 2:77]))
    images.append(("odd.pgm", raw[0][3:20, 1:24]))
    entries = []
    for name, pixels in images:
        _pnm(root / name, pixels)
        np.save(root / f"{name}.npy", preprocess(pixels[None], spec))
        entries.append({"file": str(root / name), "expected": str(root / f"{name}.npy")})
    batch = np.concatenate([np.load(root / f"{name}.npy") for name, _ in images])
    logits = vitedge.predict(art, batch)
    np.save(root / "logits.npy", logits)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    document = {
        "metadata": str(art / "vitedge.json"), "tolerance": 1e-5,
        "expect": {"input_name": meta["input"]["name"], "batch": meta["input"]["batch"], "channels": spec.in_chans,
                   "height": spec.img_size, "width": spec.img_size, "mean": list(spec.mean), "std": list(spec.std),
                   "outputs": meta["outputs"]},
        "images": entries, "logits": str(root / "logits.npy"), "top5": top5.tolist(),
    }
    (root / "case.json").write_text(json.dumps(document, indent=1))
    return {"root": root, "art": art, "images": images, "logits": logits, "top5": top5}


@pytest.fixture(scope="module")
def built(case):
    build = case["root"] / "build"
    configure = subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build), f"-DVITEDGE_TEST_CASE={case['root'] / 'case.json'}"],
                               capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", "1"], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert "warning" not in compiled.stdout.lower(), compiled.stdout
    return build, configure.stdout


def test_cmake_says_whether_tensorrt_is_there(built):
    build, output = built
    if (build / "vitedge_trt_infer").exists():
        assert "vitedge: TensorRT found" in output
    else:
        assert "vitedge: TensorRT headers/library or the CUDA toolkit not found: building the host part only" in output


def test_ctest_checks_the_host_part_against_python(built):
    build, _ = built
    result = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed, 0 tests failed out of 2" in result.stdout


def test_cpp_preprocessing_gives_ort_the_same_answers(built, case):
    """C++ preprocesses each image; ONNX Runtime's logits on it match the Python path, and the C++ top-5 of
    those logits is NumPy's."""
    build, _ = built
    tensors = []
    for name, _ in case["images"]:
        out = case["root"] / f"{name}.cpp.npy"
        subprocess.run([str(build / "vitedge_preprocess"), str(case["art"] / "vitedge.json"), str(case["root"] / name), str(out)],
                       check=True)
        tensors.append(np.load(out))
    logits = vitedge.predict(case["art"], np.concatenate(tensors))
    np.testing.assert_allclose(logits, case["logits"], atol=1e-4)
    np.save(case["root"] / "cpp_logits.npy", logits)
    printed = subprocess.run([str(build / "vitedge_topk"), str(case["root"] / "cpp_logits.npy")],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    ranks = [[int(tok) for tok in line.split(":")[1].split() if not tok.startswith("(")] for line in printed]
    assert ranks == np.argsort(-logits, axis=1, kind="stable")[:, :5].tolist() == case["top5"].tolist()
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    first = float(printed[0].split("(")[1].split(")")[0])
    assert first == pytest.approx(probabilities[0].max(), abs=1e-4)


def test_cpp_tools_fail_in_one_line(built, case, tmp_path):
    build, _ = built
    (tmp_path / "text.pgm").write_text("not an image")
    for args, message in [
        ([str(case["art"] / "vitedge.json"), str(tmp_path / "missing.pgm"), str(tmp_path / "x.npy")], "cannot open"),
        ([str(case["art"] / "vitedge.json"), str(tmp_path / "text.pgm"), str(tmp_path / "x.npy")], "not a binary PGM (P5) or PPM (P6)"),
        ([str(tmp_path / "text.pgm"), str(tmp_path / "text.pgm"), str(tmp_path / "x.npy")], "text.pgm: JSON: "),
    ]:
        result = subprocess.run([str(build / "vitedge_preprocess"), *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith("vitedge_preprocess: error:") and message in result.stderr
