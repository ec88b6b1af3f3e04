// qwenvl_vision.cpp - the vision C API (qwenvl_vision.h) over VisionEncoder, or its stubs in a build
// without ONNX Runtime.
#include "qwenvl_vision.h"

#include <memory>
#include <string>

#include "c_api_guard.h"
#include "error.h"
#ifdef QWENVL_HAVE_VISION
#include "vision_encoder.h"
#endif

using qwenvl::fail;
using qwenvl::guarded;
using qwenvl::require;

#ifdef QWENVL_HAVE_VISION

struct qwenvl_vision {
    std::unique_ptr<qwenvl::VisionEncoder> impl;
};

extern "C" {

int qwenvl_vision_open(const char* onnx_path, int32_t n_threads, qwenvl_vision** out_vision) {
    return guarded([&] {
        require(out_vision != nullptr, "out_vision is NULL");
        *out_vision = nullptr;
        require(onnx_path != nullptr && onnx_path[0] != '\0', "onnx_path is NULL or empty");
        auto vision = std::make_unique<qwenvl_vision>();
        vision->impl = std::make_unique<qwenvl::VisionEncoder>(onnx_path, n_threads);
        *out_vision = vision.release();
    });
}

int qwenvl_vision_get_info(const qwenvl_vision* vision, qwenvl_vision_info* out_info) {
    return guarded([&] {
        require(vision != nullptr && out_info != nullptr, "vision or out_info is NULL");
        out_info->image_size = vision->impl->image_size();
        out_info->n_rows = vision->impl->n_rows();
        out_info->n_embd = vision->impl->n_embd();
    });
}

int qwenvl_vision_encode(qwenvl_vision* vision, const float* pixels, float* out_rows) {
    return guarded([&] {
        require(vision != nullptr, "vision is NULL");
        vision->impl->encode(pixels, out_rows);
    });
}

int qwenvl_vision_close(qwenvl_vision* vision) {
    return guarded([&] { delete vision; });
}

const char* qwenvl_vision_runtime_version(void) {
    static thread_local std::string version;
    const int rc = guarded([&] { version = qwenvl::VisionEncoder::runtime_version(); });
    return rc == QWENVL_OK ? version.c_str() : nullptr;
}

}  // extern "C"

#else  // built without ONNX Runtime

struct qwenvl_vision {};

namespace {
[[noreturn]] void no_ort() {
    fail(QWENVL_ERR_MODEL_LOAD, "this libqwenvl_core was built without ONNX Runtime (no vision step): "
                                "configure with -DQWENVL_ORT_LIBRARY=/path/to/libonnxruntime.so");
}
}  // namespace

extern "C" {
int qwenvl_vision_open(const char*, int32_t, qwenvl_vision** out_vision) {
    if (out_vision != nullptr) *out_vision = nullptr;
    return guarded([] { no_ort(); });
}
int qwenvl_vision_get_info(const qwenvl_vision*, qwenvl_vision_info*) { return guarded([] { no_ort(); }); }
int qwenvl_vision_encode(qwenvl_vision*, const float*, float*) { return guarded([] { no_ort(); }); }
int qwenvl_vision_close(qwenvl_vision*) { return QWENVL_OK; }
const char* qwenvl_vision_runtime_version(void) {
    guarded([] { no_ort(); });
    return nullptr;
}
}  // extern "C"

#endif
