// model_contract.h - the model's facts as the GGUF states them (qwenvl.* metadata keys).
//
// The exporter writes every fact the runtimes need into llm.gguf (qwenvl_edge/contract.py is the one
// place that defines them): special token ids, rows per image, image size, CLIP mean/std, the system
// prompt. The core reads them here instead of keeping its own copies, so Python and C++ cannot drift.
#pragma once

#include <cstdint>
#include <string>

#include "llama.h"

namespace qwenvl {

struct ModelContract {
    llama_token eos_id = -1;
    llama_token im_start_id = -1;
    llama_token im_end_id = -1;
    llama_token ref_start_id = -1;  // <ref>; </ref> <box> </box> <quad> </quad> follow
    llama_token image_start_id = -1;
    llama_token image_end_id = -1;
    llama_token image_pad_id = -1;
    int32_t n_queries = 0;  // image rows per image
    int32_t image_size = 0;
    float image_mean[3] = {0, 0, 0};
    float image_std[3] = {0, 0, 0};
    std::string system_prompt;

    bool is_stop(llama_token t) const { return t == im_end_id || t == im_start_id || t == eos_id; }

    // Reads and checks every key; throws Error(QWENVL_ERR_MODEL_LOAD) naming a missing or bad one.
    static ModelContract read(const llama_model* model, const std::string& path);
};

}  // namespace qwenvl
