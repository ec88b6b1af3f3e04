// qwenvl_core.cpp - the C API: argument checks, status codes, the thread-local error message.
//
// Every entry point runs its body through `guarded`, so no C++ exception crosses into C (or JNI).
#include "qwenvl_core.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "c_api_guard.h"
#include "error.h"
#include "llama.h"
#include "session.h"

struct qwenvl_session {
    std::unique_ptr<qwenvl::Session> impl;
    std::string text;             // the last reply, for qwenvl_result.text
    std::vector<int32_t> tokens;  // the last reply ids, for qwenvl_result.tokens
};

namespace {

using qwenvl::Error;
using qwenvl::fail;
using qwenvl::guarded;
using qwenvl::require;

std::atomic<int> g_log_level{2};

// llama.cpp's logger, filtered by qwenvl_set_log_level. CONT lines continue the previous level.
void log_to_stderr(ggml_log_level level, const char* text, void* /*user_data*/) {
    static thread_local int last = 3;
    int ours = last;
    switch (level) {
        case GGML_LOG_LEVEL_ERROR: ours = 1; break;
        case GGML_LOG_LEVEL_WARN: ours = 2; break;
        case GGML_LOG_LEVEL_INFO: ours = 3; break;
        case GGML_LOG_LEVEL_DEBUG: ours = 4; break;
        default: break;
    }
    last = ours;
    if (ours <= g_log_level.load(std::memory_order_relaxed) && text != nullptr) std::fputs(text, stderr);
}

void init_llama_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_to_stderr, nullptr);
        llama_backend_init();
    });
}


// Copy `ids` to the caller's array; *out_n gets the count, or the capacity needed.
void copy_ids(const std::vector<int32_t>& ids, int32_t* out_ids, int32_t capacity, int32_t* out_n) {
    const auto n = static_cast<int32_t>(ids.size());
    *out_n = n;
    if (n > capacity) {
        fail(QWENVL_ERR_BUFFER_TOO_SMALL, "the output needs " + std::to_string(n) + " ids but capacity is " +
                                              std::to_string(capacity));
    }
    if (n > 0) std::memcpy(out_ids, ids.data(), sizeof(int32_t) * ids.size());
}

void check_id_output(int32_t* out_ids, int32_t capacity, int32_t* out_n) {
    require(out_n != nullptr, "out_n is NULL");
    *out_n = 0;
    require(capacity >= 0, "capacity is negative");
    require(out_ids != nullptr || capacity == 0, "out_ids is NULL but capacity is not 0");
}

}  // namespace

extern "C" {

qwenvl_open_params qwenvl_open_default_params(void) {
    qwenvl_open_params p;
    p.n_ctx = 2048;
    p.n_threads = 0;
    p.n_batch = 512;
    p.kv_type = QWENVL_KV_F16;
    p.use_mmap = 0;
    return p;
}

qwenvl_generate_params qwenvl_generate_default_params(void) {
    qwenvl_generate_params p;
    p.max_tokens = 512;
    p.temperature = 1.0f;
    p.top_p = 0.3f;
    p.seed = 0;
    return p;
}

int qwenvl_open(const char* gguf_path, const qwenvl_open_params* params, qwenvl_session** out_session) {
    return guarded([&] {
        require(out_session != nullptr, "out_session is NULL");
        *out_session = nullptr;
        require(gguf_path != nullptr, "gguf_path is NULL");
        require(gguf_path[0] != '\0', "gguf_path is empty");
        const qwenvl_open_params p = params ? *params : qwenvl_open_default_params();
        qwenvl::Session::check_open_params(p);
        init_llama_once();
        auto session = std::make_unique<qwenvl_session>();
        session->impl = std::make_unique<qwenvl::Session>(gguf_path, p);
        *out_session = session.release();
    });
}

int qwenvl_close(qwenvl_session* session) {
    return guarded([&] { delete session; });
}

int qwenvl_add_turn(qwenvl_session* session, const qwenvl_image* images, int32_t n_images, const char* question,
                    const char* answer) {
    return guarded([&] {
        require(session != nullptr, "session is NULL");
        require(answer != nullptr, "answer is NULL");
        qwenvl::Session::check_question(question, n_images);
        session->impl->add_turn(images, n_images, question, answer);
    });
}

int qwenvl_get_info(const qwenvl_session* session, qwenvl_info* out_info) {
    return guarded([&] {
        require(session != nullptr, "session is NULL");
        require(out_info != nullptr, "out_info is NULL");
        *out_info = session->impl->info();
    });
}

int qwenvl_tokenize(const qwenvl_session* session, const char* text, int32_t* out_ids, int32_t capacity,
                    int32_t* out_n) {
    return guarded([&] {
        check_id_output(out_ids, capacity, out_n);
        require(session != nullptr, "session is NULL");
        require(text != nullptr, "text is NULL");
        qwenvl::Session::check_question(text, 1);  // UTF-8; empty text is allowed here
        copy_ids(session->impl->tokenize(text), out_ids, capacity, out_n);
    });
}

int qwenvl_prompt_tokens(const qwenvl_session* session, int32_t n_images, const char* question, int32_t* out_ids,
                         int32_t capacity, int32_t* out_n) {
    return guarded([&] {
        check_id_output(out_ids, capacity, out_n);
        require(session != nullptr, "session is NULL");
        qwenvl::Session::check_question(question, n_images);
        copy_ids(session->impl->prompt_ids(n_images, question), out_ids, capacity, out_n);
    });
}

int qwenvl_generate(qwenvl_session* session, const qwenvl_image* images, int32_t n_images, const char* question,
                    const qwenvl_generate_params* params, qwenvl_token_callback callback, void* user_data,
                    qwenvl_result* out_result) {
    return guarded([&] {
        if (out_result != nullptr) std::memset(out_result, 0, sizeof *out_result);
        require(session != nullptr, "session is NULL");
        qwenvl::Session::check_question(question, n_images);
        const qwenvl_generate_params p = params ? *params : qwenvl_generate_default_params();
        qwenvl::TokenSink sink;
        if (callback != nullptr) {
            sink = [&](const std::string& piece, int32_t token) {
                return callback(piece.c_str(), static_cast<int32_t>(piece.size()), token, user_data) != 0;
            };
        }
        qwenvl::GenerateOutput out = session->impl->generate(images, n_images, question, p, sink);
        session->text = std::move(out.text);
        session->tokens = std::move(out.tokens);
        if (out_result == nullptr) return;
        qwenvl_result& r = *out_result;
        r.text = session->text.c_str();
        r.text_len = static_cast<int32_t>(session->text.size());
        r.tokens = session->tokens.data();
        r.n_tokens = static_cast<int32_t>(session->tokens.size());
        r.stop_reason = out.stop_reason;
        r.stop_token = out.stop_token;
        r.n_prompt_positions = out.n_prompt_positions;
        r.n_prompt_evaluated = out.n_prompt_evaluated;
        r.n_past = session->impl->info().n_past;
        r.n_turns_dropped = out.n_turns_dropped;
        r.prefill_ms = out.prefill_ms;
        r.decode_ms = out.decode_ms;
        r.decode_tokens_per_s = out.decode_ms > 0 ? 1000.0 * r.n_tokens / out.decode_ms : 0.0;
    });
}

int qwenvl_reset(qwenvl_session* session) {
    return guarded([&] {
        require(session != nullptr, "session is NULL");
        session->impl->reset();
        session->text.clear();
        session->tokens.clear();
    });
}

const char* qwenvl_last_error(void) { return qwenvl::last_error_slot().c_str(); }

const char* qwenvl_status_string(int status) {
    switch (status) {
        case QWENVL_OK: return "ok";
        case QWENVL_ERR_INVALID_ARGUMENT: return "invalid argument";
        case QWENVL_ERR_MODEL_LOAD: return "model load failed";
        case QWENVL_ERR_CONTEXT_FULL: return "context full";
        case QWENVL_ERR_DECODE: return "decode failed";
        case QWENVL_ERR_BUFFER_TOO_SMALL: return "buffer too small";
        case QWENVL_ERR_OUT_OF_MEMORY: return "out of memory";
        case QWENVL_ERR_INTERNAL: return "internal error";
        default: return "unknown status";
    }
}

int qwenvl_set_log_level(int level) {
    return guarded([&] {
        if (level < 0 || level > 4) fail(QWENVL_ERR_INVALID_ARGUMENT, "log level " + std::to_string(level) + " is outside 0..4");
        g_log_level.store(level, std::memory_order_relaxed);
        init_llama_once();
    });
}

}  // extern "C"
