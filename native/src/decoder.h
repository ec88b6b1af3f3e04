// decoder.h - a llama.cpp context fed with token runs and image rows at the next free position.
#pragma once

#include <cstdint>

#include "chat_prompt.h"
#include "llama_handles.h"

namespace qwenvl {

struct DecoderOptions {
    int32_t n_ctx = 2048;
    int32_t n_batch = 512;
    int32_t n_threads = 0;  // resolved by the caller (0 is not passed to llama.cpp)
    bool kv_q8_0 = false;   // 8-bit K and V cache (with flash attention, which a quantized V needs)
};

// Owns the llama_context and its batches; tracks n_past, the positions held in the KV cache.
// Everything goes in pieces of at most n_batch positions: a larger batch aborts llama.cpp.
class Decoder {
public:
    Decoder(llama_model* model, const DecoderOptions& options);

    int32_t n_ctx() const { return n_ctx_; }
    int32_t n_batch() const { return n_batch_; }
    int32_t n_embd() const { return n_embd_; }
    int32_t n_past() const { return n_past_; }
    llama_context* context() { return ctx_.get(); }

    // Decode units[first:] at n_past: token runs, and image rows between them; logits are kept
    // for the very last position. Throws Error(QWENVL_ERR_DECODE) when llama_decode fails.
    void eval(const Units& units, size_t first);

    // Decode one token at n_past, keeping its logits.
    void eval_token(llama_token token);

    // Forget the positions from n_keep on (a new prompt diverging from the cached one there).
    void truncate(int32_t n_keep);

    // Forget every position.
    void clear();

private:
    void eval_tokens(const std::vector<llama_token>& tokens, bool logits_last);
    void eval_rows(const std::vector<float>* rows, int32_t n_rows, bool logits_last);
    void decode(llama_batch& batch, int32_t n, const char* what);

    ContextPtr ctx_;
    int32_t n_ctx_ = 0;
    int32_t n_batch_ = 0;
    int32_t n_embd_ = 0;
    int32_t n_past_ = 0;
    Batch tokens_;
    Batch rows_;
};

}  // namespace qwenvl
