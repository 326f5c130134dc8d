#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "vitedge/host.hpp"

namespace vitedge {

namespace {

const int kPrecisionBits = 32 - 8 - 2;  // PIL's fixed-point precision for 8-bit images

struct Filter {
  double support;
  double (*weight)(double);
};

double bilinear(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic(double x) {  // a = -0.5, as PIL
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

double box(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double hamming(double x) {
  const double pi = 3.14159265358979323846;
  x = std::fabs(x);
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x *= pi;
  return std::sin(x) / x * (0.54 + 0.46 * std::cos(x));
}

double sinc(double x) {
  const double pi = 3.14159265358979323846;
  if (x == 0.0) return 1.0;
  x *= pi;
  return std::sin(x) / x;
}

double lanczos(double x) { return (x >= -3.0 && x < 3.0) ? sinc(x) * sinc(x / 3.0) : 0.0; }

Filter filter_for(const std::string& name) {
  if (name == "bilinear") return {1.0, bilinear};
  if (name == "bicubic") return {2.0, bicubic};
  if (name == "box") return {0.5, box};
  if (name == "hamming") return {1.0, hamming};
  if (name == "lanczos") return {3.0, lanczos};
  throw std::runtime_error("interpolation '" + name + "' is not supported here (bilinear, bicubic, box, hamming, lanczos)");
}

// For each output index: the first input index and the fixed-point weights, as PIL's precompute_coeffs.
struct Taps {
  std::vector<int> start;
  std::vector<std::vector<int32_t>> weights;
};

Taps taps(int in_size, int out_size, const Filter& filter) {
  Taps t;
  double scale = static_cast<double>(in_size) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filter.support * filterscale;
  double ss = 1.0 / filterscale;
  for (int i = 0; i < out_size; ++i) {
    double center = (i + 0.5) * scale;
    int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    int xmax = std::min(static_cast<int>(center + support + 0.5), in_size);
    std::vector<double> w;
    double total = 0.0;
    for (int j = xmin; j < xmax; ++j) {
      double value = filter.weight((j - center + 0.5) * ss);
      w.push_back(value);
      total += value;
    }
    std::vector<int32_t> fixed;
    for (double value : w) {
      double k = total != 0.0 ? value / total : value;
      fixed.push_back(static_cast<int32_t>(k < 0 ? -0.5 + k * (1 << kPrecisionBits) : 0.5 + k * (1 << kPrecisionBits)));
    }
    t.start.push_back(xmin);
    t.weights.push_back(std::move(fixed));
  }
  return t;
}

uint8_t clip8(int64_t value) {
  if (value >= (static_cast<int64_t>(1) << kPrecisionBits << 8)) return 255;
  if (value <= 0) return 0;
  return static_cast<uint8_t>(value >> kPrecisionBits);
}

}  // namespace

int Transform::resize() const { return static_cast<int>(std::floor(size / crop_pct)); }

Image resize(const Image& image, int out_w, int out_h, const std::string& interpolation) {
  Filter filter = filter_for(interpolation);
  const int c = image.channels;
  Image current = image;
  if (out_w != image.width) {  // horizontal pass
    Taps t = taps(image.width, out_w, filter);
    Image wide{out_w, image.height, c, std::vector<uint8_t>(static_cast<size_t>(out_w) * image.height * c)};
    for (int y = 0; y < image.height; ++y)
      for (int x = 0; x < out_w; ++x)
        for (int ch = 0; ch < c; ++ch) {
          int64_t sum = static_cast<int64_t>(1) << (kPrecisionBits - 1);
          const std::vector<int32_t>& w = t.weights[x];
          for (size_t k = 0; k < w.size(); ++k)
            sum += static_cast<int64_t>(image.pixels[(static_cast<size_t>(y) * image.width + t.start[x] + k) * c + ch]) * w[k];
          wide.pixels[(static_cast<size_t>(y) * out_w + x) * c + ch] = clip8(sum);
        }
    current = std::move(wide);
  }
  if (out_h != current.height) {  // vertical pass
    Taps t = taps(current.height, out_h, filter);
    Image tall{current.width, out_h, c, std::vector<uint8_t>(static_cast<size_t>(current.width) * out_h * c)};
    for (int y = 0; y < out_h; ++y)
      for (int x = 0; x < current.width; ++x)
        for (int ch = 0; ch < c; ++ch) {
          int64_t sum = static_cast<int64_t>(1) << (kPrecisionBits - 1);
          const std::vector<int32_t>& w = t.weights[y];
          for (size_t k = 0; k < w.size(); ++k)
            sum += static_cast<int64_t>(current.pixels[((t.start[y] + k) * current.width + x) * c + ch]) * w[k];
          tall.pixels[(static_cast<size_t>(y) * current.width + x) * c + ch] = clip8(sum);
        }
    current = std::move(tall);
  }
  return current;
}

Image convert_channels(const Image& image, int channels) {
  if (image.channels == channels) return image;
  const size_t pixels = static_cast<size_t>(image.width) * image.height;
  Image out{image.width, image.height, channels, std::vector<uint8_t>(pixels * channels)};
  for (size_t p = 0; p < pixels; ++p) {
    if (channels == 1) {  // PIL's L24: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16
      const uint8_t* rgb = &image.pixels[p * 3];
      out.pixels[p] = static_cast<uint8_t>((rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16);
    } else {
      for (int ch = 0; ch < channels; ++ch) out.pixels[p * channels + ch] = image.pixels[p];
    }
  }
  return out;
}

Array preprocess(const Image& image, const Metadata& meta) {
  if (image.channels != 1 && image.channels != 3) throw std::runtime_error("images must be grey or RGB");
  const Transform& t = meta.transform;
  Image converted = convert_channels(image, meta.channels);
  const int scale = t.resize();
  int new_w = scale, new_h = scale;
  if (t.crop == "center") {  // the short side to `scale`, the long one in proportion (truncated, as torchvision)
    if (converted.width <= converted.height)
      new_h = static_cast<int>(static_cast<double>(scale) * converted.height / converted.width);
    else
      new_w = static_cast<int>(static_cast<double>(scale) * converted.width / converted.height);
  }
  Image resized = (new_w == converted.width && new_h == converted.height)
                      ? converted : resize(converted, new_w, new_h, t.interpolation);
  // centre crop offsets rounded half to even, as Python's round()
  const int left = static_cast<int>(std::nearbyint((new_w - t.size) / 2.0));
  const int top = static_cast<int>(std::nearbyint((new_h - t.size) / 2.0));
  if (left < 0 || top < 0) throw std::runtime_error("the resized image is smaller than the crop");
  const int c = meta.channels;
  Array out;
  out.shape = {1, c, t.size, t.size};
  out.data.resize(static_cast<size_t>(c) * t.size * t.size);
  for (int ch = 0; ch < c; ++ch) {
    const int source = t.channels == "BGR" ? c - 1 - ch : ch;
    for (int y = 0; y < t.size; ++y)
      for (int x = 0; x < t.size; ++x) {
        float v = resized.pixels[(static_cast<size_t>(top + y) * new_w + left + x) * c + source] / 255.0f;
        out.data[(static_cast<size_t>(ch) * t.size + y) * t.size + x] = (v - meta.mean[ch]) / meta.std[ch];
      }
  }
  return out;
}

Array load_input(const std::string& path, const Metadata& meta) {
  auto ends_with = [&](const char* suffix) {
    std::string s(suffix);
    return path.size() >= s.size() && path.compare(path.size() - s.size(), s.size(), s) == 0;
  };
  if (ends_with(".pgm") || ends_with(".ppm") || ends_with(".pnm")) return preprocess(read_pnm(path), meta);
  if (!ends_with(".npy")) throw std::runtime_error(path + ": give a .pgm/.ppm image or a preprocessed .npy tensor");
  Array array = read_npy(path);
  if (array.shape.size() == 3) array.shape.insert(array.shape.begin(), 1);
  std::vector<int64_t> want = {1, meta.channels, meta.height, meta.width};
  if (array.shape != want)
    throw std::runtime_error(path + ": expected a [1, " + std::to_string(meta.channels) + ", " + std::to_string(meta.height) +
                             ", " + std::to_string(meta.width) + "] float32 tensor");
  return array;
}

std::vector<Prediction> top_k(const float* logits, size_t count, size_t k) {
  std::vector<int> order(count);
  std::iota(order.begin(), order.end(), 0);
  k = std::min(k, count);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  double peak = count ? *std::max_element(logits, logits + count) : 0.0;
  double total = 0.0;
  for (size_t i = 0; i < count; ++i) total += std::exp(static_cast<double>(logits[i]) - peak);
  std::vector<Prediction> best;
  for (size_t i = 0; i < k; ++i)
    best.push_back({order[i], logits[order[i]], std::exp(static_cast<double>(logits[order[i]]) - peak) / total});
  return best;
}

}  // namespace vitedge
