// vision_encoder.cpp - see vision_encoder.h.
#include "vision_encoder.h"

#include <cstdio>
#include <cstring>
#include <string>

#include "error.h"

namespace qwenvl {
namespace {

constexpr const char* kInputName = "pixel_values";   // qwenvl_edge/contract.py VISION_INPUT
constexpr const char* kOutputName = "image_embeds";  // VISION_OUTPUT

// The API table of the linked ONNX Runtime, checked once: it must provide our pinned API version.
const void* api_table() {
    const ort::ApiBase* base = OrtGetApiBase();
    if (base == nullptr) fail(QWENVL_ERR_MODEL_LOAD, "ONNX Runtime: OrtGetApiBase() returned NULL");
    const char* version = base->GetVersionString != nullptr ? base->GetVersionString() : nullptr;
    const void* table = base->GetApi != nullptr ? base->GetApi(ort::kApiVersion) : nullptr;
    if (table == nullptr) {
        fail(QWENVL_ERR_MODEL_LOAD, std::string("ONNX Runtime ") + (version ? version : "(unknown version)") +
                                        " does not provide C API version " + std::to_string(ort::kApiVersion) +
                                        ": the native core needs ONNX Runtime >= " + ort::kPinned);
    }
    return table;
}

}  // namespace

std::string VisionEncoder::runtime_version() {
    api_table();
    return OrtGetApiBase()->GetVersionString();
}

// Turns a non-NULL OrtStatus into Error(status) with ONNX Runtime's message on one line.
#define QWENVL_ORT_CHECK(call, what)                                                                        \
    do {                                                                                                    \
        ort::Status* _s = (call);                                                                           \
        if (_s != nullptr) {                                                                                \
            std::string _m = api_.get<ort::GetErrorMessageFn>(ort::kGetErrorMessage)(_s);                   \
            api_.get<ort::ReleaseFn<ort::Status>>(ort::kReleaseStatus)(_s);                                 \
            for (char& _c : _m)                                                                             \
                if (_c == '\n' || _c == '\r') _c = ' ';                                                     \
            if (_m.size() > 300) _m.resize(300);                                                            \
            fail(QWENVL_ERR_MODEL_LOAD, path_ + ": " + (what) + " (" + _m + ")");                           \
        }                                                                                                   \
    } while (0)

VisionEncoder::VisionEncoder(const std::string& onnx_path, int32_t n_threads)
    : path_(onnx_path), api_(api_table()) {
    if (n_threads < 0) fail(QWENVL_ERR_INVALID_ARGUMENT, "n_threads " + std::to_string(n_threads) + " is negative");
    FILE* f = std::fopen(onnx_path.c_str(), "rb");
    if (f == nullptr) fail(QWENVL_ERR_MODEL_LOAD, onnx_path + ": vision model is missing or unreadable");
    std::fclose(f);
    try {
        QWENVL_ORT_CHECK(api_.get<ort::CreateEnvFn>(ort::kCreateEnv)(ort::kLoggingLevelError, "qwenvl", &env_),
                         "cannot create the ONNX Runtime environment");
        ort::Status* s = api_.get<ort::DisableTelemetryEventsFn>(ort::kDisableTelemetryEvents)(env_);
        if (s != nullptr) api_.get<ort::ReleaseFn<ort::Status>>(ort::kReleaseStatus)(s);  // not fatal
        QWENVL_ORT_CHECK(api_.get<ort::CreateSessionOptionsFn>(ort::kCreateSessionOptions)(&options_),
                         "cannot create session options");
        const auto set = [&](ort::Slot slot, int value, const char* what) {
            QWENVL_ORT_CHECK(api_.get<ort::SetIntOptionFn>(slot)(options_, value), what);
        };
        set(ort::kSetSessionGraphOptimizationLevel, ort::kEnableAll, "cannot set the optimisation level");
        set(ort::kSetSessionExecutionMode, ort::kSequential, "cannot set sequential execution");
        set(ort::kSetIntraOpNumThreads, n_threads, "cannot set the thread count");
        set(ort::kSetInterOpNumThreads, 1, "cannot set the inter-op thread count");
        set(ort::kSetSessionLogSeverityLevel, ort::kLoggingLevelError, "cannot set the log level");
        QWENVL_ORT_CHECK(api_.get<ort::CreateSessionFn>(ort::kCreateSession)(env_, onnx_path.c_str(), options_, &session_),
                         "not a loadable ONNX model");
        QWENVL_ORT_CHECK(api_.get<ort::CreateCpuMemoryInfoFn>(ort::kCreateCpuMemoryInfo)(ort::kArenaAllocator,
                                                                                         ort::kMemTypeDefault, &memory_),
                         "cannot describe CPU memory");
        check_signature();
    } catch (...) {
        release();  // the destructor does not run for a constructor that throws
        throw;
    }
}

VisionEncoder::~VisionEncoder() { release(); }

void VisionEncoder::release() {
    if (memory_) api_.get<ort::ReleaseFn<ort::MemoryInfo>>(ort::kReleaseMemoryInfo)(memory_);
    if (session_) api_.get<ort::ReleaseFn<ort::Session>>(ort::kReleaseSession)(session_);
    if (options_) api_.get<ort::ReleaseFn<ort::SessionOptions>>(ort::kReleaseSessionOptions)(options_);
    if (env_) api_.get<ort::ReleaseFn<ort::Env>>(ort::kReleaseEnv)(env_);
    memory_ = nullptr;
    session_ = nullptr;
    options_ = nullptr;
    env_ = nullptr;
}

void VisionEncoder::check_signature() {
    size_t n_in = 0, n_out = 0;
    QWENVL_ORT_CHECK(api_.get<ort::SessionCountFn>(ort::kSessionGetInputCount)(session_, &n_in), "no input count");
    QWENVL_ORT_CHECK(api_.get<ort::SessionCountFn>(ort::kSessionGetOutputCount)(session_, &n_out), "no output count");
    const std::string want = std::string("want ") + kInputName + " float [N, 3, S, S] -> " + kOutputName +
                             " float [N, rows, hidden]";
    if (n_in != 1 || n_out != 1) {
        fail(QWENVL_ERR_MODEL_LOAD, path_ + ": has " + std::to_string(n_in) + " input(s) and " + std::to_string(n_out) +
                                        " output(s); " + want);
    }
    ort::Allocator* allocator = nullptr;
    QWENVL_ORT_CHECK(api_.get<ort::GetAllocatorWithDefaultOptionsFn>(ort::kGetAllocatorWithDefaultOptions)(&allocator),
                     "no default allocator");
    const auto name_of = [&](ort::Slot slot) {
        char* raw = nullptr;
        QWENVL_ORT_CHECK(api_.get<ort::SessionNameFn>(slot)(session_, 0, allocator, &raw), "no tensor name");
        std::string name = raw ? raw : "";
        ort::Status* s = api_.get<ort::AllocatorFreeFn>(ort::kAllocatorFree)(allocator, raw);
        if (s != nullptr) api_.get<ort::ReleaseFn<ort::Status>>(ort::kReleaseStatus)(s);
        return name;
    };
    // element type and dims of input/output 0 (-1 for a symbolic dimension)
    const auto shape_of = [&](ort::Slot slot, int* type) {
        ort::TypeInfo* info = nullptr;
        QWENVL_ORT_CHECK(api_.get<ort::SessionTypeInfoFn>(slot)(session_, 0, &info), "no type information");
        std::vector<int64_t> dims;
        const ort::TensorInfo* tensor = nullptr;
        ort::Status* s = api_.get<ort::CastTypeInfoToTensorInfoFn>(ort::kCastTypeInfoToTensorInfo)(info, &tensor);
        size_t rank = 0;
        if (s == nullptr && tensor != nullptr) s = api_.get<ort::GetTensorElementTypeFn>(ort::kGetTensorElementType)(tensor, type);
        if (s == nullptr && tensor != nullptr) s = api_.get<ort::GetDimensionsCountFn>(ort::kGetDimensionsCount)(tensor, &rank);
        if (s == nullptr && tensor != nullptr) {
            dims.resize(rank);
            s = api_.get<ort::GetDimensionsFn>(ort::kGetDimensions)(tensor, dims.data(), rank);
        }
        api_.get<ort::ReleaseFn<ort::TypeInfo>>(ort::kReleaseTypeInfo)(info);
        QWENVL_ORT_CHECK(s, "no tensor shape");
        if (tensor == nullptr) *type = 0;
        return dims;
    };
    input_name_ = name_of(ort::kSessionGetInputName);
    output_name_ = name_of(ort::kSessionGetOutputName);
    int in_type = 0, out_type = 0;
    const std::vector<int64_t> x = shape_of(ort::kSessionGetInputTypeInfo, &in_type);
    const std::vector<int64_t> y = shape_of(ort::kSessionGetOutputTypeInfo, &out_type);
    const bool ok = input_name_ == kInputName && output_name_ == kOutputName && in_type == ort::kElementFloat &&
                    out_type == ort::kElementFloat && x.size() == 4 && y.size() == 3 && x[1] == 3 && x[2] > 0 &&
                    x[2] == x[3] && x[2] <= 8192 && y[1] > 0 && y[2] > 0 && y[1] * y[2] <= (int64_t{1} << 28);
    if (!ok) {
        const auto dims = [](const std::vector<int64_t>& d) {
            std::string s = "[";
            for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + (d[i] < 0 ? std::string("?") : std::to_string(d[i]));
            return s + "]";
        };
        fail(QWENVL_ERR_MODEL_LOAD, path_ + ": wrong vision signature: got " + input_name_ + " " + dims(x) + " -> " +
                                        output_name_ + " " + dims(y) + "; " + want);
    }
    image_size_ = static_cast<int32_t>(x[2]);
    n_rows_ = static_cast<int32_t>(y[1]);
    n_embd_ = static_cast<int32_t>(y[2]);
}

void VisionEncoder::encode(const float* pixels, float* out) {
    if (pixels == nullptr || out == nullptr) fail(QWENVL_ERR_INVALID_ARGUMENT, "pixels or out is NULL");
    const int64_t shape[4] = {1, 3, image_size_, image_size_};
    const size_t n_in = size_t{3} * static_cast<size_t>(image_size_) * static_cast<size_t>(image_size_);
    ort::Value* input = nullptr;
    ort::Value* output = nullptr;
    const auto release = [&] {
        if (input) api_.get<ort::ReleaseFn<ort::Value>>(ort::kReleaseValue)(input);
        if (output) api_.get<ort::ReleaseFn<ort::Value>>(ort::kReleaseValue)(output);
        input = output = nullptr;
    };
    try {
        // ONNX Runtime reads the caller's buffer in place (it does not write inputs)
        QWENVL_ORT_CHECK(api_.get<ort::CreateTensorWithDataFn>(ort::kCreateTensorWithDataAsOrtValue)(
                             memory_, const_cast<float*>(pixels), n_in * sizeof(float), shape, 4, ort::kElementFloat,
                             &input),
                         "cannot wrap the pixels");
        const char* in_names[1] = {input_name_.c_str()};
        const char* out_names[1] = {output_name_.c_str()};
        const ort::Value* inputs[1] = {input};
        QWENVL_ORT_CHECK(api_.get<ort::RunFn>(ort::kRun)(session_, nullptr, in_names, inputs, 1, out_names, 1, &output),
                         "running the vision graph failed");
        ort::TensorInfo* info = nullptr;
        QWENVL_ORT_CHECK(api_.get<ort::GetTensorTypeAndShapeFn>(ort::kGetTensorTypeAndShape)(output, &info),
                         "no output shape");
        int64_t dims[3] = {0, 0, 0};
        size_t rank = 0;
        ort::Status* s = api_.get<ort::GetDimensionsCountFn>(ort::kGetDimensionsCount)(info, &rank);
        if (s == nullptr && rank == 3) s = api_.get<ort::GetDimensionsFn>(ort::kGetDimensions)(info, dims, 3);
        api_.get<ort::ReleaseFn<ort::TensorInfo>>(ort::kReleaseTensorInfo)(info);
        QWENVL_ORT_CHECK(s, "no output shape");
        if (rank != 3 || dims[0] != 1 || dims[1] != n_rows_ || dims[2] != n_embd_) {
            fail(QWENVL_ERR_MODEL_LOAD, path_ + ": the vision graph returned another shape than it declares");
        }
        void* data = nullptr;
        QWENVL_ORT_CHECK(api_.get<ort::GetTensorMutableDataFn>(ort::kGetTensorMutableData)(output, &data),
                         "no output data");
        std::memcpy(out, data, sizeof(float) * static_cast<size_t>(n_rows_) * static_cast<size_t>(n_embd_));
    } catch (...) {
        release();
        throw;
    }
    release();
}

#undef QWENVL_ORT_CHECK

}  // namespace qwenvl
