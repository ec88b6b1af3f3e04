// vision_encoder.h - the bundle's vision graph (vision.onnx, FP32 or INT8) run by ONNX Runtime's C API.
//
// As the Python runtime's VisionEncoder (runtime/vision.py): one CPU session, full graph
// optimisation, sequential execution, errors-only logging; the signature is checked once at load
// (input pixel_values float [N, 3, S, S], output image_embeds float [N, n_rows, n_embd], S and n_embd
// fixed), so a wrong file fails before any prompt is processed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ort_api.h"

namespace qwenvl {

class VisionEncoder {
public:
    // Loads `onnx_path`; n_threads 0: ONNX Runtime's default (one per physical core).
    // Throws Error(QWENVL_ERR_MODEL_LOAD) for a missing or wrong file, or an ONNX Runtime too old.
    VisionEncoder(const std::string& onnx_path, int32_t n_threads);
    ~VisionEncoder();
    VisionEncoder(const VisionEncoder&) = delete;
    VisionEncoder& operator=(const VisionEncoder&) = delete;

    int32_t image_size() const { return image_size_; }
    int32_t n_rows() const { return n_rows_; }
    int32_t n_embd() const { return n_embd_; }

    // pixels float32 [3, S, S] -> rows float32 [n_rows, n_embd] (written to `out`).
    void encode(const float* pixels, float* out);

    // The loaded ONNX Runtime's version string ("1.32.0"); throws when it cannot be loaded.
    static std::string runtime_version();

private:
    void check_signature();
    void release();

    std::string path_;
    ort::Api api_;
    ort::Env* env_ = nullptr;
    ort::SessionOptions* options_ = nullptr;
    ort::Session* session_ = nullptr;
    ort::MemoryInfo* memory_ = nullptr;
    std::string input_name_;
    std::string output_name_;
    int32_t image_size_ = 0;
    int32_t n_rows_ = 0;
    int32_t n_embd_ = 0;
};

}  // namespace qwenvl
