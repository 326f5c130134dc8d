#!/usr/bin/env bash
# Inside the vitedge images: export the bundled Fashion-MNIST EViT, build its TensorRT engine,
# profile it (against the device's latency budget when VITEDGE_DEVICE names a profile), and run
# the C++ sample on one image.
#   VITEDGE_DEVICE     device profile, e.g. orin-nano-8gb, orin-nx-16gb, agx-orin-64gb, x86-l4 (default: none)
#   VITEDGE_PRECISION  fp32 | fp16 (default fp16)
set -euo pipefail
OUT="${1:-/out/evit}"
DEVICE=(); [ -n "${VITEDGE_DEVICE:-}" ] && DEVICE=(--device "$VITEDGE_DEVICE")
cd /opt/vitedge
vitedge export models/fmnist-evit.safetensors -o "$OUT" --no-validate
vitedge build "$OUT" --precision "${VITEDGE_PRECISION:-fp16}" --timing-cache "$(dirname "$OUT")/timing.cache" "${DEVICE[@]}"
vitedge profile "$OUT" --backend trt --iterations 200 --warmup 20 "${DEVICE[@]}"
# one image for the C++ sample: a grey 28x28 gradient (the images carry no data set)
python3 -c "
import numpy as np, sys
pixels = (np.add.outer(np.arange(28), np.arange(28)) * 4).clip(0, 255).astype(np.uint8)
open(sys.argv[1], 'wb').write(b'P5\n28 28\n255\n' + pixels.tobytes())" "$OUT/sample.pgm"
if [ -x build-cpp/vitedge_trt_infer ]; then
  build-cpp/vitedge_trt_infer "$OUT" "$OUT/sample.pgm" --iterations 200
fi
