// session.h - one Qwen-VL chat: the model, its decoder context, the turns and what the KV cache holds.
//
// Each turn builds the whole prompt (system, the newest old turns that fit, the question) the way
// the Python runtime (runtime/session.py) does, then keeps the longest prefix the KV cache
// already holds and decodes only the rest: a follow-up question costs its own tokens (plus the
// reply's last id when generation stopped without a stop token), and a prompt that had to drop old
// turns is re-decoded from the first position that changed.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "chat_prompt.h"
#include "decoder.h"
#include "llama_handles.h"
#include "model_contract.h"
#include "qwenvl_core.h"

namespace qwenvl {

// Receives (piece, token) per generated token; returns true to stop.
using TokenSink = std::function<bool(const std::string& piece, int32_t token)>;

struct GenerateOutput {
    std::string text;
    std::vector<int32_t> tokens;
    qwenvl_stop_reason stop_reason = QWENVL_STOP_MAX_TOKENS;
    int32_t stop_token = -1;
    int32_t n_prompt_positions = 0;
    int32_t n_prompt_evaluated = 0;
    int32_t n_turns_dropped = 0;
    double prefill_ms = 0;
    double decode_ms = 0;
};

class Session {
public:
    Session(const std::string& gguf_path, const qwenvl_open_params& params);

    // Checks n_ctx, n_batch and n_threads before anything is loaded.
    static void check_open_params(const qwenvl_open_params& params);
    // Checks a question (UTF-8; not blank unless there are images).
    static void check_question(const char* question, int32_t n_images);

    qwenvl_info info() const;

    // User text -> ids (grounding tags special).
    std::vector<int32_t> tokenize(const std::string& text) const;

    // The prompt the next generate would decode for `n_images` images and `question`, image
    // positions as QWENVL_IMAGE_POSITION.
    std::vector<int32_t> prompt_ids(int32_t n_images, const std::string& question) const;

    GenerateOutput generate(const qwenvl_image* images, int32_t n_images, const std::string& question,
                            const qwenvl_generate_params& params, const TokenSink& sink);

    void add_turn(const qwenvl_image* images, int32_t n_images, const std::string& question, const std::string& answer);

    void reset();

private:
    int64_t prompt_budget() const { return decoder_->n_ctx() - 1; }  // one position kept for the reply
    void check_image_count(int32_t n_images) const;
    size_t cached_prefix(const Units& units) const;
    Turn make_turn(const qwenvl_image* images, int32_t n_images, const std::string& question) const;
    SamplerPtr make_sampler(const qwenvl_generate_params& params) const;

    ModelPtr model_;
    const llama_vocab* vocab_ = nullptr;
    Tokenizer tokenizer_;
    ModelContract contract_;  // read from the GGUF's qwenvl.* keys
    PromptBuilder prompts_;
    std::unique_ptr<Decoder> decoder_;
    std::deque<Turn> history_;
    Units context_;  // what the KV cache holds, unit by unit
};

}  // namespace qwenvl
