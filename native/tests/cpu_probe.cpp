// cpu_probe.cpp - which llama.cpp CPU code paths run here (used by native/arm64/run.sh under qemu).
//
//   qwenvl_cpu_probe [MODEL.gguf [N_TOKENS]]
//
// Prints, one "key: value" line each:
//   cpu_backend:  the CPU backend file llama.cpp loaded (with run-time variants, e.g. libggml-cpu-armv8.6_1.so;
//                 "built-in" when the CPU backend is linked in)
//   system_info:  llama_print_system_info(): the CPU features compiled into that backend AND present on
//                 this CPU (NEON, DOTPROD, MATMUL_INT8, SVE, ...)
// and with a model:
//   repack:       how many weight tensors llama.cpp repacked into which layout (e.g. "q4_0_4x8 x14"; "none")
//   greedy:       the greedy ids after a fixed token prompt (for comparing CPUs and machines)
// Why a program of its own: the features and the repacked layout are chosen by llama.cpp at run time and
// only its log says which; the parity tests show the results are right, this shows which kernels gave them.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "llama.h"

namespace {

std::string g_backend_file = "built-in";
std::map<std::string, int> g_repacked;  // layout -> tensors

// Keeps what the log says about loading backends and repacking weights; prints errors.
void on_log(ggml_log_level level, const char* text, void*) {
    if (text == nullptr) return;
    const std::string line(text);
    const std::string loaded = "loaded CPU backend from ";
    if (auto at = line.find(loaded); at != std::string::npos) {
        std::string path = line.substr(at + loaded.size());
        while (!path.empty() && (path.back() == '\n' || path.back() == '\r')) path.pop_back();
        g_backend_file = path.substr(path.find_last_of('/') + 1);
    }
    // repack.cpp: "repack: repack tensor blk.0.attn_q.weight with q4_0_4x8"
    const std::string with = " with ";
    if (line.find("repack tensor") != std::string::npos) {
        if (auto at = line.rfind(with); at != std::string::npos) {
            std::string layout = line.substr(at + with.size());
            while (!layout.empty() && (layout.back() == '\n' || layout.back() == '\r')) layout.pop_back();
            ++g_repacked[layout];
        }
    }
    if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

int probe_model(const char* path, int n_tokens) {
    llama_model_params mparams = llama_model_default_params();
    llama_model* model = llama_model_load_from_file(path, mparams);
    if (model == nullptr) {
        std::fprintf(stderr, "cpu_probe: cannot load %s\n", path);
        return 1;
    }
    std::string repack;
    for (const auto& [layout, count] : g_repacked) repack += (repack.empty() ? "" : " ") + layout + " x" + std::to_string(count);
    std::printf("repack: %s\n", repack.empty() ? "none" : repack.c_str());

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 256;
    cparams.n_threads = cparams.n_threads_batch = 2;
    llama_context* ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        std::fprintf(stderr, "cpu_probe: no context for %s\n", path);
        llama_model_free(model);
        return 1;
    }
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    // a fixed prompt of 40 ids: enough rows for the batched (gemm) kernels, then one-row (gemv) steps
    std::vector<llama_token> prompt;
    for (int i = 0; i < 40; ++i) prompt.push_back(static_cast<llama_token>((1000 + 7919 * i) % n_vocab));
    std::string ids;
    int rc = 0;
    llama_batch batch = llama_batch_get_one(prompt.data(), static_cast<int32_t>(prompt.size()));
    llama_token next = 0;
    for (int step = 0; step < n_tokens; ++step) {
        if (llama_decode(ctx, batch) != 0) {
            std::fprintf(stderr, "cpu_probe: llama_decode failed\n");
            rc = 1;
            break;
        }
        const float* logits = llama_get_logits_ith(ctx, -1);
        next = 0;
        for (int32_t t = 1; t < n_vocab; ++t) {
            if (logits[t] > logits[next]) next = t;
        }
        ids += (ids.empty() ? "" : " ") + std::to_string(next);
        batch = llama_batch_get_one(&next, 1);
    }
    std::printf("greedy: %s\n", ids.c_str());
    llama_free(ctx);
    llama_model_free(model);
    return rc;
}

}  // namespace

int main(int argc, char** argv) {
    llama_log_set(on_log, nullptr);
    llama_backend_init();
    std::printf("cpu_backend: %s\n", g_backend_file.c_str());
    std::printf("system_info: %s\n", llama_print_system_info());
    int rc = 0;
    if (argc > 1) rc = probe_model(argv[1], argc > 2 ? std::atoi(argv[2]) : 8);
    llama_backend_free();
    return rc;
}
