// Host test of engine_settings.hpp (no TensorRT): the dynamic-dimension rules, and, given a
// vitedge.json, the runtime settings vitedge_trt_infer reads from it, printed for the caller
// (tests/examples/test_cpp_trt.py) to compare with what 'vitedge build' recorded.
//   test_engine_settings [vitedge.json]
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine_settings.hpp"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}

bool throws(const std::vector<int64_t>& engine, const std::vector<int64_t>& input, const std::string& needle) {
  try {
    vitedge::fill_dynamic_dims(engine, input, "images");
  } catch (const std::runtime_error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  using Shape = std::vector<int64_t>;
  expect(vitedge::fill_dynamic_dims({-1, 1, 28, 28}, {1, 1, 28, 28}, "images") == Shape({1, 1, 28, 28}), "dynamic batch");
  expect(vitedge::fill_dynamic_dims({1, 1, -1, -1}, {1, 1, 40, 40}, "images") == Shape({1, 1, 40, 40}),
         "dynamic resolution: H and W from the image, not only the batch");
  expect(vitedge::fill_dynamic_dims({-1, 3, -1, -1}, {1, 3, 16, 16}, "images") == Shape({1, 3, 16, 16}), "both");
  expect(throws({1, 1, 28, 28}, {1, 1, 32, 32}, "is 1x1x28x28 in the engine, the image is 1x1x32x32"), "static mismatch");
  expect(throws({-1, 1, 28}, {1, 1, 28, 28}, "has 3 dimensions in the engine"), "rank mismatch");
  const vitedge::EngineSettings none = vitedge::engine_settings(vitedge::Json::parse(R"({"input": {}})"));
  expect(!none.version_compatible && none.dla_core == -1, "no engine section: GPU, not version compatible");
  const vitedge::EngineSettings dla =
      vitedge::engine_settings(vitedge::Json::parse(R"({"engine": {"version_compatible": true, "dla_core": 1}})"));
  expect(dla.version_compatible && dla.dla_core == 1, "engine section read");
  if (argc == 2) {
    const vitedge::EngineSettings read = vitedge::engine_settings(vitedge::Json::parse_file(argv[1]));
    std::printf("version_compatible=%d dla_core=%d\n", read.version_compatible ? 1 : 0, read.dla_core);
  }
  return failures == 0 ? 0 : 1;
}
