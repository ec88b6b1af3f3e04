// test_core.cpp - the native tests of libqwenvl_core, one group per ctest test.
//
//   qwenvl_core_tests <group>     groups: api_errors tokenize prompt_parity generate_parity
//                                         chat_kv_cache preprocess prompt_fixture
// Groups that need the tiny golden model read QWENVL_TEST_DATA (see test_data.h) and exit 77
// ("skipped" for ctest) without it; api_errors runs its model-free checks either way.
// Exit code 0: all checks passed; 1: some failed (each failure is printed).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "qwenvl_core.h"
#ifdef QWENVL_HAVE_PREPROCESS
#include "qwenvl_preprocess.h"
#endif
#include "test_data.h"

namespace {

using qwenvl_test::GoldenCase;
using qwenvl_test::TestData;

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        ++g_checks;                                                                 \
        if (!(cond)) {                                                              \
            ++g_failures;                                                           \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                           \
    } while (0)

// A call that must return `expected`, with a non-empty message when it is an error.
#define CHECK_STATUS(expr, expected) check_status((expr), (expected), #expr, __LINE__)

void check_status(int rc, int expected, const char* expr, int line) {
    ++g_checks;
    const std::string message = qwenvl_last_error();
    if (rc != expected) {
        ++g_failures;
        std::fprintf(stderr, "test_core.cpp:%d: %s returned %d (%s: %s), expected %d\n", line, expr, rc,
                     qwenvl_status_string(rc), message.c_str(), expected);
    } else if (expected != QWENVL_OK && message.empty()) {
        ++g_failures;
        std::fprintf(stderr, "test_core.cpp:%d: %s failed without a message\n", line, expr);
    } else if (expected == QWENVL_OK && !message.empty()) {
        ++g_failures;
        std::fprintf(stderr, "test_core.cpp:%d: %s succeeded but left the message '%s'\n", line, expr, message.c_str());
    }
}

template <class T>
std::string join(const std::vector<T>& v) {
    std::string out;
    for (size_t i = 0; i < v.size(); ++i) out += (i ? " " : "") + std::to_string(v[i]);
    return out;
}

#define CHECK_IDS(actual, expected)                                                                        \
    do {                                                                                                   \
        ++g_checks;                                                                                        \
        if ((actual) != (expected)) {                                                                      \
            ++g_failures;                                                                                  \
            std::fprintf(stderr, "%s:%d: ids differ\n  got      %s\n  expected %s\n", __FILE__, __LINE__, \
                         join(actual).c_str(), join(expected).c_str());                                   \
        }                                                                                                  \
    } while (0)

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// --- helpers over the C API -----------------------------------------------------------------------

struct Session {
    qwenvl_session* s = nullptr;
    Session(const std::string& path, int32_t n_ctx, int32_t n_batch) {
        qwenvl_open_params p = qwenvl_open_default_params();
        p.n_ctx = n_ctx;
        p.n_batch = n_batch;
        p.n_threads = 2;
        CHECK_STATUS(qwenvl_open(path.c_str(), &p, &s), QWENVL_OK);
    }
    ~Session() { qwenvl_close(s); }
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    qwenvl_info info() const {
        qwenvl_info i{};
        CHECK_STATUS(qwenvl_get_info(s, &i), QWENVL_OK);
        return i;
    }
};

std::vector<int32_t> prompt_ids(const Session& session, int32_t n_images, const std::string& question) {
    int32_t n = 0;
    int rc = qwenvl_prompt_tokens(session.s, n_images, question.c_str(), nullptr, 0, &n);
    if (rc != QWENVL_ERR_BUFFER_TOO_SMALL && rc != QWENVL_OK) {
        CHECK_STATUS(rc, QWENVL_OK);
        return {};
    }
    std::vector<int32_t> ids(static_cast<size_t>(n));
    CHECK_STATUS(qwenvl_prompt_tokens(session.s, n_images, question.c_str(), ids.data(), n, &n), QWENVL_OK);
    ids.resize(static_cast<size_t>(n));
    return ids;
}

std::vector<int32_t> tokenize(const Session& session, const std::string& text) {
    std::vector<int32_t> ids(text.size() + 8);
    int32_t n = 0;
    CHECK_STATUS(qwenvl_tokenize(session.s, text.c_str(), ids.data(), static_cast<int32_t>(ids.size()), &n), QWENVL_OK);
    ids.resize(static_cast<size_t>(n));
    return ids;
}

// Collects the streamed pieces; stops after `stop_after` calls when it is positive.
struct Stream {
    std::string text;
    std::vector<int32_t> tokens;
    int calls = 0;
    int stop_after = 0;

    static int callback(const char* piece, int32_t len, int32_t token, void* user) {
        auto* self = static_cast<Stream*>(user);
        self->text.append(piece, static_cast<size_t>(len));
        if (token >= 0) self->tokens.push_back(token);
        ++self->calls;
        return self->stop_after > 0 && self->calls >= self->stop_after ? 1 : 0;
    }
};

// The model contract as the core read it from the GGUF's qwenvl.* keys (filled in main).
qwenvl_info g_model{};

std::vector<qwenvl_image> images_of(TestData& data, const GoldenCase& c) {
    std::vector<qwenvl_image> images;
    for (const std::string& name : c.images) {
        images.push_back(qwenvl_image{data.rows(name).data(), g_model.n_image_rows, data.n_embd});
    }
    return images;
}

qwenvl_generate_params greedy(int32_t max_tokens) {
    qwenvl_generate_params p = qwenvl_generate_default_params();
    p.temperature = 0.0f;
    p.max_tokens = max_tokens;
    return p;
}

// The question's own ids inside a golden prompt: after "\n" behind the last </img> (or behind
// "<|im_start|>user\n"), up to the closing "<|im_end|>\n<|im_start|>assistant\n".
std::vector<int32_t> golden_question_ids(const GoldenCase& c) {
    const std::vector<int32_t>& ids = c.input_ids;
    size_t start = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
        if (ids[i] == g_model.image_end_id) start = i + 2;  // skip "</img>" and "\n"
    }
    if (start == 0) {
        int im_starts = 0;
        for (size_t i = 0; i < ids.size() && start == 0; ++i) {
            if (ids[i] == g_model.im_start_id && ++im_starts == 2) start = i + 3;  // "<|im_start|>", "user", "\n"
        }
    }
    return std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(start), ids.end() - 5);
}

// --- groups -----------------------------------------------------------------------------------------

void test_api_errors(TestData* data) {
    qwenvl_session* s = reinterpret_cast<qwenvl_session*>(0x1);  // must be reset to NULL on failure
    CHECK_STATUS(qwenvl_open(nullptr, nullptr, &s), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK(s == nullptr);
    CHECK_STATUS(qwenvl_open("model.gguf", nullptr, nullptr), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_open("", nullptr, &s), QWENVL_ERR_INVALID_ARGUMENT);

    const std::string missing = "/nonexistent-qwenvl-dir/llm.gguf";
    CHECK_STATUS(qwenvl_open(missing.c_str(), nullptr, &s), QWENVL_ERR_MODEL_LOAD);
    CHECK(contains(qwenvl_last_error(), missing));
    CHECK(s == nullptr);
    CHECK_STATUS(qwenvl_open("/", nullptr, &s), QWENVL_ERR_MODEL_LOAD);  // a folder
    const std::string garbage = "qwenvl_test_not_a.gguf";
    std::ofstream(garbage) << "this is not a GGUF file";
    CHECK_STATUS(qwenvl_open(garbage.c_str(), nullptr, &s), QWENVL_ERR_MODEL_LOAD);
    CHECK(contains(qwenvl_last_error(), "not a GGUF"));
    std::remove(garbage.c_str());

    qwenvl_open_params p = qwenvl_open_default_params();
    CHECK(p.n_ctx == 2048 && p.n_batch == 512 && p.n_threads == 0);
    for (int which = 0; which < 3; ++which) {
        qwenvl_open_params bad = p;
        if (which == 0) bad.n_ctx = 0;
        if (which == 1) bad.n_batch = 0;
        if (which == 2) bad.n_threads = -1;
        CHECK_STATUS(qwenvl_open(missing.c_str(), &bad, &s), QWENVL_ERR_INVALID_ARGUMENT);
    }

    qwenvl_info info{};
    int32_t ids[8];
    int32_t n = -1;
    CHECK_STATUS(qwenvl_close(nullptr), QWENVL_OK);
    CHECK_STATUS(qwenvl_get_info(nullptr, &info), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_tokenize(nullptr, "hi", ids, 8, &n), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK(n == 0);
    CHECK_STATUS(qwenvl_tokenize(nullptr, "hi", ids, 8, nullptr), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_prompt_tokens(nullptr, 0, "hi", ids, 8, &n), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_generate(nullptr, nullptr, 0, "hi", nullptr, nullptr, nullptr, nullptr),
                 QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_reset(nullptr), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_set_log_level(9), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_set_log_level(1), QWENVL_OK);
    CHECK(std::strcmp(qwenvl_status_string(QWENVL_ERR_CONTEXT_FULL), "context full") == 0);
    CHECK(std::strcmp(qwenvl_status_string(12345), "unknown status") == 0);

    if (data == nullptr) return;

    // a truncated GGUF: the header is there, the tensors are not
    const std::string truncated = "qwenvl_test_truncated.gguf";
    {
        std::ifstream in(data->gguf, std::ios::binary);
        std::vector<char> head(1 << 16);
        in.read(head.data(), static_cast<std::streamsize>(head.size()));
        std::ofstream(truncated, std::ios::binary).write(head.data(), in.gcount());
    }
    CHECK_STATUS(qwenvl_open(truncated.c_str(), nullptr, &s), QWENVL_ERR_MODEL_LOAD);
    std::remove(truncated.c_str());

    Session session(data->gguf, 512, 64);
    if (session.s == nullptr) return;
    qwenvl_session* ss = session.s;
    const qwenvl_info before = session.info();
    CHECK(before.n_embd == data->n_embd);
    CHECK(before.n_ctx == 512);
    CHECK(before.n_batch == 64);
    CHECK(before.n_past == 0);

    const std::vector<float>& rows = data->rows("sign");
    std::vector<float> nan_rows = rows;
    nan_rows[1234] = std::numeric_limits<float>::quiet_NaN();
    const qwenvl_image good{rows.data(), g_model.n_image_rows, data->n_embd};
    const qwenvl_image null_rows{nullptr, g_model.n_image_rows, data->n_embd};
    const qwenvl_image short_rows{rows.data(), g_model.n_image_rows - 1, data->n_embd};
    const qwenvl_image wide_rows{rows.data(), g_model.n_image_rows, data->n_embd + 1};
    const qwenvl_image nan_image{nan_rows.data(), g_model.n_image_rows, data->n_embd};
    const qwenvl_generate_params ok = greedy(4);
    qwenvl_result r{};
    constexpr int kBad = QWENVL_ERR_INVALID_ARGUMENT;
    CHECK_STATUS(qwenvl_generate(ss, &good, 1, nullptr, &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, nullptr, 1, "Hi", &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, &good, -1, "Hi", &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, &null_rows, 1, "Hi", &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, &short_rows, 1, "Hi", &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, &wide_rows, 1, "Hi", &ok, nullptr, nullptr, &r), kBad);
    CHECK(contains(qwenvl_last_error(), std::to_string(data->n_embd + 1) + " wide"));
    CHECK_STATUS(qwenvl_generate(ss, &nan_image, 1, "Hi", &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, nullptr, 0, "\xff\xfe bad", &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, nullptr, 0, "", &ok, nullptr, nullptr, &r), kBad);
    CHECK_STATUS(qwenvl_generate(ss, nullptr, 0, " \n\t", &ok, nullptr, nullptr, &r), kBad);
    for (int which = 0; which < 4; ++which) {
        qwenvl_generate_params bad = ok;
        if (which == 0) bad.max_tokens = 0;
        if (which == 1) bad.top_p = -0.1f;
        if (which == 2) bad.top_p = 1.5f;
        if (which == 3) bad.temperature = std::numeric_limits<float>::infinity();
        CHECK_STATUS(qwenvl_generate(ss, nullptr, 0, "Hi", &bad, nullptr, nullptr, &r), kBad);
    }
    // too many image rows for the context: 2 x 258 positions + the text do not fit 512
    const qwenvl_image two[2] = {good, good};
    CHECK_STATUS(qwenvl_generate(ss, two, 2, "Compare them.", &ok, nullptr, nullptr, &r), QWENVL_ERR_CONTEXT_FULL);
    CHECK(contains(qwenvl_last_error(), "512"));
    CHECK_STATUS(qwenvl_prompt_tokens(ss, 2, "Compare them.", nullptr, 0, &n), QWENVL_ERR_CONTEXT_FULL);
    std::string long_text;
    for (int i = 0; i < 600; ++i) long_text += "word ";
    CHECK_STATUS(qwenvl_generate(ss, nullptr, 0, long_text.c_str(), &ok, nullptr, nullptr, &r), QWENVL_ERR_CONTEXT_FULL);
    // output arrays
    CHECK_STATUS(qwenvl_prompt_tokens(ss, 0, "Hi", ids, 2, &n), QWENVL_ERR_BUFFER_TOO_SMALL);
    CHECK(n > 2);
    CHECK_STATUS(qwenvl_prompt_tokens(ss, 0, "Hi", nullptr, 5, &n), kBad);
    CHECK_STATUS(qwenvl_prompt_tokens(ss, -1, "Hi", ids, 8, &n), kBad);
    CHECK_STATUS(qwenvl_get_info(ss, nullptr), kBad);

    // none of that touched the chat; a good call still works, and a callback can stop it
    const qwenvl_info after = session.info();
    CHECK(after.n_past == 0 && after.n_turns == 0);
    Stream stream;
    stream.stop_after = 1;
    CHECK_STATUS(qwenvl_generate(ss, &good, 1, "What is this?", &ok, Stream::callback, &stream, &r), QWENVL_OK);
    CHECK(r.stop_reason == QWENVL_STOP_CALLBACK);
    CHECK(r.n_tokens == 1 && stream.tokens.size() == 1);
    CHECK(session.info().n_turns == 1);
    const qwenvl_generate_params sampled = [] {
        qwenvl_generate_params q = qwenvl_generate_default_params();
        q.max_tokens = 3;
        return q;
    }();
    CHECK(sampled.temperature == 1.0f && sampled.top_p == 0.3f);
    CHECK_STATUS(qwenvl_generate(ss, nullptr, 0, "And then?", &sampled, nullptr, nullptr, nullptr), QWENVL_OK);
    CHECK_STATUS(qwenvl_reset(ss), QWENVL_OK);
    CHECK(session.info().n_past == 0);
}

void test_tokenize(TestData& data) {
    Session session(data.gguf, 512, 512);
    if (session.s == nullptr) return;
    // the question's ids equal the golden prompt's, for every case (Chinese, injection, grounding)
    for (const GoldenCase& c : data.cases) {
        CHECK_IDS(tokenize(session, c.text), golden_question_ids(c));
    }
    // only the grounding tags are special: everything else that spells a special token is text
    const std::vector<int32_t> typed = tokenize(session, "<img>x</img><imgpad><|im_start|><|im_end|><|endoftext|><|extra_3|>");
    for (int32_t id : typed) CHECK(id < g_model.eos_id);
    const std::vector<int32_t> tags = tokenize(session, "<ref>a</ref><box>(1,2),(3,4)</box><quad>q</quad>");
    std::vector<int32_t> special;
    for (int32_t id : tags) {
        if (id >= g_model.eos_id) special.push_back(id);
    }
    const std::vector<int32_t> expected = {g_model.ref_start_id, g_model.ref_start_id + 1,
                                           g_model.ref_start_id + 2, g_model.ref_start_id + 3,
                                           g_model.ref_start_id + 4, g_model.ref_start_id + 5};
    CHECK_IDS(special, expected);
    CHECK(tags.front() == g_model.ref_start_id && tags.back() == g_model.ref_start_id + 5);
    CHECK(tokenize(session, "").empty());
}

void test_prompt_parity(TestData& data) {
    Session session(data.gguf, 1024, 512);
    if (session.s == nullptr) return;
    for (const GoldenCase& c : data.cases) {
        std::fprintf(stderr, "prompt %s\n", c.name.c_str());
        CHECK_IDS(prompt_ids(session, static_cast<int32_t>(c.images.size()), c.text), c.input_ids);
    }
}

void test_generate_parity(TestData& data) {
    // n_batch 96: image rows go in three pieces, the prompt text in several
    Session session(data.gguf, 1024, 96);
    if (session.s == nullptr) return;
    int checked = 0;
    for (const GoldenCase& c : data.cases) {
        if (!c.check_generation) continue;
        ++checked;
        std::fprintf(stderr, "generate %s\n", c.name.c_str());
        CHECK_STATUS(qwenvl_reset(session.s), QWENVL_OK);
        const std::vector<qwenvl_image> images = images_of(data, c);
        const qwenvl_generate_params p = greedy(data.max_new_tokens);
        Stream stream;
        qwenvl_result r{};
        CHECK_STATUS(qwenvl_generate(session.s, images.data(), static_cast<int32_t>(images.size()), c.text.c_str(), &p,
                                     Stream::callback, &stream, &r),
                     QWENVL_OK);
        const std::vector<int32_t> got(r.tokens, r.tokens + r.n_tokens);
        CHECK_IDS(got, c.generated_ids);
        CHECK_IDS(stream.tokens, c.generated_ids);
        CHECK(stream.text == std::string(r.text, static_cast<size_t>(r.text_len)));
        CHECK(std::string(r.text) == c.generated_text);
        const bool stopped = static_cast<int32_t>(c.generated_ids.size()) < data.max_new_tokens;
        CHECK(r.stop_reason == (stopped ? QWENVL_STOP_TOKEN : QWENVL_STOP_MAX_TOKENS));
        CHECK(r.n_prompt_evaluated == static_cast<int32_t>(c.input_ids.size()));
        CHECK(r.n_prompt_positions == r.n_prompt_evaluated);
        // without a stop token the last id is sampled but not yet decoded
        CHECK(r.n_past == r.n_prompt_evaluated + r.n_tokens - (stopped ? 0 : 1));
        CHECK(r.prefill_ms > 0 && r.decode_ms > 0 && r.decode_tokens_per_s > 0);
        std::fprintf(stderr, "  prefill %d positions in %.1f ms, decode %d tokens at %.1f tokens/s\n",
                     r.n_prompt_evaluated, r.prefill_ms, r.n_tokens, r.decode_tokens_per_s);
    }
    CHECK(checked >= 4);
}

// Positions at the start of `a` and `b` with equal ids (image positions compare equal: the tests
// below reuse one image).
size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
    size_t n = 0;
    while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
    return n;
}

// What the KV cache holds after a turn: its prompt and the reply ids that were decoded (all but
// the last one when generation stopped without a stop token).
std::vector<int32_t> cached_after(const std::vector<int32_t>& prompt, const qwenvl_result& r) {
    std::vector<int32_t> ids = prompt;
    const int32_t decoded = r.n_tokens - (r.stop_reason == QWENVL_STOP_TOKEN ? 0 : 1);
    ids.insert(ids.end(), r.tokens, r.tokens + decoded);
    return ids;
}

// A turn's decoded positions are those of its prompt past the part the cache already holds; an
// image is never cut in two, so a prefix that ends inside one starts over at the image.
int32_t expected_evaluated(const std::vector<int32_t>& prompt, const std::vector<int32_t>& cached) {
    size_t keep = common_prefix(prompt, cached);
    while (keep > 0 && keep < prompt.size() && prompt[keep] == QWENVL_IMAGE_POSITION &&
           prompt[keep - 1] == QWENVL_IMAGE_POSITION) {
        --keep;
    }
    if (keep == prompt.size()) --keep;
    return static_cast<int32_t>(prompt.size() - keep);
}

void test_chat_kv_cache(TestData& data) {
    const GoldenCase& first = data.find_case("one_image");
    const std::vector<qwenvl_image> images = images_of(data, first);
    qwenvl_result r{};
    {
        Session session(data.gguf, 1024, 512);
        if (session.s == nullptr) return;
        const qwenvl_generate_params p = greedy(data.max_new_tokens);
        CHECK_STATUS(qwenvl_generate(session.s, images.data(), 1, first.text.c_str(), &p, nullptr, nullptr, &r), QWENVL_OK);
        const std::vector<int32_t> cached1 = cached_after(first.input_ids, r);
        CHECK(r.n_past == static_cast<int32_t>(cached1.size()));

        // turn 2: the whole prompt is turn 1 (its answer as text) + the new question, and only what
        // the cache lacks is decoded: the new question's tokens, not the first turn and its image
        const std::string q2 = "What colour is the circle?";
        const std::vector<int32_t> prompt2 = prompt_ids(session, 0, q2);
        CHECK_IDS(std::vector<int32_t>(prompt2.begin(), prompt2.begin() + static_cast<std::ptrdiff_t>(first.input_ids.size())),
                  first.input_ids);
        const qwenvl_generate_params p2 = greedy(8);
        CHECK_STATUS(qwenvl_generate(session.s, nullptr, 0, q2.c_str(), &p2, nullptr, nullptr, &r), QWENVL_OK);
        std::fprintf(stderr, "turn 2: prompt %d positions, %d decoded (turn 1 left %zu in the cache)\n",
                     r.n_prompt_positions, r.n_prompt_evaluated, cached1.size());
        CHECK(r.n_prompt_positions == static_cast<int32_t>(prompt2.size()));
        CHECK(r.n_prompt_evaluated == expected_evaluated(prompt2, cached1));
        CHECK(r.n_prompt_evaluated <= static_cast<int32_t>(prompt2.size() - first.input_ids.size()));
        CHECK(r.n_turns_dropped == 0);
        CHECK(session.info().n_turns == 2);
        const std::vector<int32_t> cached2 = cached_after(prompt2, r);
        CHECK(r.n_past == static_cast<int32_t>(cached2.size()));

        // turn 3 brings an image: its 256 rows are among the decoded positions, the old image is not
        const std::vector<int32_t> prompt3 = prompt_ids(session, 1, "And this one?");
        CHECK_STATUS(qwenvl_generate(session.s, images.data(), 1, "And this one?", &p2, nullptr, nullptr, &r), QWENVL_OK);
        CHECK(r.n_prompt_evaluated == expected_evaluated(prompt3, cached2));
        CHECK(r.n_prompt_evaluated > g_model.n_image_rows && r.n_prompt_evaluated < 2 * g_model.n_image_rows);

        // reset: the next prompt is the golden prompt again, and greedy decoding repeats the golden ids
        CHECK_STATUS(qwenvl_reset(session.s), QWENVL_OK);
        CHECK(session.info().n_past == 0 && session.info().n_turns == 0);
        CHECK_IDS(prompt_ids(session, 1, first.text), first.input_ids);
        CHECK_STATUS(qwenvl_generate(session.s, images.data(), 1, first.text.c_str(), &p, nullptr, nullptr, &r), QWENVL_OK);
        CHECK_IDS(std::vector<int32_t>(r.tokens, r.tokens + r.n_tokens), first.generated_ids);
        CHECK(r.n_prompt_evaluated == static_cast<int32_t>(first.input_ids.size()));
    }
    {
        // a small context: the third turn does not fit behind the first two, so the first turn is
        // left out; the prompt is decoded again from the first position that changed
        Session session(data.gguf, 512, 512);
        if (session.s == nullptr) return;
        const qwenvl_generate_params p = greedy(8);
        CHECK_STATUS(qwenvl_generate(session.s, images.data(), 1, first.text.c_str(), &p, nullptr, nullptr, &r), QWENVL_OK);
        const std::vector<int32_t> prompt2 = prompt_ids(session, 0, "Tell me more.");
        CHECK_STATUS(qwenvl_generate(session.s, nullptr, 0, "Tell me more.", &p, nullptr, nullptr, &r), QWENVL_OK);
        CHECK(r.n_turns_dropped == 0);
        const std::vector<int32_t> cached2 = cached_after(prompt2, r);
        const std::vector<int32_t> prompt3 = prompt_ids(session, 1, first.text);
        CHECK_STATUS(qwenvl_generate(session.s, images.data(), 1, first.text.c_str(), &p, nullptr, nullptr, &r), QWENVL_OK);
        CHECK(r.n_turns_dropped == 1);
        CHECK(r.n_prompt_positions == static_cast<int32_t>(prompt3.size()));
        CHECK(r.n_prompt_evaluated == expected_evaluated(prompt3, cached2));
        CHECK(session.info().n_turns == 3);
        // prompt 3 = system message + turn 2 + the new turn (which equals the golden prompt's user part)
        const size_t n_system = 10;  // <|im_start|>system\n(the system prompt: 7 ids)<|im_end|>
        CHECK_IDS(std::vector<int32_t>(prompt3.begin(), prompt3.begin() + n_system),
                  std::vector<int32_t>(first.input_ids.begin(), first.input_ids.begin() + n_system));
        const std::vector<int32_t> user_part(first.input_ids.begin() + n_system, first.input_ids.end());
        CHECK_IDS(std::vector<int32_t>(prompt3.end() - static_cast<std::ptrdiff_t>(user_part.size()), prompt3.end()),
                  user_part);
        int32_t image_positions = 0;
        for (int32_t id : prompt3) image_positions += id == QWENVL_IMAGE_POSITION;
        CHECK(image_positions == g_model.n_image_rows);  // turn 1's image is gone
    }
}

// tests/data/multi_turn_prompt.json (cases.txt "fixture_*" lines): the prompt the Python builder makes
// for earlier turns given as text (qwenvl_add_turn) and a new question with two images.
void test_prompt_fixture(TestData& data) {
    CHECK(!data.fixture_ids.empty());
    Session session(data.gguf, 2048, 512);
    if (session.s == nullptr) return;
    const std::vector<float> rows(static_cast<size_t>(g_model.n_image_rows) * data.n_embd, 0.5f);
    for (const auto& turn : data.fixture_turns) {
        const std::vector<qwenvl_image> images(static_cast<size_t>(turn.n_images),
                                               qwenvl_image{rows.data(), g_model.n_image_rows, data.n_embd});
        CHECK_STATUS(qwenvl_add_turn(session.s, images.data(), turn.n_images, turn.question.c_str(), turn.answer.c_str()),
                     QWENVL_OK);
    }
    CHECK(session.info().n_turns == static_cast<int32_t>(data.fixture_turns.size()));
    CHECK_IDS(prompt_ids(session, data.fixture_question_images, data.fixture_question), data.fixture_ids);
    CHECK_STATUS(qwenvl_add_turn(session.s, nullptr, 0, "q", nullptr), QWENVL_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(qwenvl_add_turn(session.s, nullptr, 0, "q", "\xff"), QWENVL_ERR_INVALID_ARGUMENT);
}

void test_preprocess(TestData& data) {
#ifdef QWENVL_HAVE_PREPROCESS
    CHECK(data.image_size > 0 && !data.rgb_images.empty());
    for (const qwenvl_test::RgbImage& im : data.rgb_images) {
        const std::vector<unsigned char> rgb = data.read_bytes(im.name + ".rgb");
        const std::vector<float> golden = data.read_floats(im.name + ".pixels.f32");
        CHECK(rgb.size() == static_cast<size_t>(im.width) * im.height * 3);
        std::vector<float> out(3u * static_cast<size_t>(data.image_size) * data.image_size);
        CHECK(golden.size() == out.size());
        CHECK(g_model.image_size == data.image_size);  // read by the core from qwenvl.image_size
        const int rc = qwenvl_preprocess_image(rgb.data(), im.width, im.height, 3, g_model.image_size,
                                               g_model.image_mean, g_model.image_std, out.data());
        CHECK(rc == QWENVL_PREPROCESS_OK);
        double max_err = 0;
        for (size_t i = 0; i < out.size() && i < golden.size(); ++i) {
            max_err = std::max(max_err, static_cast<double>(std::fabs(out[i] - golden[i])));
        }
        std::fprintf(stderr, "preprocess %s: max abs error vs golden %.3g\n", im.name.c_str(), max_err);
        CHECK(max_err <= 1e-6);
    }
    float out[3 * 4 * 4];
    const float* mean = g_model.image_mean;
    const float* sd = g_model.image_std;
    CHECK(qwenvl_preprocess_image(nullptr, 4, 4, 3, 4, mean, sd, out) < 0);
    const unsigned char px[4 * 4 * 3] = {0};
    CHECK(qwenvl_preprocess_image(px, 4, 4, 2, 4, mean, sd, out) < 0);
    CHECK(qwenvl_preprocess_image(px, 0, 4, 3, 4, mean, sd, out) < 0);
    CHECK(qwenvl_preprocess_image(px, 4, 4, 3, 4, nullptr, sd, out) == QWENVL_PREPROCESS_ERR_NULL);
    const float zero_std[3] = {1.0f, 0.0f, 1.0f};
    CHECK(qwenvl_preprocess_image(px, 4, 4, 3, 4, mean, zero_std, out) == QWENVL_PREPROCESS_ERR_NORM);
#else
    (void)data;
    std::fprintf(stderr, "built without image_preprocess.cpp\n");
    std::exit(77);
#endif
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s api_errors|tokenize|prompt_parity|generate_parity|chat_kv_cache|preprocess|prompt_fixture\n",
                     argv[0]);
        return 2;
    }
    const std::string group = argv[1];
    qwenvl_set_log_level(1);
    TestData data;
    std::string why;
    const bool have_data = data.load(why);
    const std::map<std::string, std::function<void(TestData&)>> groups = {
        {"tokenize", test_tokenize},
        {"prompt_parity", test_prompt_parity},
        {"generate_parity", test_generate_parity},
        {"chat_kv_cache", test_chat_kv_cache},
        {"preprocess", test_preprocess},
        {"prompt_fixture", test_prompt_fixture},
    };
    if (have_data) {  // the contract, as the core reads it from the GGUF
        Session session(data.gguf, 256, 64);
        if (session.s != nullptr) g_model = session.info();
    }
    if (group == "api_errors") {
        test_api_errors(have_data ? &data : nullptr);
        if (!have_data) std::fprintf(stderr, "model checks skipped: %s\n", why.c_str());
    } else if (groups.count(group)) {
        if (!have_data) {
            std::fprintf(stderr, "skipped: %s\n", why.c_str());
            return 77;
        }
        try {
            groups.at(group)(data);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "error: %s\n", e.what());
            ++g_failures;
        }
    } else {
        std::fprintf(stderr, "unknown group %s\n", group.c_str());
        return 2;
    }
    std::fprintf(stderr, "%s: %d checks, %d failed\n", group.c_str(), g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
