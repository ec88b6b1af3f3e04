// ort_api.h - the few ONNX Runtime C API entries the native core calls, declared by hand.
//
// Why by hand: no package we can install (PyPI wheel, npm onnxruntime-node, Debian) ships
// onnxruntime_c_api.h, only the shared library, and the core must not carry a copy of ONNX Runtime's
// source. ONNX Runtime's C API is an ABI-stable table: `OrtGetApiBase()->GetApi(version)` returns a
// struct of function pointers whose order never changes (new entries are only appended), so a caller
// needs just the slot index and the signature of each entry it uses. This file names those slots
// (indices counted in ONNX Runtime's public header; they have been fixed since API version 1) and
// their signatures as we call them, with opaque handle types.
//
// Pinned to ONNX Runtime 1.32.0 (C API version 32), the version of the onnxruntime wheels the project
// uses on x86-64 and aarch64; VisionEncoder checks at run time that the loaded library provides API
// version 32 (GetApi(32) non-NULL, i.e. ONNX Runtime >= 1.32) and refuses with one line otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qwenvl::ort {

constexpr uint32_t kApiVersion = 32;      // ORT_API_VERSION of ONNX Runtime 1.32.0
constexpr const char* kPinned = "1.32.0";  // the version this table was checked against

// Opaque handles (ONNX Runtime's OrtEnv, OrtSession, ...): only pointers to them cross the API.
struct Env;
struct Status;  // NULL means success
struct MemoryInfo;
struct Session;
struct Value;
struct RunOptions;
struct TypeInfo;
struct TensorInfo;  // OrtTensorTypeAndShapeInfo
struct SessionOptions;
struct Allocator;

// Enum values as ONNX Runtime defines them (the ones we pass or compare).
constexpr int kLoggingLevelError = 3;        // OrtLoggingLevel ORT_LOGGING_LEVEL_ERROR
constexpr int kElementFloat = 1;             // ONNXTensorElementDataType FLOAT
constexpr int kSequential = 0;               // ExecutionMode ORT_SEQUENTIAL
constexpr int kEnableAll = 99;               // GraphOptimizationLevel ORT_ENABLE_ALL
constexpr int kArenaAllocator = 1;           // OrtAllocatorType OrtArenaAllocator
constexpr int kMemTypeDefault = 0;           // OrtMemType OrtMemTypeDefault

// OrtApiBase: the one exported symbol's struct.
struct ApiBase {
    const void* (*GetApi)(uint32_t version);  // the OrtApi table, or NULL when `version` is not supported
    const char* (*GetVersionString)();
};

// Slot indices in the OrtApi table (each slot is one function pointer).
enum Slot : size_t {
    kGetErrorMessage = 2,
    kCreateEnv = 3,
    kDisableTelemetryEvents = 6,
    kCreateSession = 7,
    kRun = 9,
    kCreateSessionOptions = 10,
    kSetSessionExecutionMode = 13,
    kSetSessionLogSeverityLevel = 22,
    kSetSessionGraphOptimizationLevel = 23,
    kSetIntraOpNumThreads = 24,
    kSetInterOpNumThreads = 25,
    kSessionGetInputCount = 30,
    kSessionGetOutputCount = 31,
    kSessionGetInputTypeInfo = 33,
    kSessionGetOutputTypeInfo = 34,
    kSessionGetInputName = 36,
    kSessionGetOutputName = 37,
    kCreateTensorWithDataAsOrtValue = 49,
    kGetTensorMutableData = 51,
    kCastTypeInfoToTensorInfo = 55,
    kGetTensorElementType = 60,
    kGetDimensionsCount = 61,
    kGetDimensions = 62,
    kGetTensorTypeAndShape = 65,
    kCreateCpuMemoryInfo = 69,
    kAllocatorFree = 76,
    kGetAllocatorWithDefaultOptions = 78,
    kReleaseEnv = 92,
    kReleaseStatus = 93,
    kReleaseMemoryInfo = 94,
    kReleaseSession = 95,
    kReleaseValue = 96,
    kReleaseTypeInfo = 98,
    kReleaseTensorInfo = 99,
    kReleaseSessionOptions = 100,
};

// Signatures, by slot.
using GetErrorMessageFn = const char* (*)(const Status*);
using CreateEnvFn = Status* (*)(int level, const char* logid, Env** out);
using DisableTelemetryEventsFn = Status* (*)(const Env*);
using CreateSessionFn = Status* (*)(const Env*, const char* path, const SessionOptions*, Session** out);
using RunFn = Status* (*)(Session*, const RunOptions*, const char* const* input_names, const Value* const* inputs,
                          size_t n_inputs, const char* const* output_names, size_t n_outputs, Value** outputs);
using CreateSessionOptionsFn = Status* (*)(SessionOptions** out);
using SetIntOptionFn = Status* (*)(SessionOptions*, int);  // execution mode, log level, optimisation, threads
using SessionCountFn = Status* (*)(const Session*, size_t* out);
using SessionTypeInfoFn = Status* (*)(const Session*, size_t index, TypeInfo** out);
using SessionNameFn = Status* (*)(const Session*, size_t index, Allocator*, char** out);
using CreateTensorWithDataFn = Status* (*)(const MemoryInfo*, void* data, size_t bytes, const int64_t* shape,
                                           size_t rank, int element_type, Value** out);
using GetTensorMutableDataFn = Status* (*)(Value*, void** out);
using CastTypeInfoToTensorInfoFn = Status* (*)(const TypeInfo*, const TensorInfo** out);
using GetTensorElementTypeFn = Status* (*)(const TensorInfo*, int* out);
using GetDimensionsCountFn = Status* (*)(const TensorInfo*, size_t* out);
using GetDimensionsFn = Status* (*)(const TensorInfo*, int64_t* dims, size_t n);
using GetTensorTypeAndShapeFn = Status* (*)(const Value*, TensorInfo** out);
using CreateCpuMemoryInfoFn = Status* (*)(int allocator_type, int mem_type, MemoryInfo** out);
using AllocatorFreeFn = Status* (*)(Allocator*, void* p);
using GetAllocatorWithDefaultOptionsFn = Status* (*)(Allocator** out);
template <class T>
using ReleaseFn = void (*)(T*);

// The table as returned by GetApi: read-only slots of function pointers (casting one function
// pointer type to another is well defined; the slot's real signature is the one above).
class Api {
public:
    using AnyFn = void (*)();
    explicit Api(const void* table) : slots_(static_cast<const AnyFn*>(table)) {}

    template <class Fn>
    Fn get(Slot slot) const {
        return reinterpret_cast<Fn>(slots_[slot]);
    }

private:
    const AnyFn* slots_;
};

}  // namespace qwenvl::ort

// The one symbol we link: defined in libonnxruntime.
extern "C" __attribute__((visibility("default"))) const qwenvl::ort::ApiBase* OrtGetApiBase(void);
