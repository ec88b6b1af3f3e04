// llama_handles.h - one owner per llama.cpp resource, so every exit path frees it exactly once.
#pragma once

#include <cstdint>
#include <memory>

#include "error.h"
#include "llama.h"

namespace qwenvl {

struct ModelDeleter {
    void operator()(llama_model* model) const { llama_model_free(model); }
};
struct ContextDeleter {
    void operator()(llama_context* ctx) const { llama_free(ctx); }
};
struct SamplerDeleter {
    void operator()(llama_sampler* sampler) const { llama_sampler_free(sampler); }
};

using ModelPtr = std::unique_ptr<llama_model, ModelDeleter>;
using ContextPtr = std::unique_ptr<llama_context, ContextDeleter>;
using SamplerPtr = std::unique_ptr<llama_sampler, SamplerDeleter>;

// A llama_batch from llama_batch_init: room for `capacity` positions of one sequence, holding
// token ids (n_embd == 0) or embedding rows of n_embd floats each.
class Batch {
public:
    Batch(int32_t capacity, int32_t n_embd) : batch_(llama_batch_init(capacity, n_embd, 1)), capacity_(capacity) {
        if ((n_embd ? batch_.embd == nullptr : batch_.token == nullptr) || batch_.pos == nullptr) {
            llama_batch_free(batch_);
            fail(QWENVL_ERR_OUT_OF_MEMORY, "llama_batch_init failed for " + std::to_string(capacity) + " positions");
        }
    }
    ~Batch() { llama_batch_free(batch_); }
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;

    int32_t capacity() const { return capacity_; }
    llama_batch& get() { return batch_; }

    // Position i of the batch: sequence 0 at `pos`; logits only where `output` is set.
    void set_position(int32_t i, llama_pos pos, bool output) {
        batch_.pos[i] = pos;
        batch_.n_seq_id[i] = 1;
        batch_.seq_id[i][0] = 0;
        batch_.logits[i] = output ? 1 : 0;
    }

private:
    llama_batch batch_;
    int32_t capacity_;
};

}  // namespace qwenvl
