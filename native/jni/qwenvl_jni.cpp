// qwenvl_jni.cpp - JNI bridge: ai.qwenvledge.QwenVLNative -> the qwenvl_core C API, the whole device
// pipeline: image (file or pixels) -> qwenvl_preprocess_image -> qwenvl_vision_* (vision.onnx through
// ONNX Runtime's C API) -> the vision model freed -> qwenvl_open / qwenvl_generate (llm.gguf, llama.cpp).
//
// Handles given to Java are ids from a registry, not pointers: a closed, stale or made-up handle, or a
// vision handle where a decoder one is expected (and the reverse), throws IllegalStateException instead
// of crashing the app, and close() during a generate() or an encode on another thread waits for it
// (the entry is shared and freed by its last user).
#include <jni.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "qwenvl_core.h"
#include "qwenvl_vision.h"
#ifdef QWENVL_HAVE_PREPROCESS
#include "qwenvl_preprocess.h"
#endif
#ifdef QWENVL_JNI_IMAGE_FILE
#include "image_file.h"  // native/tools: PNG/JPEG/PPM -> upright RGB, as the Python runtime reads a file
#endif

namespace {

// --- Java classes and methods, looked up once in JNI_OnLoad --------------------------------------
struct JavaRefs {
    jclass string = nullptr;
    jclass illegal_argument = nullptr;
    jclass illegal_state = nullptr;
    jclass runtime = nullptr;
    jclass unsupported = nullptr;
    jobject utf8 = nullptr;           // java.nio.charset.StandardCharsets.UTF_8
    jmethodID string_from_bytes = nullptr;  // String(byte[], Charset)
    jmethodID string_get_bytes = nullptr;   // byte[] String.getBytes(Charset)
};
JavaRefs g_java;

jclass global_class(JNIEnv* env, const char* name) {
    jclass local = env->FindClass(name);
    if (local == nullptr) return nullptr;
    auto global = static_cast<jclass>(env->NewGlobalRef(local));
    env->DeleteLocalRef(local);
    return global;
}

void throw_java(JNIEnv* env, jclass cls, const std::string& message) {
    if (!env->ExceptionCheck()) env->ThrowNew(cls, message.c_str());
}

// A failed qwenvl_* call as the Java exception for its status.
void throw_status(JNIEnv* env, int status, const char* what) {
    std::string message = std::string(what) + ": " + qwenvl_last_error();
    jclass cls = status == QWENVL_ERR_INVALID_ARGUMENT ? g_java.illegal_argument : g_java.runtime;
    throw_java(env, cls, message);
}

// UTF-8 bytes -> java.lang.String (standard UTF-8, not JNI's modified UTF-8: emoji survive).
jstring to_jstring(JNIEnv* env, const char* bytes, size_t n) {
    jbyteArray array = env->NewByteArray(static_cast<jsize>(n));
    if (array == nullptr) return nullptr;
    env->SetByteArrayRegion(array, 0, static_cast<jsize>(n), reinterpret_cast<const jbyte*>(bytes));
    auto out = static_cast<jstring>(env->NewObject(g_java.string, g_java.string_from_bytes, array, g_java.utf8));
    env->DeleteLocalRef(array);
    return out;
}

// java.lang.String -> UTF-8 bytes. False (with a Java exception pending) on failure.
bool to_utf8(JNIEnv* env, jstring text, std::string& out) {
    auto array = static_cast<jbyteArray>(env->CallObjectMethod(text, g_java.string_get_bytes, g_java.utf8));
    if (array == nullptr || env->ExceptionCheck()) return false;
    const jsize n = env->GetArrayLength(array);
    out.assign(static_cast<size_t>(n), '\0');
    env->GetByteArrayRegion(array, 0, n, reinterpret_cast<jbyte*>(out.data()));
    env->DeleteLocalRef(array);
    return !env->ExceptionCheck();
}

// --- the handle registry -----------------------------------------------------------------------
// One entry holds either a decoder session (open) or a vision model (openVision), never both.
struct Entry {
    qwenvl_session* session = nullptr;
    qwenvl_vision* vision = nullptr;
    std::mutex busy;  // one call at a time per handle
    ~Entry() {
        qwenvl_close(session);
        qwenvl_vision_close(vision);
    }
};

std::mutex g_registry_mutex;
std::unordered_map<jlong, std::shared_ptr<Entry>> g_registry;
jlong g_next_handle = 1;

enum class Kind { decoder, vision, any };

// The open entry of `handle`, of the kind wanted; null with IllegalStateException pending otherwise.
std::shared_ptr<Entry> find_entry(JNIEnv* env, jlong handle, Kind kind = Kind::decoder) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    auto it = g_registry.find(handle);
    if (it == g_registry.end()) {
        throw_java(env, g_java.illegal_state, "handle " + std::to_string(handle) + " is not open (closed or invalid)");
        return nullptr;
    }
    const bool is_vision = it->second->vision != nullptr;
    if ((kind == Kind::decoder && is_vision) || (kind == Kind::vision && !is_vision)) {
        throw_java(env, g_java.illegal_state,
                   "handle " + std::to_string(handle) + " is a " + (is_vision ? "vision" : "decoder") +
                       " handle, expected a " + (is_vision ? "decoder (open)" : "vision (openVision)") + " handle");
        return nullptr;
    }
    return it->second;
}

jlong register_entry(std::shared_ptr<Entry> entry) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    const jlong handle = g_next_handle++;
    g_registry.emplace(handle, std::move(entry));
    return handle;
}

// "f16" (or null/empty: the default) or "q8_0" -> QWENVL_KV_*; -1 with IllegalArgumentException pending.
int32_t kv_type_from_name(JNIEnv* env, jstring kv_type) {
    if (kv_type == nullptr) return QWENVL_KV_F16;
    std::string name;
    if (!to_utf8(env, kv_type, name)) return -1;
    if (name.empty() || name == "f16") return QWENVL_KV_F16;
    if (name == "q8_0") return QWENVL_KV_Q8_0;
    throw_java(env, g_java.illegal_argument, "open: kvType '" + name + "': expected \"f16\" or \"q8_0\"");
    return -1;
}

// The model's mean/std (3 floats each, from the bundle's manifest); false with an exception pending.
bool read_norm(JNIEnv* env, const char* what, jfloatArray mean, jfloatArray std, float* out_mean, float* out_std) {
    if (mean == nullptr || std == nullptr || env->GetArrayLength(mean) != 3 || env->GetArrayLength(std) != 3) {
        throw_java(env, g_java.illegal_argument, std::string(what) + ": mean and std must be 3 floats each (the model's)");
        return false;
    }
    env->GetFloatArrayRegion(mean, 0, 3, out_mean);
    env->GetFloatArrayRegion(std, 0, 3, out_std);
    return !env->ExceptionCheck();
}

jfloatArray to_jfloats(JNIEnv* env, const std::vector<float>& values) {
    jfloatArray result = env->NewFloatArray(static_cast<jsize>(values.size()));
    if (result == nullptr) return nullptr;  // OutOfMemoryError pending
    env->SetFloatArrayRegion(result, 0, static_cast<jsize>(values.size()), values.data());
    return result;
}

// pixels float32 [3, S, S] -> the image rows [n_rows * n_embd] as a Java array; null with an exception pending.
jfloatArray encode_rows(JNIEnv* env, Entry& entry, const float* pixels, const char* what) {
    qwenvl_vision_info info{};
    if (int rc = qwenvl_vision_get_info(entry.vision, &info); rc != QWENVL_OK) {
        throw_status(env, rc, what);
        return nullptr;
    }
    std::vector<float> rows(static_cast<size_t>(info.n_rows) * static_cast<size_t>(info.n_embd));
    if (int rc = qwenvl_vision_encode(entry.vision, pixels, rows.data()); rc != QWENVL_OK) {
        throw_status(env, rc, what);
        return nullptr;
    }
    return to_jfloats(env, rows);
}

#ifdef QWENVL_HAVE_PREPROCESS
// HWC bytes -> pixels [3, S, S] (S the vision model's side) -> rows; null with an exception pending.
jfloatArray encode_bytes(JNIEnv* env, Entry& entry, const unsigned char* bytes, int width, int height, int channels,
                         const float* mean, const float* std, const char* what) {
    qwenvl_vision_info info{};
    if (int rc = qwenvl_vision_get_info(entry.vision, &info); rc != QWENVL_OK) {
        throw_status(env, rc, what);
        return nullptr;
    }
    const size_t side = static_cast<size_t>(info.image_size);
    std::vector<float> pixels(3 * side * side);
    const int rc = qwenvl_preprocess_image(bytes, width, height, channels, info.image_size, mean, std, pixels.data());
    if (rc != QWENVL_PREPROCESS_OK) {
        throw_java(env, g_java.illegal_argument, std::string(what) + ": " + qwenvl_preprocess_error_string(rc));
        return nullptr;
    }
    return encode_rows(env, entry, pixels.data(), what);
}
#endif

// --- streaming -----------------------------------------------------------------------------------
struct CallbackState {
    JNIEnv* env;
    jobject callback;
    jmethodID on_token;
};

int on_token(const char* piece, int32_t piece_len, int32_t /*token*/, void* user_data) {
    auto* state = static_cast<CallbackState*>(user_data);
    JNIEnv* env = state->env;
    if (env->ExceptionCheck()) return 1;  // an earlier piece threw: no more JNI calls
    if (piece_len == 0) return 0;  // the token ended inside a character: its bytes come with the next piece
    jstring text = to_jstring(env, piece, static_cast<size_t>(piece_len));
    if (text == nullptr) return 1;
    const jboolean go_on = env->CallBooleanMethod(state->callback, state->on_token, text);
    env->DeleteLocalRef(text);
    if (env->ExceptionCheck()) return 1;  // stop; the exception reaches Java when generate returns
    return go_on ? 0 : 1;
}

}  // namespace

extern "C" {

JNIEXPORT jint JNICALL JNI_OnLoad(JavaVM* vm, void* /*reserved*/) {
    JNIEnv* env = nullptr;
    if (vm->GetEnv(reinterpret_cast<void**>(&env), JNI_VERSION_1_6) != JNI_OK) return JNI_ERR;
    g_java.string = global_class(env, "java/lang/String");
    g_java.illegal_argument = global_class(env, "java/lang/IllegalArgumentException");
    g_java.illegal_state = global_class(env, "java/lang/IllegalStateException");
    g_java.runtime = global_class(env, "java/lang/RuntimeException");
    g_java.unsupported = global_class(env, "java/lang/UnsupportedOperationException");
    jclass charsets = env->FindClass("java/nio/charset/StandardCharsets");
    if (!g_java.string || !g_java.illegal_argument || !g_java.illegal_state || !g_java.runtime ||
        !g_java.unsupported || !charsets) {
        return JNI_ERR;
    }
    jfieldID utf8_field = env->GetStaticFieldID(charsets, "UTF_8", "Ljava/nio/charset/Charset;");
    if (utf8_field == nullptr) return JNI_ERR;
    jobject utf8 = env->GetStaticObjectField(charsets, utf8_field);
    g_java.utf8 = env->NewGlobalRef(utf8);
    env->DeleteLocalRef(utf8);
    env->DeleteLocalRef(charsets);
    g_java.string_from_bytes = env->GetMethodID(g_java.string, "<init>", "([BLjava/nio/charset/Charset;)V");
    g_java.string_get_bytes = env->GetMethodID(g_java.string, "getBytes", "(Ljava/nio/charset/Charset;)[B");
    if (!g_java.utf8 || !g_java.string_from_bytes || !g_java.string_get_bytes) return JNI_ERR;
    return JNI_VERSION_1_6;
}

JNIEXPORT jlong JNICALL Java_ai_qwenvledge_QwenVLNative_open(JNIEnv* env, jclass, jstring gguf_path, jint n_ctx,
                                                              jint n_threads, jstring kv_type, jboolean use_mmap) {
    if (gguf_path == nullptr) {
        throw_java(env, g_java.illegal_argument, "ggufPath is null");
        return 0;
    }
    std::string path;
    if (!to_utf8(env, gguf_path, path)) return 0;
    qwenvl_open_params params = qwenvl_open_default_params();
    if (n_ctx != 0) params.n_ctx = n_ctx;
    params.n_threads = n_threads;
    params.kv_type = kv_type_from_name(env, kv_type);
    if (params.kv_type < 0) return 0;
    params.use_mmap = use_mmap ? 1 : 0;
    qwenvl_session* session = nullptr;
    const int rc = qwenvl_open(path.c_str(), &params, &session);
    if (rc != QWENVL_OK) {
        throw_status(env, rc, "open");
        return 0;
    }
    auto entry = std::make_shared<Entry>();
    entry->session = session;
    return register_entry(std::move(entry));
}

JNIEXPORT jlong JNICALL Java_ai_qwenvledge_QwenVLNative_openVision(JNIEnv* env, jclass, jstring onnx_path,
                                                                    jint n_threads) {
    if (onnx_path == nullptr) {
        throw_java(env, g_java.illegal_argument, "onnxPath is null");
        return 0;
    }
    std::string path;
    if (!to_utf8(env, onnx_path, path)) return 0;
    qwenvl_vision* vision = nullptr;
    if (int rc = qwenvl_vision_open(path.c_str(), n_threads, &vision); rc != QWENVL_OK) {
        throw_status(env, rc, "openVision");
        return 0;
    }
    auto entry = std::make_shared<Entry>();
    entry->vision = vision;
    return register_entry(std::move(entry));
}

JNIEXPORT jint JNICALL Java_ai_qwenvledge_QwenVLNative_imageSize(JNIEnv* env, jclass, jlong handle) {
    std::shared_ptr<Entry> entry = find_entry(env, handle, Kind::vision);
    if (!entry) return 0;
    std::lock_guard<std::mutex> busy(entry->busy);
    qwenvl_vision_info info{};
    if (int rc = qwenvl_vision_get_info(entry->vision, &info); rc != QWENVL_OK) {
        throw_status(env, rc, "imageSize");
        return 0;
    }
    return info.image_size;
}

JNIEXPORT jfloatArray JNICALL Java_ai_qwenvledge_QwenVLNative_encodePixels(JNIEnv* env, jclass, jlong handle,
                                                                             jfloatArray pixels) {
    std::shared_ptr<Entry> entry = find_entry(env, handle, Kind::vision);
    if (!entry) return nullptr;
    std::lock_guard<std::mutex> busy(entry->busy);
    qwenvl_vision_info info{};
    if (int rc = qwenvl_vision_get_info(entry->vision, &info); rc != QWENVL_OK) {
        throw_status(env, rc, "encodePixels");
        return nullptr;
    }
    const int64_t needed = 3 * static_cast<int64_t>(info.image_size) * info.image_size;
    const jsize given = pixels ? env->GetArrayLength(pixels) : 0;
    if (pixels == nullptr || given != needed) {
        throw_java(env, g_java.illegal_argument,
                   "encodePixels: pixels has " + (pixels ? std::to_string(given) : std::string("null")) +
                       " floats, expected 3 x " + std::to_string(info.image_size) + " x " +
                       std::to_string(info.image_size) + " = " + std::to_string(needed));
        return nullptr;
    }
    std::vector<float> input(static_cast<size_t>(given));
    env->GetFloatArrayRegion(pixels, 0, given, input.data());
    return encode_rows(env, *entry, input.data(), "encodePixels");
}

JNIEXPORT jfloatArray JNICALL Java_ai_qwenvledge_QwenVLNative_encodeImage(JNIEnv* env, jclass, jlong handle,
                                                                            jbyteArray pixels, jint width, jint height,
                                                                            jint channels, jfloatArray mean,
                                                                            jfloatArray std) {
#ifdef QWENVL_HAVE_PREPROCESS
    std::shared_ptr<Entry> entry = find_entry(env, handle, Kind::vision);
    if (!entry) return nullptr;
    std::lock_guard<std::mutex> busy(entry->busy);
    if (pixels == nullptr) {
        throw_java(env, g_java.illegal_argument, "encodeImage: pixels is null");
        return nullptr;
    }
    if (width <= 0 || height <= 0 || (channels != 3 && channels != 4)) {
        throw_java(env, g_java.illegal_argument,
                   "encodeImage: bad size " + std::to_string(width) + "x" + std::to_string(height) + "x" +
                       std::to_string(channels) + " (channels 3 or 4, sides > 0)");
        return nullptr;
    }
    float norm_mean[3], norm_std[3];
    if (!read_norm(env, "encodeImage", mean, std, norm_mean, norm_std)) return nullptr;
    const int64_t needed = static_cast<int64_t>(width) * height * channels;
    const jsize given = env->GetArrayLength(pixels);
    if (needed != given) {
        throw_java(env, g_java.illegal_argument,
                   "encodeImage: pixels has " + std::to_string(given) + " bytes, expected " + std::to_string(width) +
                       " x " + std::to_string(height) + " x " + std::to_string(channels) + " = " +
                       std::to_string(needed));
        return nullptr;
    }
    std::vector<unsigned char> bytes(static_cast<size_t>(given));
    env->GetByteArrayRegion(pixels, 0, given, reinterpret_cast<jbyte*>(bytes.data()));
    return encode_bytes(env, *entry, bytes.data(), width, height, channels, norm_mean, norm_std, "encodeImage");
#else
    (void)handle; (void)pixels; (void)width; (void)height; (void)channels; (void)mean; (void)std;
    throw_java(env, g_java.unsupported, "encodeImage: libqwenvl_core was built without image_preprocess.cpp");
    return nullptr;
#endif
}

JNIEXPORT jfloatArray JNICALL Java_ai_qwenvledge_QwenVLNative_encodeImageFile(JNIEnv* env, jclass, jlong handle,
                                                                                jstring image_path, jfloatArray mean,
                                                                                jfloatArray std) {
#if defined(QWENVL_HAVE_PREPROCESS) && defined(QWENVL_JNI_IMAGE_FILE)
    std::shared_ptr<Entry> entry = find_entry(env, handle, Kind::vision);
    if (!entry) return nullptr;
    std::lock_guard<std::mutex> busy(entry->busy);
    if (image_path == nullptr) {
        throw_java(env, g_java.illegal_argument, "encodeImageFile: imagePath is null");
        return nullptr;
    }
    std::string path;
    if (!to_utf8(env, image_path, path)) return nullptr;
    float norm_mean[3], norm_std[3];
    if (!read_norm(env, "encodeImageFile", mean, std, norm_mean, norm_std)) return nullptr;
    qwenvl_vision_info info{};
    if (int rc = qwenvl_vision_get_info(entry->vision, &info); rc != QWENVL_OK) {
        throw_status(env, rc, "encodeImageFile");
        return nullptr;
    }
    qwenvl::tool::RgbImage image;
    try {
        image = qwenvl::tool::read_image_file(path, info.image_size);
    } catch (const std::exception& e) {
        throw_java(env, g_java.illegal_argument, "encodeImageFile: cannot read image " + path + ": " + e.what());
        return nullptr;
    }
    return encode_bytes(env, *entry, image.rgb.data(), image.width, image.height, 3, norm_mean, norm_std,
                        "encodeImageFile");
#else
    (void)handle; (void)image_path; (void)mean; (void)std;
    throw_java(env, g_java.unsupported, "encodeImageFile: libqwenvl_jni was built without the image file reader");
    return nullptr;
#endif
}

JNIEXPORT void JNICALL Java_ai_qwenvledge_QwenVLNative_close(JNIEnv*, jclass, jlong handle) {
    std::shared_ptr<Entry> entry;
    {
        std::lock_guard<std::mutex> lock(g_registry_mutex);
        auto it = g_registry.find(handle);
        if (it == g_registry.end()) return;
        entry = std::move(it->second);
        g_registry.erase(it);
    }
    // the session or vision model is freed here, or by a generate() or encode still running on another
    // thread when it ends
}

JNIEXPORT jfloatArray JNICALL Java_ai_qwenvledge_QwenVLNative_preprocess(JNIEnv* env, jclass, jbyteArray pixels,
                                                                           jint width, jint height, jint channels,
                                                                           jint image_size, jfloatArray mean,
                                                                           jfloatArray std) {
#ifdef QWENVL_HAVE_PREPROCESS
    if (pixels == nullptr) {
        throw_java(env, g_java.illegal_argument, "pixels is null");
        return nullptr;
    }
    if (width <= 0 || height <= 0 || (channels != 3 && channels != 4) || image_size <= 0 ||
        image_size > QWENVL_PREPROCESS_MAX_OUTPUT_SIDE) {
        throw_java(env, g_java.illegal_argument,
                   "preprocess: bad size " + std::to_string(width) + "x" + std::to_string(height) + "x" +
                       std::to_string(channels) + " -> " + std::to_string(image_size) +
                       " (channels 3 or 4, sides > 0, imageSize <= " +
                       std::to_string(QWENVL_PREPROCESS_MAX_OUTPUT_SIDE) + ")");
        return nullptr;
    }
    float norm_mean[3], norm_std[3];
    if (!read_norm(env, "preprocess", mean, std, norm_mean, norm_std)) return nullptr;
    const int64_t needed = static_cast<int64_t>(width) * height * channels;
    const jsize given = env->GetArrayLength(pixels);
    if (needed != given) {
        throw_java(env, g_java.illegal_argument,
                   "pixels has " + std::to_string(given) + " bytes, expected " + std::to_string(width) + " x " +
                       std::to_string(height) + " x " + std::to_string(channels) + " = " + std::to_string(needed));
        return nullptr;
    }
    const size_t n_out = 3u * static_cast<size_t>(image_size) * static_cast<size_t>(image_size);
    std::vector<float> out(n_out);
    jbyte* bytes = env->GetByteArrayElements(pixels, nullptr);
    if (bytes == nullptr) return nullptr;
    const int rc = qwenvl_preprocess_image(reinterpret_cast<const unsigned char*>(bytes), width, height, channels,
                                           image_size, norm_mean, norm_std, out.data());
    env->ReleaseByteArrayElements(pixels, bytes, JNI_ABORT);
    if (rc != QWENVL_PREPROCESS_OK) {
        throw_java(env, g_java.illegal_argument, std::string("preprocess: ") + qwenvl_preprocess_error_string(rc));
        return nullptr;
    }
    return to_jfloats(env, out);
#else
    (void)pixels; (void)width; (void)height; (void)channels; (void)image_size; (void)mean; (void)std;
    throw_java(env, g_java.unsupported, "preprocess: libqwenvl_core was built without image_preprocess.cpp");
    return nullptr;
#endif
}

JNIEXPORT jstring JNICALL Java_ai_qwenvledge_QwenVLNative_generate(JNIEnv* env, jclass, jlong handle,
                                                                    jobjectArray image_rows, jstring question,
                                                                    jint max_tokens, jfloat temperature, jfloat top_p,
                                                                    jobject callback) {
    std::shared_ptr<Entry> entry = find_entry(env, handle);
    if (!entry) return nullptr;
    std::lock_guard<std::mutex> busy(entry->busy);
    if (question == nullptr) {
        throw_java(env, g_java.illegal_argument, "question is null");
        return nullptr;
    }
    std::string text;
    if (!to_utf8(env, question, text)) return nullptr;
    qwenvl_info info{};
    if (int rc = qwenvl_get_info(entry->session, &info); rc != QWENVL_OK) {
        throw_status(env, rc, "generate");
        return nullptr;
    }

    // Copy each image's rows out of the JVM heap: [n_image_rows * n_embd] floats per image.
    const jsize n_images = image_rows ? env->GetArrayLength(image_rows) : 0;
    const int64_t per_image = static_cast<int64_t>(info.n_image_rows) * info.n_embd;
    std::vector<std::vector<float>> rows(static_cast<size_t>(n_images));
    std::vector<qwenvl_image> images(static_cast<size_t>(n_images));
    for (jsize i = 0; i < n_images; ++i) {
        auto array = static_cast<jfloatArray>(env->GetObjectArrayElement(image_rows, i));
        if (env->ExceptionCheck()) return nullptr;
        const jsize n = array ? env->GetArrayLength(array) : 0;
        if (array == nullptr || n != per_image) {
            throw_java(env, g_java.illegal_argument,
                       "imageRows[" + std::to_string(i) + "] has " + (array ? std::to_string(n) : "null") +
                           " floats, expected " + std::to_string(info.n_image_rows) + " rows x " +
                           std::to_string(info.n_embd) + " = " + std::to_string(per_image));
            if (array) env->DeleteLocalRef(array);
            return nullptr;
        }
        rows[i].resize(static_cast<size_t>(n));
        env->GetFloatArrayRegion(array, 0, n, rows[i].data());
        env->DeleteLocalRef(array);
        images[i] = qwenvl_image{rows[i].data(), info.n_image_rows, info.n_embd};
    }

    CallbackState state{env, callback, nullptr};
    if (callback != nullptr) {
        jclass cls = env->GetObjectClass(callback);
        state.on_token = env->GetMethodID(cls, "onToken", "(Ljava/lang/String;)Z");
        env->DeleteLocalRef(cls);
        if (state.on_token == nullptr) return nullptr;  // NoSuchMethodError pending
    }
    qwenvl_generate_params params = qwenvl_generate_default_params();
    params.max_tokens = max_tokens;
    params.temperature = temperature;
    params.top_p = top_p;
    qwenvl_result result{};
    const int rc = qwenvl_generate(entry->session, images.data(), n_images, text.c_str(), &params,
                                   callback ? on_token : nullptr, &state, &result);
    if (env->ExceptionCheck()) return nullptr;  // thrown by the callback
    if (rc != QWENVL_OK) {
        throw_status(env, rc, "generate");
        return nullptr;
    }
    return to_jstring(env, result.text, static_cast<size_t>(result.text_len));
}

JNIEXPORT void JNICALL Java_ai_qwenvledge_QwenVLNative_resetChat(JNIEnv* env, jclass, jlong handle) {
    std::shared_ptr<Entry> entry = find_entry(env, handle);
    if (!entry) return;
    std::lock_guard<std::mutex> busy(entry->busy);
    if (int rc = qwenvl_reset(entry->session); rc != QWENVL_OK) throw_status(env, rc, "resetChat");
}

JNIEXPORT jint JNICALL Java_ai_qwenvledge_QwenVLNative_embeddingSize(JNIEnv* env, jclass, jlong handle) {
    std::shared_ptr<Entry> entry = find_entry(env, handle, Kind::any);
    if (!entry) return 0;
    std::lock_guard<std::mutex> busy(entry->busy);
    if (entry->vision != nullptr) {  // the width of the rows it writes: must equal the decoder's
        qwenvl_vision_info vision_info{};
        if (int rc = qwenvl_vision_get_info(entry->vision, &vision_info); rc != QWENVL_OK) {
            throw_status(env, rc, "embeddingSize");
            return 0;
        }
        return vision_info.n_embd;
    }
    qwenvl_info info{};
    if (int rc = qwenvl_get_info(entry->session, &info); rc != QWENVL_OK) {
        throw_status(env, rc, "embeddingSize");
        return 0;
    }
    return info.n_embd;
}

}  // extern "C"
