// test_artifact CASE.json
// Checks the host part against a real artifact and Python's answers, all named in CASE.json
// (written by tests/examples/test_cpp.py):
//   "metadata": a vitedge.json from 'vitedge export', "expect": what Python reads from it,
//   "images": [{"file": .pgm/.ppm, "expected": .npy from vitedge.data.preprocess}],
//   "logits": an [N, classes] .npy computed by ONNX Runtime, "top5": NumPy's top-5 per row.
#include <cmath>
#include <cstdio>
#include <string>

#include "vitedge/host.hpp"
#include "vitedge/json.hpp"

static int failures = 0;
#define EXPECT(cond, ...)                   \
  do {                                      \
    if (!(cond)) {                          \
      std::fprintf(stderr, __VA_ARGS__);    \
      std::fprintf(stderr, "\n");           \
      ++failures;                           \
    }                                       \
  } while (0)

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: test_artifact CASE.json\n");
    return 2;
  }
  try {
    vitedge::Json c = vitedge::Json::parse_file(argv[1]);
    const double tolerance = c["tolerance"].number();
    vitedge::Metadata meta = vitedge::load_metadata(c["metadata"].string());
    const vitedge::Json& e = c["expect"];
    EXPECT(meta.input_name == e["input_name"].string(), "input name %s", meta.input_name.c_str());
    EXPECT(meta.batch == e["batch"].integer(), "batch %d", meta.batch);
    EXPECT(meta.channels == e["channels"].integer() && meta.height == e["height"].integer() &&
               meta.width == e["width"].integer(), "shape %dx%dx%d", meta.channels, meta.height, meta.width);
    for (size_t i = 0; i < meta.mean.size(); ++i)
      EXPECT(meta.mean[i] == static_cast<float>(e["mean"][i].number()) &&
                 meta.std[i] == static_cast<float>(e["std"][i].number()), "mean/std channel %zu", i);
    EXPECT(meta.outputs.size() == e["outputs"].size() && meta.outputs[0] == e["outputs"][0].string(), "outputs");

    for (const vitedge::Json& image : c["images"].array()) {
      vitedge::Array mine = vitedge::load_input(image["file"].string(), meta);
      vitedge::Array python = vitedge::read_npy(image["expected"].string());
      EXPECT(mine.shape == python.shape, "%s: shape differs from Python's", image["file"].string().c_str());
      double worst = 0.0;
      for (size_t i = 0; i < mine.data.size() && i < python.data.size(); ++i)
        worst = std::fmax(worst, std::fabs(static_cast<double>(mine.data[i]) - python.data[i]));
      EXPECT(worst <= tolerance, "%s: max |C++ - Python| = %g > %g", image["file"].string().c_str(), worst, tolerance);
      std::printf("%s: max |C++ - Python| = %.3g\n", image["file"].string().c_str(), worst);
    }

    vitedge::Array logits = vitedge::read_npy(c["logits"].string());
    size_t classes = static_cast<size_t>(logits.shape[1]);
    const vitedge::Json& top5 = c["top5"];
    EXPECT(static_cast<size_t>(logits.shape[0]) == top5.size(), "rows");
    for (size_t row = 0; row < top5.size(); ++row) {
      auto best = vitedge::top_k(logits.data.data() + row * classes, classes, 5);
      for (size_t k = 0; k < 5; ++k)
        EXPECT(best[k].index == top5[row][k].integer(), "row %zu rank %zu: C++ %d, NumPy %lld", row, k, best[k].index,
               top5[row][k].integer());
    }
    std::printf("%zu images, %zu logit rows checked\n", c["images"].size(), top5.size());
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "test_artifact: error: %s\n", ex.what());
    return 1;
  }
  return failures ? 1 : 0;
}
