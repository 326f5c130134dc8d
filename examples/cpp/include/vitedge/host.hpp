// The host-side part of running a vitedge artifact: metadata, image and .npy I/O,
// preprocessing with the evaluation transform recorded in vitedge.json (input.transform, as
// vitedge.data.Transform applies it with PIL), and top-k. No TensorRT needed.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vitedge {

// input.transform of vitedge.json: resize the short side to floor(size / crop_pct) with the
// interpolation, centre crop size x size ("squash": resize both sides), channels "RGB", "BGR" or "L".
struct Transform {
  int size = 0;
  double crop_pct = 1.0;
  std::string interpolation = "bilinear";
  std::string crop = "center";
  std::string channels = "RGB";
  int resize() const;  // floor(size / crop_pct)
};

// What vitedge.json says about the model input and outputs.
struct Metadata {
  std::string family;
  std::string model;            // the ONNX file the artifact was exported to
  std::string input_name;
  int batch = -1;               // -1: dynamic batch
  int channels = 0, height = 0, width = 0;
  std::vector<float> mean, std;
  Transform transform;          // recorded, or (older artifacts) vitedge's default for the input shape
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

// PIL's Image.resize for 8-bit images: separable convolution (horizontal pass, then vertical),
// filter support widened by the scale when shrinking, fixed-point weights and 8-bit rounding after
// each pass, so the result equals PIL's. interpolation: bilinear, bicubic, box, hamming or lanczos.
Image resize(const Image& image, int out_w, int out_h, const std::string& interpolation);

// Grey <-> RGB as PIL's convert does it: "L" = ITU-R 601-2 luma (fixed point), RGB = grey repeated.
Image convert_channels(const Image& image, int channels);

// uint8 image -> normalised float32 [1, C, H, W] per meta.transform: channels converted, short side
// resized, centre crop, pixels / 255, (x - mean) / std (BGR: channels reversed).
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
