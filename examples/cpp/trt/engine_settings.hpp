// What vitedge_trt_infer takes from vitedge.json before it loads and runs a plan, kept free of
// TensorRT so that the host build can test it: the runtime settings of the engine section
// (version-compatible plans need host code allowed, DLA plans their DLA core) and the input
// shape for an engine with dynamic dimensions (-1: batch, and H/W of a dynamic-resolution graph).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "vitedge/json.hpp"

namespace vitedge {

struct EngineSettings {
  bool version_compatible = false;
  int dla_core = -1;  // -1: the GPU
};

inline EngineSettings engine_settings(const Json& root) {
  EngineSettings settings;
  if (!root.has("engine") || !root["engine"].is_object()) return settings;
  const Json& engine = root["engine"];
  if (engine.has("version_compatible") && !engine["version_compatible"].is_null())
    settings.version_compatible = engine["version_compatible"].boolean();
  if (engine.has("dla_core") && engine["dla_core"].is_number())
    settings.dla_core = static_cast<int>(engine["dla_core"].integer());
  return settings;
}

inline std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text;
  for (size_t d = 0; d < shape.size(); ++d) text += (d ? "x" : "") + std::to_string(shape[d]);
  return text;
}

// The engine's input shape with every -1 taken from the input tensor; static axes must agree.
inline std::vector<int64_t> fill_dynamic_dims(const std::vector<int64_t>& engine, const std::vector<int64_t>& input,
                                              const std::string& name) {
  if (engine.size() != input.size())
    throw std::runtime_error("input " + name + " has " + std::to_string(engine.size()) + " dimensions in the engine (" +
                             shape_text(engine) + "), the image " + std::to_string(input.size()));
  std::vector<int64_t> shape = engine;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == -1) {
      shape[d] = input[d];
    } else if (shape[d] != input[d]) {
      throw std::runtime_error("input " + name + " is " + shape_text(engine) + " in the engine, the image is " +
                               shape_text(input));
    }
  }
  return shape;
}

}  // namespace vitedge
