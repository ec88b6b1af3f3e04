// qwenvl_jni.cpp - JNI bridge: ai.qwenvledge.QwenVLNative -> the qwenvl_core C API.
//
// Handles given to Java are ids from a registry, not pointers: a closed, stale or made-up handle
// throws IllegalStateException instead of crashing the app, and close() during a generate() on
// another thread waits for it (the entry is shared and freed by its last user).
#include <jni.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "qwenvl_core.h"
#ifdef QWENVL_HAVE_PREPROCESS
#include "qwenvl_preprocess.h"
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
struct Entry {
    qwenvl_session* session = nullptr;
    std::mutex busy;  // one call at a time per handle
    ~Entry() { qwenvl_close(session); }
};

std::mutex g_registry_mutex;
std::unordered_map<jlong, std::shared_ptr<Entry>> g_registry;
jlong g_next_handle = 1;

std::shared_ptr<Entry> find_entry(JNIEnv* env, jlong handle) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    auto it = g_registry.find(handle);
    if (it == g_registry.end()) {
        throw_java(env, g_java.illegal_state, "handle " + std::to_string(handle) + " is not open (closed or invalid)");
        return nullptr;
    }
    return it->second;
}

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
                                                              jint n_threads) {
    if (gguf_path == nullptr) {
        throw_java(env, g_java.illegal_argument, "ggufPath is null");
        return 0;
    }
    std::string path;
    if (!to_utf8(env, gguf_path, path)) return 0;
    qwenvl_open_params params = qwenvl_open_default_params();
    if (n_ctx != 0) params.n_ctx = n_ctx;
    params.n_threads = n_threads;
    qwenvl_session* session = nullptr;
    const int rc = qwenvl_open(path.c_str(), &params, &session);
    if (rc != QWENVL_OK) {
        throw_status(env, rc, "open");
        return 0;
    }
    auto entry = std::make_shared<Entry>();
    entry->session = session;
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    const jlong handle = g_next_handle++;
    g_registry.emplace(handle, std::move(entry));
    return handle;
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
    // the session is freed here, or by a generate() still running on another thread when it ends
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
    if (mean == nullptr || std == nullptr || env->GetArrayLength(mean) != 3 || env->GetArrayLength(std) != 3) {
        throw_java(env, g_java.illegal_argument, "preprocess: mean and std must be 3 floats each (the model's)");
        return nullptr;
    }
    float norm_mean[3], norm_std[3];
    env->GetFloatArrayRegion(mean, 0, 3, norm_mean);
    env->GetFloatArrayRegion(std, 0, 3, norm_std);
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
    jfloatArray result = env->NewFloatArray(static_cast<jsize>(n_out));
    if (result == nullptr) return nullptr;
    env->SetFloatArrayRegion(result, 0, static_cast<jsize>(n_out), out.data());
    return result;
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
    std::shared_ptr<Entry> entry = find_entry(env, handle);
    if (!entry) return 0;
    std::lock_guard<std::mutex> busy(entry->busy);
    qwenvl_info info{};
    if (int rc = qwenvl_get_info(entry->session, &info); rc != QWENVL_OK) {
        throw_status(env, rc, "embeddingSize");
        return 0;
    }
    return info.n_embd;
}

}  // extern "C"
