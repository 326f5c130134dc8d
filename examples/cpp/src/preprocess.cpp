#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "vitedge/host.hpp"

namespace vitedge {

namespace {

// For each output index along one axis: the first input index and the normalised weights of
// the triangle filter, widened by the scale when shrinking (antialiasing), as PyTorch and PIL do.
struct Taps {
  std::vector<int> start;
  std::vector<std::vector<float>> weights;
};

Taps taps(int in_size, int out_size) {
  Taps t;
  double scale = static_cast<double>(in_size) / out_size;
  double support = scale >= 1.0 ? scale : 1.0;
  double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  for (int i = 0; i < out_size; ++i) {
    double center = scale * (i + 0.5);
    int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    int xmax = std::min(static_cast<int>(center + support + 0.5), in_size);
    std::vector<float> w;
    double total = 0.0;
    for (int j = xmin; j < xmax; ++j) {
      double x = (j - center + 0.5) * invscale;
      double value = std::max(0.0, 1.0 - std::fabs(x));
      w.push_back(static_cast<float>(value));
      total += value;
    }
    for (float& value : w) value = total > 0 ? static_cast<float>(value / total) : 0.0f;
    t.start.push_back(xmin);
    t.weights.push_back(std::move(w));
  }
  return t;
}

}  // namespace

std::vector<float> resize_plane(const std::vector<float>& plane, int in_h, int in_w, int out_h, int out_w) {
  if (in_h == out_h && in_w == out_w) return plane;
  // horizontal pass, then vertical pass (separable filter)
  Taps tw = taps(in_w, out_w), th = taps(in_h, out_h);
  std::vector<float> wide(static_cast<size_t>(in_h) * out_w);
  for (int y = 0; y < in_h; ++y)
    for (int x = 0; x < out_w; ++x) {
      float sum = 0.0f;
      const std::vector<float>& w = tw.weights[x];
      for (size_t k = 0; k < w.size(); ++k) sum += w[k] * plane[static_cast<size_t>(y) * in_w + tw.start[x] + k];
      wide[static_cast<size_t>(y) * out_w + x] = sum;
    }
  std::vector<float> out(static_cast<size_t>(out_h) * out_w);
  for (int y = 0; y < out_h; ++y) {
    const std::vector<float>& w = th.weights[y];
    for (int x = 0; x < out_w; ++x) {
      float sum = 0.0f;
      for (size_t k = 0; k < w.size(); ++k) sum += w[k] * wide[static_cast<size_t>(th.start[y] + k) * out_w + x];
      out[static_cast<size_t>(y) * out_w + x] = sum;
    }
  }
  return out;
}

Array preprocess(const Image& image, const Metadata& meta) {
  if (image.channels != 1 && image.channels != 3) throw std::runtime_error("images must be grey or RGB");
  const size_t pixels = static_cast<size_t>(image.width) * image.height;
  std::vector<std::vector<float>> planes(image.channels, std::vector<float>(pixels));
  for (size_t p = 0; p < pixels; ++p)
    for (int c = 0; c < image.channels; ++c) planes[c][p] = image.pixels[p * image.channels + c] / 255.0f;
  if (image.channels != meta.channels) {  // grey model: average RGB; RGB model: repeat grey
    std::vector<float> grey(pixels, 0.0f);
    for (size_t p = 0; p < pixels; ++p) {
      float sum = 0.0f;
      for (int c = 0; c < image.channels; ++c) sum += planes[c][p];
      grey[p] = sum / image.channels;
    }
    planes.assign(meta.channels, grey);
  }
  Array out;
  out.shape = {1, meta.channels, meta.height, meta.width};
  out.data.reserve(static_cast<size_t>(meta.channels) * meta.height * meta.width);
  for (int c = 0; c < meta.channels; ++c) {
    std::vector<float> plane = resize_plane(planes[c], image.height, image.width, meta.height, meta.width);
    for (float v : plane) out.data.push_back((v - meta.mean[c]) / meta.std[c]);
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
