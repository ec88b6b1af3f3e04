// decoder.cpp - see decoder.h.
#include "decoder.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "error.h"
#include "qwenvl_core.h"

namespace qwenvl {
namespace {

ContextPtr make_context(llama_model* model, const DecoderOptions& options) {
    llama_context_params params = llama_context_default_params();
    params.n_ctx = static_cast<uint32_t>(options.n_ctx);
    params.n_batch = static_cast<uint32_t>(options.n_batch);
    params.n_ubatch = static_cast<uint32_t>(options.n_batch);
    params.n_seq_max = 1;
    params.n_threads = options.n_threads;
    params.n_threads_batch = options.n_threads;
    params.no_perf = true;
    // as llama-cpp-python runs it (the Python runtime): flash attention changes the sums enough to
    // flip near-tied greedy choices
    params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (options.kv_q8_0) {  // the phone setting: half the KV memory, at a small cost in exactness
        params.type_k = GGML_TYPE_Q8_0;
        params.type_v = GGML_TYPE_Q8_0;
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    }
    ContextPtr ctx(llama_init_from_model(model, params));
    if (!ctx) {
        fail(QWENVL_ERR_OUT_OF_MEMORY, "llama.cpp could not create a context of " + std::to_string(options.n_ctx) +
                                           " positions (n_batch " + std::to_string(options.n_batch) + ")");
    }
    return ctx;
}

}  // namespace

Decoder::Decoder(llama_model* model, const DecoderOptions& options)
    : ctx_(make_context(model, options)),
      n_ctx_(static_cast<int32_t>(llama_n_ctx(ctx_.get()))),
      n_batch_(static_cast<int32_t>(std::min(llama_n_batch(ctx_.get()), llama_n_ubatch(ctx_.get())))),
      n_embd_(llama_model_n_embd_inp(model)),
      tokens_(n_batch_, 0),
      rows_(n_batch_, n_embd_) {}

void Decoder::eval(const Units& units, size_t first) {
    std::vector<llama_token> run;
    for (size_t i = first; i < units.size(); ++i) {
        const Unit& u = units[i];
        const bool last = i + 1 == units.size();
        if (u.is_image) {
            eval_tokens(run, false);
            run.clear();
            eval_rows(u.rows.get(), u.n_rows, last);
        } else {
            run.push_back(u.token);
        }
    }
    eval_tokens(run, true);
}

void Decoder::eval_token(llama_token token) { eval_tokens({token}, true); }

void Decoder::eval_tokens(const std::vector<llama_token>& tokens, bool logits_last) {
    const auto n = static_cast<int32_t>(tokens.size());
    for (int32_t start = 0; start < n; start += n_batch_) {
        const int32_t count = std::min(n_batch_, n - start);
        llama_batch& b = tokens_.get();
        for (int32_t i = 0; i < count; ++i) {
            b.token[i] = tokens[start + i];
            tokens_.set_position(i, n_past_ + i, logits_last && start + i == n - 1);
        }
        decode(b, count, "tokens");
    }
}

void Decoder::eval_rows(const std::vector<float>* image, int32_t n_rows, bool logits_last) {
    const size_t row_floats = static_cast<size_t>(n_embd_);
    if (image == nullptr || n_rows < 1 || image->size() != row_floats * static_cast<size_t>(n_rows)) {
        fail(QWENVL_ERR_INTERNAL, "image rows missing at position " + std::to_string(n_past_));
    }
    const float* rows = image->data();
    for (int32_t start = 0; start < n_rows; start += n_batch_) {
        const int32_t count = std::min(n_batch_, n_rows - start);
        llama_batch& b = rows_.get();
        std::memcpy(b.embd, rows + static_cast<size_t>(start) * n_embd_,
                    sizeof(float) * static_cast<size_t>(count) * n_embd_);
        for (int32_t i = 0; i < count; ++i) {
            rows_.set_position(i, n_past_ + i, logits_last && start + i == n_rows - 1);
        }
        decode(b, count, "image rows");
    }
}

void Decoder::decode(llama_batch& batch, int32_t n, const char* what) {
    if (n_past_ + n > n_ctx_) {
        fail(QWENVL_ERR_CONTEXT_FULL, std::string(what) + " at positions " + std::to_string(n_past_) + ".." +
                                          std::to_string(n_past_ + n - 1) + " do not fit n_ctx " +
                                          std::to_string(n_ctx_));
    }
    batch.n_tokens = n;
    const int32_t rc = llama_decode(ctx_.get(), batch);
    if (rc != 0) {
        fail(QWENVL_ERR_DECODE, "llama_decode failed with code " + std::to_string(rc) + " on " + std::to_string(n) +
                                    " " + what + " at position " + std::to_string(n_past_));
    }
    n_past_ += n;
}

void Decoder::truncate(int32_t n_keep) {
    if (n_keep >= n_past_) return;
    if (!llama_memory_seq_rm(llama_get_memory(ctx_.get()), 0, n_keep, -1)) {
        fail(QWENVL_ERR_DECODE, "llama.cpp cannot drop positions " + std::to_string(n_keep) + ".. of the KV cache");
    }
    n_past_ = n_keep;
}

void Decoder::clear() {
    llama_memory_clear(llama_get_memory(ctx_.get()), true);
    n_past_ = 0;
}

}  // namespace qwenvl
