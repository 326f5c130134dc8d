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
    Transform& t = meta.transform;
    if (input.has("transform")) {
      const Json& tr = input["transform"];
      t.size = static_cast<int>(tr["size"].integer());
      t.crop_pct = tr["crop_pct"].number();
      t.interpolation = tr["interpolation"].string();
      t.crop = tr["crop"].string();
      t.channels = tr.has("channels") ? tr["channels"].string() : (meta.channels == 1 ? "L" : "RGB");
    } else {  // written before input.transform: vitedge's default for this input (vitedge.data.default_preset)
      t.size = meta.height;
      t.crop_pct = meta.channels == 1 || meta.height >= 384 ? 1.0 : 0.875;
      t.interpolation = meta.channels == 1 ? "bilinear" : "bicubic";
      t.crop = "center";
      t.channels = meta.channels == 1 ? "L" : "RGB";
    }
    if (t.size != meta.height || t.size != meta.width)
      throw std::runtime_error("input.transform size does not match the input shape");
    if (!(t.crop_pct > 0.0 && t.crop_pct <= 1.0)) throw std::runtime_error("input.transform crop_pct must be in (0, 1]");
    if (t.crop != "center" && t.crop != "squash") throw std::runtime_error("input.transform crop must be center or squash");
    if ((t.channels == "L") != (meta.channels == 1) || (t.channels != "L" && t.channels != "RGB" && t.channels != "BGR"))
      throw std::runtime_error("input.transform channels " + t.channels + " do not fit the input shape");
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
