// Unit tests of the host part (JSON, PNM/.npy I/O, PIL-equivalent resize and grey conversion, top-k). No data files needed.
#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

#include "vitedge/host.hpp"
#include "vitedge/json.hpp"

static int failures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

static bool throws(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).find(fragment) != std::string::npos) return true;
    std::fprintf(stderr, "unexpected message: %s\n", e.what());
    return false;
  }
  return false;
}

static void test_json() {
  using vitedge::Json;
  Json j = Json::parse(R"( {"a": [1, -2.5e2, true, false, null], "s": "q\"\\\/\n\u00e9\ud83d\ude00", "o": {}} )");
  CHECK(j["a"].size() == 5 && j["a"][0].integer() == 1 && j["a"][1].number() == -250.0);
  CHECK(j["a"][2].boolean() && !j["a"][3].boolean() && j["a"][4].is_null());
  CHECK(j["s"].string() == "q\"\\/\n\xc3\xa9\xf0\x9f\x98\x80");
  CHECK(j["o"].is_object() && j["o"].size() == 0 && !j.has("missing"));
  CHECK(throws([] { Json::parse("{\"a\": 1,}"); }, "expected a string key"));
  CHECK(throws([] { Json::parse("[1 2]"); }, "expected ',' or ']'"));
  CHECK(throws([] { Json::parse("\"open"); }, "unterminated string"));
  CHECK(throws([] { Json::parse("01x"); }, "trailing characters"));
  CHECK(throws([] { Json::parse("{\"a\": 1}")["b"]; }, "missing key 'b'"));
  CHECK(throws([] { Json::parse("1.5").integer(); }, "expected an integer"));
  CHECK(throws([] { Json::parse("\"x\"").number(); }, "expected a number, found a string"));
}

static void test_resize() {
  // identity, constant images stay constant, a 2x box down-sample averages pixel pairs, luma is PIL's
  vitedge::Image ramp{4, 1, 1, {0, 2, 4, 7}};
  CHECK(vitedge::resize(ramp, 4, 1, "bicubic").pixels == ramp.pixels);
  CHECK((vitedge::resize(ramp, 2, 1, "box").pixels == std::vector<uint8_t>{1, 6}));  // (4 + 7) / 2 = 5.5 rounds up
  vitedge::Image flat{30, 20, 3, std::vector<uint8_t>(30 * 20 * 3, 64)};
  for (const char* name : {"bilinear", "bicubic", "lanczos"}) {
    for (uint8_t v : vitedge::resize(flat, 7, 11, name).pixels) CHECK(v == 64);
    for (uint8_t v : vitedge::resize(flat, 64, 48, name).pixels) CHECK(v == 64);
  }
  CHECK(throws([&] { vitedge::resize(flat, 5, 5, "cubic"); }, "interpolation 'cubic' is not supported"));
  vitedge::Image rgb{1, 1, 3, {255, 0, 0}};
  CHECK(vitedge::convert_channels(rgb, 1).pixels[0] == 76);  // PIL: Image.new("RGB", (1, 1), (255, 0, 0)).convert("L")
  CHECK((vitedge::convert_channels(vitedge::Image{1, 1, 1, {9}}, 3).pixels == std::vector<uint8_t>{9, 9, 9}));
}

static void test_top_k() {
  const float logits[6] = {0.5f, 3.0f, -1.0f, 3.0f, 2.0f, 0.0f};
  auto best = vitedge::top_k(logits, 6, 3);
  CHECK(best.size() == 3 && best[0].index == 1 && best[1].index == 3 && best[2].index == 4);  // tie: lower index first
  double total = 0;
  for (float l : logits) total += std::exp(l - 3.0);
  CHECK(std::fabs(best[0].probability - 1.0 / total) < 1e-12);
  CHECK(vitedge::top_k(logits, 6, 10).size() == 6);
}

static void test_files(const std::string& dir) {
  vitedge::Image image{3, 2, 3, {}};
  for (int i = 0; i < 18; ++i) image.pixels.push_back(static_cast<uint8_t>(i * 14));
  vitedge::write_pnm(dir + "/unit.ppm", image);
  vitedge::Image back = vitedge::read_pnm(dir + "/unit.ppm");
  CHECK(back.width == 3 && back.height == 2 && back.channels == 3 && back.pixels == image.pixels);
  vitedge::Array array{{2, 3}, {1, 2, 3, 4, 5, 6.5f}};
  vitedge::write_npy(dir + "/unit.npy", array);
  vitedge::Array read = vitedge::read_npy(dir + "/unit.npy");
  CHECK(read.shape == array.shape && read.data == array.data);
  CHECK(throws([&] { vitedge::read_pnm(dir + "/unit.npy"); }, "not a binary PGM (P5) or PPM (P6)"));
  CHECK(throws([&] { vitedge::read_npy(dir + "/unit.ppm"); }, "not a .npy file"));
  CHECK(throws([&] { vitedge::read_pnm(dir + "/missing.pgm"); }, "cannot open"));
}

int main(int argc, char** argv) {
  test_json();
  test_resize();
  test_top_k();
  test_files(argc > 1 ? argv[1] : ".");
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("host unit tests passed\n");
  return 0;
}
