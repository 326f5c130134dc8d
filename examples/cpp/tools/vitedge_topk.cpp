// vitedge_topk LOGITS.npy [K]
// The reference run of the last step of vitedge_trt_infer: top-K classes (index, logit,
// softmax probability) of each row of a [N, classes] float32 logits array, e.g. the logits
// ONNX Runtime computed with 'vitedge predict'.
#include <cstdio>
#include <iostream>
#include <string>

#include "vitedge/host.hpp"

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: vitedge_topk LOGITS.npy [K]\n";
    return 2;
  }
  try {
    vitedge::Array logits = vitedge::read_npy(argv[1]);
    size_t k = argc == 3 ? std::stoul(argv[2]) : 5;
    if (logits.shape.size() != 2) throw std::runtime_error("logits must be a [N, classes] array");
    size_t classes = static_cast<size_t>(logits.shape[1]);
    for (int64_t row = 0; row < logits.shape[0]; ++row) {
      std::printf("image %lld:", static_cast<long long>(row));
      for (const auto& p : vitedge::top_k(logits.data.data() + row * classes, classes, k))
        std::printf(" %d (%.4f)", p.index, p.probability);
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::cerr << "vitedge_topk: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
