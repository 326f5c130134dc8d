// vitedge_trt_infer ARTIFACT_DIR INPUT [--iterations N]
//
// Loads ARTIFACT_DIR/model.plan (from 'vitedge build') and ARTIFACT_DIR/vitedge.json, preprocesses
// INPUT (.pgm/.ppm image, or a preprocessed .npy) as the metadata says, runs TensorRT, and prints
// the top-5 classes and the latency: GPU compute (CUDA events) and end to end with the copies.
// From vitedge.json's "engine" section it takes what the runtime must know before it can load and
// run the plan: version-compatible plans need host code allowed (their lean runtime is in the
// plan), DLA plans their DLA core, and every dynamic input dimension (batch, and H/W of a
// dynamic-resolution graph) is set from the preprocessed input's shape.
// Written against the TensorRT 10 and 11 C++ API (enqueueV3, named I/O tensors); built only where
// CMake finds TensorRT. Not compiled on vitedge's CI machines (no TensorRT there).
#include <NvInfer.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine_settings.hpp"
#include "vitedge/host.hpp"
#include "vitedge/json.hpp"

namespace {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
};

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// Bits per element: 4-bit types pack two elements per byte.
size_t element_bits(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32: return 32;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16: return 16;
    case nvinfer1::DataType::kINT8:
    case nvinfer1::DataType::kUINT8:
    case nvinfer1::DataType::kBOOL:
    case nvinfer1::DataType::kFP8: return 8;
    case nvinfer1::DataType::kINT64: return 64;
    case nvinfer1::DataType::kINT4: return 4;
#if NV_TENSORRT_MAJOR > 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR >= 8)
    case nvinfer1::DataType::kFP4: return 4;
#endif
#if NV_TENSORRT_MAJOR > 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR >= 12)
    case nvinfer1::DataType::kE8M0: return 8;
#endif
  }
  throw std::runtime_error("unknown TensorRT data type " + std::to_string(static_cast<int>(type)));
}

std::vector<int64_t> dims_vector(const nvinfer1::Dims& dims) { return std::vector<int64_t>(dims.d, dims.d + dims.nbDims); }

struct Tensor {
  std::string name;
  bool input = false;
  nvinfer1::DataType type{};
  size_t bytes = 0;
  void* device = nullptr;
  std::vector<char> host;
};

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  double rank = p / 100.0 * (v.size() - 1);
  size_t lo = static_cast<size_t>(rank);
  size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - lo);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && !(argc == 5 && std::strcmp(argv[3], "--iterations") == 0)) {
    std::fprintf(stderr, "usage: vitedge_trt_infer ARTIFACT_DIR IMAGE.pgm|.ppm|.npy [--iterations N]\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int iterations = argc == 5 ? std::max(1, std::atoi(argv[4])) : 100;
  try {
    vitedge::Metadata meta = vitedge::load_metadata(dir + "/vitedge.json");
    if (meta.engine_plan.empty()) throw std::runtime_error(dir + " has no engine: run 'vitedge build " + dir + "' first");
    vitedge::Array input = vitedge::load_input(argv[2], meta);

    std::ifstream file(dir + "/" + meta.engine_plan, std::ios::binary);
    if (!file) throw std::runtime_error("cannot open " + dir + "/" + meta.engine_plan);
    std::vector<char> plan((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());

    const vitedge::EngineSettings settings = vitedge::engine_settings(vitedge::Json::parse_file(dir + "/vitedge.json"));
    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
    if (!runtime) throw std::runtime_error("cannot create the TensorRT runtime");
    if (settings.version_compatible) runtime->setEngineHostCodeAllowed(true);  // the plan carries its lean runtime
    if (settings.dla_core >= 0) {
      if (settings.dla_core >= runtime->getNbDLACores())
        throw std::runtime_error("the engine runs on DLA core " + std::to_string(settings.dla_core) + ", this machine has " +
                                 std::to_string(runtime->getNbDLACores()) + " DLA cores");
      runtime->setDLACore(settings.dla_core);
    }
    std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine) throw std::runtime_error("TensorRT cannot load the plan (other TensorRT version or GPU): rebuild it here");
    std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
    if (!context) throw std::runtime_error("cannot create an execution context for the plan");

    std::vector<Tensor> tensors;
    for (int i = 0; i < engine->getNbIOTensors(); ++i) {
      Tensor t;
      t.name = engine->getIOTensorName(i);
      t.input = engine->getTensorIOMode(t.name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
      t.type = engine->getTensorDataType(t.name.c_str());
      if (t.input) {
        // Every dynamic dimension (-1: batch, and H, W of a dynamic-resolution graph) from the
        // preprocessed input, [1, C, H, W] as vitedge.json describes it; static ones must agree.
        const nvinfer1::Dims engine_dims = engine->getTensorShape(t.name.c_str());
        const std::vector<int64_t> shape = vitedge::fill_dynamic_dims(dims_vector(engine_dims), input.shape, t.name);
        nvinfer1::Dims dims = engine_dims;
        for (int d = 0; d < dims.nbDims; ++d) dims.d[d] = static_cast<decltype(dims.d[d] + 0)>(shape[d]);
        if (!context->setInputShape(t.name.c_str(), dims))
          throw std::runtime_error("input shape " + vitedge::shape_text(shape) + " is outside the engine's optimisation "
                                   "profile: rebuild with a --batch (or export with a resolution range) that covers it");
      }
      tensors.push_back(t);
    }
    if (!context->allInputDimensionsSpecified()) throw std::runtime_error("the engine has an input shape left unset");
    for (Tensor& t : tensors) {
      nvinfer1::Dims dims = context->getTensorShape(t.name.c_str());
      size_t count = 1;
      for (int d = 0; d < dims.nbDims; ++d) {
        if (dims.d[d] < 0)
          throw std::runtime_error("output " + t.name + " has a data-dependent shape " + vitedge::shape_text(dims_vector(dims)));
        count *= static_cast<size_t>(dims.d[d]);
      }
      t.bytes = (count * element_bits(t.type) + 7) / 8;
      t.host.resize(t.bytes);
      cuda_check(cudaMalloc(&t.device, std::max<size_t>(t.bytes, 1)), "cudaMalloc");
      if (!context->setTensorAddress(t.name.c_str(), t.device)) throw std::runtime_error("cannot bind " + t.name);
      if (t.input) {
        if (t.type != nvinfer1::DataType::kFLOAT || t.bytes != input.data.size() * sizeof(float))
          throw std::runtime_error("input " + t.name + " is not the float32 [1, C, H, W] tensor vitedge.json describes");
        std::memcpy(t.host.data(), input.data.data(), t.bytes);
      }
    }

    cudaStream_t stream;
    cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");
    cudaEvent_t before, after;
    cuda_check(cudaEventCreate(&before), "cudaEventCreate");
    cuda_check(cudaEventCreate(&after), "cudaEventCreate");

    std::vector<double> end_to_end, compute;
    for (int run = 0; run < iterations + 10; ++run) {  // the first 10 runs warm up
      auto start = std::chrono::steady_clock::now();
      for (Tensor& t : tensors)
        if (t.input) cuda_check(cudaMemcpyAsync(t.device, t.host.data(), t.bytes, cudaMemcpyHostToDevice, stream), "H2D");
      cuda_check(cudaEventRecord(before, stream), "cudaEventRecord");
      if (!context->enqueueV3(stream)) throw std::runtime_error("TensorRT inference failed");
      cuda_check(cudaEventRecord(after, stream), "cudaEventRecord");
      for (Tensor& t : tensors)
        if (!t.input) cuda_check(cudaMemcpyAsync(t.host.data(), t.device, t.bytes, cudaMemcpyDeviceToHost, stream), "D2H");
      cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      auto stop = std::chrono::steady_clock::now();
      float gpu_ms = 0;
      cuda_check(cudaEventElapsedTime(&gpu_ms, before, after), "cudaEventElapsedTime");
      if (run >= 10) {
        end_to_end.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
        compute.push_back(gpu_ms);
      }
    }

    const Tensor* logits = nullptr;
    for (const Tensor& t : tensors)
      if (t.name == meta.outputs[0]) logits = &t;
    if (!logits || logits->type != nvinfer1::DataType::kFLOAT) throw std::runtime_error("no float32 '" + meta.outputs[0] + "' output");
    const float* values = reinterpret_cast<const float*>(logits->host.data());
    std::printf("%s (%s), %s\n", meta.family.c_str(), meta.engine_precision.c_str(), argv[2]);
    for (const auto& p : vitedge::top_k(values, logits->bytes / sizeof(float), 5))
      std::printf("  class %d  p=%.4f  logit=%.4f\n", p.index, p.probability, p.logit);
    std::printf("latency over %d runs: end to end p50 %.3f ms p99 %.3f ms; GPU compute p50 %.3f ms p99 %.3f ms\n",
                iterations, percentile(end_to_end, 50), percentile(end_to_end, 99), percentile(compute, 50),
                percentile(compute, 99));

    for (Tensor& t : tensors) cudaFree(t.device);
    cudaEventDestroy(before);
    cudaEventDestroy(after);
    cudaStreamDestroy(stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vitedge_trt_infer: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
