// The host-side part of running a vitedge artifact: metadata, image and .npy I/O,
// preprocessing exactly as vitedge.data.preprocess does it, and top-k. No TensorRT needed.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vitedge {

// What vitedge.json says about the model input and outputs.
struct Metadata {
  std::string family;
  std::string model;            // the ONNX file the artifact was exported to
  std::string input_name;
  int batch = -1;               // -1: dynamic batch
  int channels = 0, height = 0, width = 0;
  std::vector<float> mean, std;
  std::vector<std::string> outputs;  // outputs[0] is the logits
  std::string engine_plan;      // "model.plan" once 'vitedge build' ran, else empty
  std::string engine_precision;
};

Metadata load_metadata(const std::string& vitedge_json);  // throws std::runtime_error

// An 8-bit image, interleaved channels (1: grey, 3: RGB).
struct Image {
  int width = 0, height = 0, channels = 0;
  std::vector<uint8_t> pixels;
};

Image read_pnm(const std::string& path);  // binary PGM (P5) or PPM (P6), maxval 255
void write_pnm(const std::string& path, const Image& image);

// float32 arrays in NumPy's .npy format (little-endian '<f4', C order).
struct Array {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

Array read_npy(const std::string& path);
void write_npy(const std::string& path, const Array& array);

// Antialiased bilinear resize of one float plane (PyTorch's interpolate(antialias=True), PIL's triangle filter).
std::vector<float> resize_plane(const std::vector<float>& plane, int in_h, int in_w, int out_h, int out_w);

// uint8 image -> normalised float32 [1, C, H, W] per the metadata: pixels / 255, channels
// averaged (RGB image, grey model) or repeated (grey image, RGB model), resized, (x - mean) / std.
Array preprocess(const Image& image, const Metadata& meta);

// Input tensor from a file: .pgm/.ppm are preprocessed, .npy must already be [1, C, H, W] (or [C, H, W]) float32.
Array load_input(const std::string& path, const Metadata& meta);

// The k largest logits, highest first (ties: lower index first), with softmax probabilities.
struct Prediction {
  int index;
  float logit;
  double probability;
};
std::vector<Prediction> top_k(const float* logits, size_t count, size_t k);

}  // namespace vitedge
