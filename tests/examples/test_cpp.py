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
from vitedge.data import load_dataset, preprocess, transform_from_metadata

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
    spec = transform_from_metadata(meta)  # the recorded input.transform: 28 px grey, bilinear, no crop margin
    raw = load_dataset("fashion-mnist", limit=6).images
    images = []
    for i in range(4):  # the test images as they are (28 x 28 grey)
        images.append((f"fmnist{i}.pgm", raw[i]))
    # RGB and other sizes exercise PIL's luma, the antialiased resize (up and down) and the centre crop
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


def test_cpp_applies_the_recorded_deit_transform_like_python(built, tmp_path):
    """A 224-px RGB export records DeiT's transform (short side 256, bicubic, centre crop 224); the C++ sample
    applies it to portrait, landscape, grey and small images exactly as Python's PIL path does (PIL's fixed-point
    resampling is reproduced, so the tensors agree to float rounding, 1e-5 after normalisation)."""
    import torch
    from PIL import Image
    from support import make_state_dict

    from vitedge.backbone import ViTConfig

    build, _ = built
    cfg = ViTConfig(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=32, depth=2, num_heads=1)
    torch.save({"model": make_state_dict("deit", cfg, seed=2)}, tmp_path / "deit.pth")
    vitedge.export(tmp_path / "deit.pth", tmp_path / "art", family="deit", validate_data=None, log=quiet)
    meta = json.loads((tmp_path / "art" / "vitedge.json").read_text())
    transform = transform_from_metadata(meta)
    assert (transform.resize, transform.interpolation) == (256, "bicubic")
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:300, 0:410] / 410.0
    photo = np.clip(np.stack([np.sin(7 * x), np.cos(5 * y), np.sin(3 * (x + y))], -1) * 100 + 128
                    + rng.normal(0, 10, (300, 410, 3)), 0, 255).astype(np.uint8)
    cases = {"landscape.ppm": photo, "portrait.ppm": photo.transpose(1, 0, 2)[:, ::-1], "grey.pgm": photo[..., 1],
             "small.ppm": photo[100:180, 50:170]}
    worst = 0.0
    for name, pixels in cases.items():
        _pnm(tmp_path / name, pixels)
        out = tmp_path / f"{name}.npy"
        subprocess.run([str(build / "vitedge_preprocess"), str(tmp_path / "art" / "vitedge.json"), str(tmp_path / name),
                        str(out)], check=True)
        with Image.open(tmp_path / name) as image:
            expected = transform(image)[None]
        assert np.load(out).shape == expected.shape == (1, 3, 224, 224)
        worst = max(worst, float(np.abs(np.load(out) - expected).max()))
    assert worst <= 1e-5, worst
