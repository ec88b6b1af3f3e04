// chat_prompt.cpp - see chat_prompt.h.
#include "chat_prompt.h"

#include <array>
#include <climits>
#include <cstring>
#include <string>

#include "error.h"
#include "qwenvl_core.h"

namespace qwenvl {
namespace {

// The only special tokens a user may type (SPEC "How the image enters the LLM"), in id order from
// the contract's ref_start_id.
constexpr std::array<std::string_view, 6> kGroundingTags = {{"<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"}};

void append(Units& units, const std::vector<llama_token>& ids) {
    for (llama_token id : ids) units.push_back(Unit::of_token(id));
}

void append(Units& units, const Units& tail) { units.insert(units.end(), tail.begin(), tail.end()); }

}  // namespace

int32_t Unit::n_positions() const { return is_image ? n_rows : 1; }

bool Unit::same_as(const Unit& other) const {
    if (is_image != other.is_image) return false;
    if (!is_image) return token == other.token;
    if (rows == other.rows) return rows != nullptr;
    return rows && other.rows && rows->size() == other.rows->size() &&
           std::memcmp(rows->data(), other.rows->data(), sizeof(float) * rows->size()) == 0;
}

int64_t count_positions(const Units& units) {
    int64_t n = 0;
    for (const Unit& u : units) n += u.n_positions();
    return n;
}

std::vector<int32_t> flatten_ids(const Units& units) {
    std::vector<int32_t> ids;
    ids.reserve(static_cast<size_t>(count_positions(units)));
    for (const Unit& u : units) {
        if (u.is_image) {
            ids.insert(ids.end(), static_cast<size_t>(u.n_rows), QWENVL_IMAGE_POSITION);
        } else {
            ids.push_back(u.token);
        }
    }
    return ids;
}

std::vector<llama_token> Tokenizer::plain(std::string_view text) const {
    if (text.empty()) return {};
    if (text.size() > static_cast<size_t>(INT32_MAX / 2)) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "text of " + std::to_string(text.size()) + " bytes is too long");
    }
    const auto len = static_cast<int32_t>(text.size());
    std::vector<llama_token> ids(text.size() + 1);  // byte-level BPE never yields more ids than bytes
    int32_t n = llama_tokenize(vocab_, text.data(), len, ids.data(), static_cast<int32_t>(ids.size()),
                               /*add_special=*/false, /*parse_special=*/false);
    if (n < 0 && n != INT32_MIN) {
        ids.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab_, text.data(), len, ids.data(), static_cast<int32_t>(ids.size()), false, false);
    }
    if (n < 0) fail(QWENVL_ERR_INTERNAL, "llama_tokenize failed on " + std::to_string(text.size()) + " bytes");
    ids.resize(static_cast<size_t>(n));
    return ids;
}

std::string Tokenizer::piece(llama_token token) const {
    std::string out(64, '\0');
    int32_t n = llama_token_to_piece(vocab_, token, out.data(), static_cast<int32_t>(out.size()), 0, true);
    if (n < 0) {
        out.assign(static_cast<size_t>(-n), '\0');
        n = llama_token_to_piece(vocab_, token, out.data(), static_cast<int32_t>(out.size()), 0, true);
    }
    out.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return out;
}

// Gathers text until a special id or an image comes, then tokenizes it as one run.
class PromptBuilder::Writer {
public:
    Writer(const Tokenizer& tokenizer, llama_token ref_start_id) : tokenizer_(tokenizer), ref_start_id_(ref_start_id) {}

    Writer& text(std::string_view text) {
        text_.append(text.data(), text.size());
        return *this;
    }
    Writer& unit(Unit u) {
        flush();
        units_.push_back(std::move(u));
        return *this;
    }
    Writer& special(llama_token id) { return unit(Unit::of_token(id)); }

    // User text: the grounding tags become their ids; the text around them joins the gathered text.
    Writer& user_text(std::string_view text) {
        size_t start = 0;
        while (start < text.size()) {
            size_t best = std::string_view::npos;  // the earliest grounding tag at or after `start`
            size_t tag = kGroundingTags.size();
            for (size_t t = 0; t < kGroundingTags.size(); ++t) {
                const size_t at = text.find(kGroundingTags[t], start);
                if (at < best) {
                    best = at;
                    tag = t;
                }
            }
            if (tag == kGroundingTags.size()) {
                this->text(text.substr(start));
                break;
            }
            this->text(text.substr(start, best - start)).special(ref_start_id_ + static_cast<llama_token>(tag));
            start = best + kGroundingTags[tag].size();
        }
        return *this;
    }
    Units finish() {
        flush();
        return std::move(units_);
    }

private:
    void flush() {
        if (text_.empty()) return;
        append(units_, tokenizer_.plain(text_));
        text_.clear();
    }

    const Tokenizer& tokenizer_;
    llama_token ref_start_id_;
    std::string text_;
    Units units_;
};

PromptBuilder::PromptBuilder(const Tokenizer& tokenizer, const ModelContract& contract)
    : tokenizer_(tokenizer), contract_(contract), nl_(tokenizer.plain("\n")) {}

Units PromptBuilder::user_text(std::string_view text) const {
    Writer w(tokenizer_, contract_.ref_start_id);
    w.user_text(text);
    return w.finish();
}

Units PromptBuilder::content(const Turn& turn) const {
    // "Picture N: <img>rows</img>\n" per image, then the question (as from_list_format); the "\n"
    // after the last </img> and the question's text are one run
    Writer w(tokenizer_, contract_.ref_start_id);
    for (size_t i = 0; i < turn.images.size(); ++i) {
        w.text("Picture " + std::to_string(i + 1) + ": ").special(contract_.image_start_id);
        w.unit(Unit::of_image(turn.images[i], contract_.n_queries)).special(contract_.image_end_id).text("\n");
    }
    return w.user_text(turn.question).finish();
}

Units PromptBuilder::message(std::string_view role, const Units& content) const {
    // "<|im_start|>role\ncontent<|im_end|>": role, newline and content tokenized apart
    Units units{Unit::of_token(contract_.im_start_id)};
    append(units, tokenizer_.plain(role));
    append(units, nl_);
    append(units, content);
    units.push_back(Unit::of_token(contract_.im_end_id));
    return units;
}

Units PromptBuilder::build(const Turn& question, const std::deque<Turn>& history, int64_t budget,
                           size_t* n_dropped) const {
    Units system_content;
    append(system_content, tokenizer_.plain(contract_.system_prompt));
    const Units head = message("system", system_content);
    Units tail;
    append(tail, nl_);
    append(tail, message("user", content(question)));
    append(tail, nl_);
    tail.push_back(Unit::of_token(contract_.im_start_id));
    append(tail, tokenizer_.plain("assistant"));
    append(tail, nl_);

    const int64_t need = count_positions(head) + count_positions(tail);
    if (need > budget) {
        fail(QWENVL_ERR_CONTEXT_FULL, "the question needs " + std::to_string(need) + " positions (" +
                                          std::to_string(question.images.size()) + " image(s) of " +
                                          std::to_string(contract_.n_queries + 2) + " + text) but the context has room for " +
                                          std::to_string(budget) + ": use a larger n_ctx, fewer images or a shorter question");
    }
    // the newest old turns first, while the prompt fits
    std::deque<Units> kept;
    int64_t total = need;
    for (auto it = history.rbegin(); it != history.rend(); ++it) {
        Units past;
        append(past, nl_);
        append(past, message("user", content(*it)));
        append(past, nl_);
        append(past, message("assistant", user_text(it->answer)));
        const int64_t n = count_positions(past);
        if (total + n > budget) break;
        total += n;
        kept.push_front(std::move(past));
    }
    if (n_dropped != nullptr) *n_dropped = history.size() - kept.size();
    Units units = head;
    for (const Units& past : kept) append(units, past);
    append(units, tail);
    return units;
}

}  // namespace qwenvl
