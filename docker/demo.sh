#!/usr/bin/env bash
# Inside the vitedge images: check that TensorRT and the GPU are visible, export the bundled
# Fashion-MNIST EViT, build its TensorRT engine, profile it (against the device's latency budget
# when VITEDGE_DEVICE names a profile), build the C++ sample and run it on one image.
#   VITEDGE_DEVICE     device profile, e.g. orin-nano-8gb, orin-nx-16gb, agx-orin-64gb, x86-l4 (default: none)
#   VITEDGE_PRECISION  fp32 | fp16 (default fp16)
# TensorRT, the GPU driver and the DLA libraries are checked here, at run time: during 'docker
# build' a Jetson's RUN steps do not see them unless the daemon's default runtime is nvidia.
set -euo pipefail
OUT="${1:-/out/evit}"
DEVICE=(); [ -n "${VITEDGE_DEVICE:-}" ] && DEVICE=(--device "$VITEDGE_DEVICE")
PRECISION="${VITEDGE_PRECISION:-fp16}"
cd /opt/vitedge
if ! python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"; then
  echo "vitedge: error: TensorRT cannot load in this container: run it with --runtime nvidia (Jetson) or --gpus all (x86)" >&2
  exit 6
fi
vitedge export models/fmnist-evit.safetensors -o "$OUT" --no-validate
if [ "$PRECISION" = fp16 ]; then
  vitedge quantize "$OUT" --precision fp16 --no-validate   # FP16 builds the strongly typed model.fp16.onnx
fi
vitedge build "$OUT" --precision "$PRECISION" --timing-cache "$(dirname "$OUT")/timing.cache" "${DEVICE[@]}"
vitedge profile "$OUT" --backend trt --iterations 200 --warmup 20 "${DEVICE[@]}"
# one image for the C++ sample: a grey 28x28 gradient (the images carry no data set)
python3 -c "
import numpy as np, sys
pixels = (np.add.outer(np.arange(28), np.arange(28)) * 4).clip(0, 255).astype(np.uint8)
open(sys.argv[1], 'wb').write(b'P5\n28 28\n255\n' + pixels.tobytes())" "$OUT/sample.pgm"
BUILD="${VITEDGE_CPP_BUILD:-/opt/vitedge/build-cpp}"
if [ ! -x "$BUILD/vitedge_trt_infer" ]; then
  cmake -S examples/cpp -B "$BUILD" -DTENSORRT_ROOT=/usr >/dev/null && cmake --build "$BUILD" -j "$(nproc)" >/dev/null
fi
if [ -x "$BUILD/vitedge_trt_infer" ]; then
  "$BUILD/vitedge_trt_infer" "$OUT" "$OUT/sample.pgm" --iterations 200
else
  echo "vitedge: CMake did not find TensorRT and CUDA here: the C++ sample was not built" >&2
fi
