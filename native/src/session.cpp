// session.cpp - see session.h.
#include "session.h"

#if defined(__linux__)
#include <sched.h>
#endif
#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

#include "error.h"
#include "utf8.h"

namespace qwenvl {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string str(int64_t v) { return std::to_string(v); }

// Open the file ourselves first: llama.cpp only says "failed to load" for every kind of problem.
void check_gguf_file(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) fail(QWENVL_ERR_MODEL_LOAD, path + ": cannot open the GGUF file (" + std::strerror(errno) + ")");
    char magic[4] = {0, 0, 0, 0};
    const size_t n = std::fread(magic, 1, sizeof magic, f);
    std::fclose(f);
    if (n != sizeof magic || std::memcmp(magic, "GGUF", 4) != 0) {
        fail(QWENVL_ERR_MODEL_LOAD, path + ": not a GGUF file (bad magic)");
    }
}

ModelPtr load_model(const std::string& path, bool use_mmap) {
    check_gguf_file(path);
    llama_model_params params = llama_model_default_params();
    // read + repacked (the default) or mapped as is: never both, a mapping of repacked weights counts them twice
    // (measured at full size: 8.9 GB instead of 6.3 GB peak)
    params.load_mode = use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    params.use_extra_bufts = !use_mmap;
    ModelPtr model(llama_model_load_from_file(path.c_str(), params));
    if (!model) fail(QWENVL_ERR_MODEL_LOAD, path + ": llama.cpp cannot load this GGUF (truncated or unsupported)");
    return model;
}

// The decoder must be Qwen's, with the Qwen-VL special tokens at the ids its metadata names.
const ModelContract& check_qwen_vl(const llama_model* model, const llama_vocab* vocab, const ModelContract& c,
                                   const std::string& path) {
    char arch[64] = {0};
    if (llama_model_meta_val_str(model, "general.architecture", arch, sizeof arch) < 0 || std::string(arch) != "qwen") {
        fail(QWENVL_ERR_MODEL_LOAD, path + ": architecture '" + arch + "', expected 'qwen' (a Qwen-VL decoder GGUF)");
    }
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    if (n_vocab <= c.image_end_id) {
        fail(QWENVL_ERR_MODEL_LOAD, path + ": vocabulary of " + str(n_vocab) + " tokens has no Qwen-VL special tokens");
    }
    const struct {
        llama_token id;
        const char* text;
    } expected[] = {
        {c.eos_id, "<|endoftext|>"}, {c.im_start_id, "<|im_start|>"}, {c.im_end_id, "<|im_end|>"},
        {c.ref_start_id, "<ref>"},   {c.ref_start_id + 5, "</quad>"},   {c.image_start_id, "<img>"},
        {c.image_end_id, "</img>"},  {c.image_pad_id, "<imgpad>"},
    };
    for (const auto& e : expected) {
        const char* text = llama_vocab_get_text(vocab, e.id);
        if (text == nullptr || std::strcmp(text, e.text) != 0) {
            fail(QWENVL_ERR_MODEL_LOAD, path + ": token " + str(e.id) + " is '" + (text ? text : "") + "', expected '" +
                                            e.text + "': not a Qwen-VL vocabulary");
        }
    }
    return c;
}

// 0 -> the cores this process may run on (its affinity mask, as the Python runtime's default_threads): in a
// container or under taskset hardware_concurrency() counts every online core, and more decoder threads than
// usable cores make llama.cpp's spinning barriers wait on threads that are not running.
int32_t resolve_threads(int32_t n_threads) {
    if (n_threads > 0) return n_threads;
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    const unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? static_cast<int32_t>(hw) : 1;
}

}  // namespace

void Session::check_open_params(const qwenvl_open_params& p) {
    if (p.n_ctx < 16 || p.n_ctx > (1 << 20)) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "n_ctx " + str(p.n_ctx) + " is outside 16..1048576");
    }
    if (p.n_batch < 1 || p.n_batch > (1 << 20)) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "n_batch " + str(p.n_batch) + " is outside 1..1048576");
    }
    if (p.n_threads < 0 || p.n_threads > 1024) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "n_threads " + str(p.n_threads) + " is outside 0..1024 (0 = all cores)");
    }
    if (p.kv_type != QWENVL_KV_F16 && p.kv_type != QWENVL_KV_Q8_0) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "kv_type " + str(p.kv_type) + " is neither QWENVL_KV_F16 (0) nor QWENVL_KV_Q8_0 (1)");
    }
    if (p.use_mmap != 0 && p.use_mmap != 1) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "use_mmap " + str(p.use_mmap) + " is neither 0 nor 1");
    }
}

namespace {

void check_generate_params(const qwenvl_generate_params& p) {
    if (p.max_tokens < 1) fail(QWENVL_ERR_INVALID_ARGUMENT, "max_tokens " + str(p.max_tokens) + " is below 1");
    if (!std::isfinite(p.temperature)) fail(QWENVL_ERR_INVALID_ARGUMENT, "temperature is not a finite number");
    if (!(p.top_p >= 0.0f && p.top_p <= 1.0f)) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "top_p " + std::to_string(p.top_p) + " is outside [0, 1]");
    }
}

// The rows of each image, checked: shape [n_rows, n_embd] and finite values.
void check_images(const qwenvl_image* images, int32_t n_images, int32_t n_rows, int32_t n_embd) {
    if (n_images > 0 && images == nullptr) {
        fail(QWENVL_ERR_INVALID_ARGUMENT, "images is NULL but n_images is " + str(n_images));
    }
    for (int32_t i = 0; i < n_images; ++i) {
        const qwenvl_image& im = images[i];
        const std::string which = "image " + str(i);
        if (im.rows == nullptr) fail(QWENVL_ERR_INVALID_ARGUMENT, which + ": rows is NULL");
        if (im.n_rows != n_rows) {
            fail(QWENVL_ERR_INVALID_ARGUMENT, which + " has " + str(im.n_rows) + " rows, expected " +
                                                  str(n_rows) + " (the vision encoder's output)");
        }
        if (im.n_embd != n_embd) {
            fail(QWENVL_ERR_INVALID_ARGUMENT, which + " rows are " + str(im.n_embd) + " wide but the GGUF decoder takes " +
                                                  str(n_embd) + ": vision model and GGUF come from different checkpoints");
        }
        const size_t n = static_cast<size_t>(im.n_rows) * static_cast<size_t>(n_embd);
        for (size_t k = 0; k < n; ++k) {
            if (!std::isfinite(im.rows[k])) {
                fail(QWENVL_ERR_INVALID_ARGUMENT, which + ": value " + str(static_cast<int64_t>(k)) + " is not finite");
            }
        }
    }
}

}  // namespace

Session::Session(const std::string& gguf_path, const qwenvl_open_params& params)
    : model_(load_model(gguf_path, params.use_mmap != 0)),
      vocab_(llama_model_get_vocab(model_.get())),
      tokenizer_(vocab_),
      contract_(ModelContract::read(model_.get(), gguf_path)),
      prompts_(tokenizer_, check_qwen_vl(model_.get(), vocab_, contract_, gguf_path)) {
    DecoderOptions options;
    options.n_ctx = params.n_ctx;
    options.n_batch = std::min(params.n_batch, params.n_ctx);
    options.n_threads = resolve_threads(params.n_threads);
    options.kv_q8_0 = params.kv_type == QWENVL_KV_Q8_0;
    decoder_ = std::make_unique<Decoder>(model_.get(), options);
}

qwenvl_info Session::info() const {
    qwenvl_info out{};
    out.n_embd = decoder_->n_embd();
    out.n_ctx = decoder_->n_ctx();
    out.n_batch = decoder_->n_batch();
    out.n_vocab = llama_vocab_n_tokens(vocab_);
    out.n_past = decoder_->n_past();
    out.n_turns = static_cast<int32_t>(history_.size());
    out.n_image_rows = contract_.n_queries;
    out.image_size = contract_.image_size;
    for (int i = 0; i < 3; ++i) {
        out.image_mean[i] = contract_.image_mean[i];
        out.image_std[i] = contract_.image_std[i];
    }
    out.eos_id = contract_.eos_id;
    out.im_start_id = contract_.im_start_id;
    out.im_end_id = contract_.im_end_id;
    out.ref_start_id = contract_.ref_start_id;
    out.image_start_id = contract_.image_start_id;
    out.image_end_id = contract_.image_end_id;
    return out;
}

void Session::check_question(const char* question, int32_t n_images) {
    if (question == nullptr) fail(QWENVL_ERR_INVALID_ARGUMENT, "question is NULL");
    const std::string_view q(question);
    if (!is_valid_utf8(q)) fail(QWENVL_ERR_INVALID_ARGUMENT, "question is not valid UTF-8");
    const bool blank = q.find_first_not_of(" \t\n\r\f\v") == std::string_view::npos;
    if (blank && n_images == 0) fail(QWENVL_ERR_INVALID_ARGUMENT, "the question is empty and there is no image");
}

std::vector<int32_t> Session::tokenize(const std::string& text) const {
    return flatten_ids(prompts_.user_text(text));
}

std::vector<int32_t> Session::prompt_ids(int32_t n_images, const std::string& question) const {
    check_image_count(n_images);
    Turn turn;
    turn.question = question;
    turn.images.assign(static_cast<size_t>(n_images), nullptr);
    return flatten_ids(prompts_.build(turn, history_, prompt_budget(), nullptr));
}

void Session::check_image_count(int32_t n_images) const {
    if (n_images < 0) fail(QWENVL_ERR_INVALID_ARGUMENT, "n_images " + str(n_images) + " is negative");
    if (static_cast<int64_t>(n_images) * contract_.n_queries > prompt_budget()) {
        fail(QWENVL_ERR_CONTEXT_FULL, str(n_images) + " images need " + str(static_cast<int64_t>(n_images) * contract_.n_queries) +
                                          " positions but the context has room for " + str(prompt_budget()) +
                                          ": use a larger n_ctx or fewer images");
    }
}

size_t Session::cached_prefix(const Units& units) const {
    size_t keep = 0;
    while (keep < units.size() && keep < context_.size() && units[keep].same_as(context_[keep])) ++keep;
    if (keep == units.size() && keep > 0) --keep;  // the same prompt again: decode its last unit for logits
    return keep;
}

SamplerPtr Session::make_sampler(const qwenvl_generate_params& params) const {
    llama_sampler_chain_params chain_params = llama_sampler_chain_default_params();
    chain_params.no_perf = true;
    SamplerPtr chain(llama_sampler_chain_init(chain_params));
    if (!chain) fail(QWENVL_ERR_OUT_OF_MEMORY, "llama_sampler_chain_init failed");
    // the chain owns what is added to it; the Python runtime's order: top-p, temperature, draw
    if (params.temperature <= 0.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_greedy());
        return chain;
    }
    if (params.top_p < 1.0f) llama_sampler_chain_add(chain.get(), llama_sampler_init_top_p(params.top_p, 1));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_temp(params.temperature));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_dist(params.seed));
    return chain;
}

GenerateOutput Session::generate(const qwenvl_image* images, int32_t n_images, const std::string& question,
                                 const qwenvl_generate_params& params, const TokenSink& sink) {
    check_generate_params(params);
    check_image_count(n_images);
    check_images(images, n_images, contract_.n_queries, decoder_->n_embd());

    Turn turn = make_turn(images, n_images, question);
    size_t n_dropped = 0;
    const Units units = prompts_.build(turn, history_, prompt_budget(), &n_dropped);
    SamplerPtr sampler = make_sampler(params);

    GenerateOutput out;
    out.n_prompt_positions = static_cast<int32_t>(count_positions(units));
    out.n_turns_dropped = static_cast<int32_t>(n_dropped);
    const Clock::time_point t0 = Clock::now();
    Clock::time_point t1 = t0;
    Utf8Stream utf8;
    std::vector<llama_token> reply;
    // From here on the KV cache changes: a failure leaves it half decoded, so the chat is reset.
    try {
        const size_t keep = cached_prefix(units);
        const Units kept(units.begin(), units.begin() + static_cast<std::ptrdiff_t>(keep));
        const auto reused = static_cast<int32_t>(count_positions(kept));
        decoder_->truncate(reused);
        context_ = kept;  // a true prefix until the rest is in
        decoder_->eval(units, keep);
        context_ = units;
        out.n_prompt_evaluated = out.n_prompt_positions - reused;
        t1 = Clock::now();
        for (;;) {
            const llama_token token = llama_sampler_sample(sampler.get(), decoder_->context(), -1);
            if (contract_.is_stop(token)) {
                out.stop_reason = QWENVL_STOP_TOKEN;
                out.stop_token = token;
                break;
            }
            reply.push_back(token);
            const std::string piece = utf8.push(tokenizer_.piece(token));
            out.text += piece;
            if (sink && sink(piece, token)) {
                out.stop_reason = QWENVL_STOP_CALLBACK;
                break;
            }
            if (decoder_->n_past() >= decoder_->n_ctx()) {
                out.stop_reason = QWENVL_STOP_CONTEXT_FULL;
                break;
            }
            if (static_cast<int32_t>(reply.size()) >= params.max_tokens) {
                out.stop_reason = QWENVL_STOP_MAX_TOKENS;  // the last id is not decoded: the next turn does it
                break;
            }
            decoder_->eval_token(token);
            context_.push_back(Unit::of_token(token));
        }
    } catch (const Error& e) {
        reset();
        throw Error(e.status(), std::string(e.what()) + "; the chat was reset");
    } catch (...) {
        reset();
        throw;
    }
    const std::string tail = utf8.flush();
    if (!tail.empty()) {
        out.text += tail;
        if (sink) sink(tail, -1);
    }
    out.prefill_ms = ms_between(t0, t1);
    out.decode_ms = ms_between(t1, Clock::now());
    out.tokens.assign(reply.begin(), reply.end());
    turn.answer = out.text;
    history_.push_back(std::move(turn));
    return out;
}

Turn Session::make_turn(const qwenvl_image* images, int32_t n_images, const std::string& question) const {
    Turn turn;
    turn.question = question;
    const size_t per_image = static_cast<size_t>(contract_.n_queries) * static_cast<size_t>(decoder_->n_embd());
    for (int32_t i = 0; i < n_images; ++i) {  // kept with the turn: a later prompt decodes them again
        turn.images.push_back(std::make_shared<const std::vector<float>>(images[i].rows, images[i].rows + per_image));
    }
    return turn;
}

void Session::add_turn(const qwenvl_image* images, int32_t n_images, const std::string& question,
                       const std::string& answer) {
    check_image_count(n_images);
    check_images(images, n_images, contract_.n_queries, decoder_->n_embd());
    if (!is_valid_utf8(answer)) fail(QWENVL_ERR_INVALID_ARGUMENT, "answer is not valid UTF-8");
    Turn turn = make_turn(images, n_images, question);
    turn.answer = answer;
    history_.push_back(std::move(turn));
}

void Session::reset() {
    decoder_->clear();
    history_.clear();
    context_.clear();
}

}  // namespace qwenvl

extern "C" int32_t qwenvl_default_threads(void) { return qwenvl::resolve_threads(0); }
