// model_contract.cpp - see model_contract.h.
#include "model_contract.h"

#include <cerrno>
#include <cstdlib>
#include <vector>

#include "error.h"
#include "qwenvl_core.h"

namespace qwenvl {
namespace {

std::string meta(const llama_model* model, const char* key, const std::string& path) {
    std::vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(model, key, buf.data(), buf.size());
    if (n >= static_cast<int32_t>(buf.size())) {
        buf.resize(static_cast<size_t>(n) + 1);
        n = llama_model_meta_val_str(model, key, buf.data(), buf.size());
    }
    if (n < 0) {
        fail(QWENVL_ERR_MODEL_LOAD, path + ": no " + key + " in the GGUF metadata: exported by an older qwenvl-edge; "
                                        "export the bundle again");
    }
    return std::string(buf.data(), static_cast<size_t>(n));
}

int32_t meta_int(const llama_model* model, const char* key, const std::string& path, int64_t low, int64_t high) {
    const std::string text = meta(model, key, path);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(text.c_str(), &end, 10);
    if (errno != 0 || end == text.c_str() || *end != '\0' || v < low || v > high) {
        fail(QWENVL_ERR_MODEL_LOAD, path + ": " + key + " is '" + text + "', not an integer in [" +
                                        std::to_string(low) + ", " + std::to_string(high) + "]");
    }
    return static_cast<int32_t>(v);
}

// Three floats written as one string, "0.48, 0.45, 0.40" (llama.cpp does not expose array values).
void meta_floats(const llama_model* model, const char* key, const std::string& path, float out[3]) {
    const std::string text = meta(model, key, path);
    const char* p = text.c_str();
    if (*p == '[') ++p;
    for (int i = 0; i < 3; ++i) {
        char* end = nullptr;
        out[i] = std::strtof(p, &end);
        if (end == p) fail(QWENVL_ERR_MODEL_LOAD, path + ": " + key + " is '" + text + "', not three numbers");
        p = end;
        while (*p == ',' || *p == ' ') ++p;
    }
}

}  // namespace

ModelContract ModelContract::read(const llama_model* model, const std::string& path) {
    const int64_t max_id = llama_vocab_n_tokens(llama_model_get_vocab(model)) - 1;
    ModelContract c;
    c.eos_id = meta_int(model, "qwenvl.eos_id", path, 0, max_id);
    c.im_start_id = meta_int(model, "qwenvl.im_start_id", path, 0, max_id);
    c.im_end_id = meta_int(model, "qwenvl.im_end_id", path, 0, max_id);
    c.ref_start_id = meta_int(model, "qwenvl.ref_start_id", path, 0, max_id - 5);
    c.image_start_id = meta_int(model, "qwenvl.image_start_id", path, 0, max_id);
    c.image_end_id = meta_int(model, "qwenvl.image_end_id", path, 0, max_id);
    c.image_pad_id = meta_int(model, "qwenvl.image_pad_id", path, 0, max_id);
    c.n_queries = meta_int(model, "qwenvl.n_queries", path, 1, 1 << 16);
    c.image_size = meta_int(model, "qwenvl.image_size", path, 1, 1 << 13);
    meta_floats(model, "qwenvl.image_mean", path, c.image_mean);
    meta_floats(model, "qwenvl.image_std", path, c.image_std);
    c.system_prompt = meta(model, "qwenvl.system_prompt", path);
    return c;
}

}  // namespace qwenvl
