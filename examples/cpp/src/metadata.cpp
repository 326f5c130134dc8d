#include <stdexcept>

#include "vitedge/host.hpp"
#include "vitedge/json.hpp"

namespace vitedge {

Metadata load_metadata(const std::string& path) {
  Json root = Json::parse_file(path);
  Metadata meta;
  try {
    meta.family = root.has("family") ? root["family"].string() : "";
    meta.model = root.has("model") ? root["model"].string() : "model.onnx";
    const Json& input = root["input"];
    meta.input_name = input["name"].string();
    if (input.has("layout") && input["layout"].string() != "NCHW")
      throw std::runtime_error("input layout " + input["layout"].string() + " is not NCHW");
    if (input.has("dtype") && input["dtype"].string() != "float32")
      throw std::runtime_error("input dtype " + input["dtype"].string() + " is not float32");
    const Json& shape = input["shape"];
    if (shape.size() != 4) throw std::runtime_error("input shape must have 4 dimensions (NCHW)");
    meta.batch = shape[0].is_number() ? static_cast<int>(shape[0].integer()) : -1;  // "dynamic"
    meta.channels = static_cast<int>(shape[1].integer());
    meta.height = static_cast<int>(shape[2].integer());
    meta.width = static_cast<int>(shape[3].integer());
    for (const Json& v : input["mean"].array()) meta.mean.push_back(static_cast<float>(v.number()));
    for (const Json& v : input["std"].array()) meta.std.push_back(static_cast<float>(v.number()));
    if (static_cast<int>(meta.mean.size()) != meta.channels || static_cast<int>(meta.std.size()) != meta.channels)
      throw std::runtime_error("input mean/std must have one value per channel");
    for (float s : meta.std)
      if (!(s > 0.0f)) throw std::runtime_error("input std must be positive");
    for (const Json& v : root["outputs"].array()) meta.outputs.push_back(v.string());
    if (meta.outputs.empty()) throw std::runtime_error("no outputs listed");
    if (root.has("engine") && root["engine"].is_object()) {
      const Json& engine = root["engine"];
      if (engine.has("plan")) meta.engine_plan = engine["plan"].string();
      if (engine.has("precision")) meta.engine_precision = engine["precision"].string();
    }
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  return meta;
}

}  // namespace vitedge
