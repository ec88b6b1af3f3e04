// chat_prompt.h - the Qwen-VL chat prompt as units: token ids and whole images.
//
// Built exactly as the Python runtime (runtime/prompt.py) builds it, which is how the original
// `make_context` does: role names, "\n" and each content string are tokenized apart and joined
// with <|im_start|> / <|im_end|> ids; inside a content string every run of text between two
// special ids or images is tokenized on its own, with parse_special = false, so `<img>` or
// `<|im_end|>` typed by a user stays plain text. Only the grounding tags are special in user text.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "llama.h"
#include "model_contract.h"

namespace qwenvl {

// One image's rows, float32 [n_queries, n_embd], shared by the turns and the KV record.
using ImageRows = std::shared_ptr<const std::vector<float>>;

// One prompt unit: a token id, or an image standing for its n_rows positions (the contract's n_queries).
struct Unit {
    llama_token token = -1;  // when not an image
    bool is_image = false;
    ImageRows rows;          // the image's rows; NULL for an image in a dry run (ids only)
    int32_t n_rows = 0;      // positions of an image

    static Unit of_token(llama_token t) { return Unit{t, false, nullptr, 0}; }
    static Unit of_image(ImageRows r, int32_t n_rows) { return Unit{-1, true, std::move(r), n_rows}; }

    int32_t n_positions() const;
    // Same id, or images with equal rows (compared by content, as the runtime compares image hashes).
    bool same_as(const Unit& other) const;
};

using Units = std::vector<Unit>;

int64_t count_positions(const Units& units);

// The ids of `units`, QWENVL_IMAGE_POSITION at each image-row position.
std::vector<int32_t> flatten_ids(const Units& units);

// The vocabulary's tokenizer, used the way the Python runtime uses it.
class Tokenizer {
public:
    explicit Tokenizer(const llama_vocab* vocab) : vocab_(vocab) {}

    // Plain text -> ids: no BOS, nothing parsed as a special token.
    std::vector<llama_token> plain(std::string_view text) const;

    // The bytes a token stands for; special tokens (grounding tags) spelled out.
    std::string piece(llama_token token) const;

private:
    const llama_vocab* vocab_;
};

// One exchange of the chat: the question, its images and the answer text.
struct Turn {
    std::string question;
    std::vector<ImageRows> images;  // entries may be NULL in a dry run
    std::string answer;
};

// Builds prompts; mirrors runtime/prompt.py PromptBuilder.
class PromptBuilder {
public:
    // The ids, rows per image and system prompt come from the GGUF (ModelContract).
    PromptBuilder(const Tokenizer& tokenizer, const ModelContract& contract);

    // User text: grounding tags become their ids, each run of other text is tokenized on its own.
    Units user_text(std::string_view text) const;

    // The whole prompt for `question` after `history`: system message, the newest old turns that
    // fit in `budget` positions (older ones are dropped; *n_dropped says how many), the question.
    // Throws Error(QWENVL_ERR_CONTEXT_FULL) when the question alone does not fit `budget`.
    Units build(const Turn& question, const std::deque<Turn>& history, int64_t budget, size_t* n_dropped) const;

private:
    class Writer;
    Units message(std::string_view role, const Units& content) const;
    Units content(const Turn& turn) const;

    const Tokenizer& tokenizer_;
    const ModelContract& contract_;
    std::vector<llama_token> nl_;
};

}  // namespace qwenvl
