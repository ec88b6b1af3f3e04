// qwenvl_native.cpp - `qwenvl-native run BUNDLE [IMAGE...] QUESTION`: the whole pipeline without Python.
//
// image file -> upright RGB (image_file.cpp) -> pixels (qwenvl_preprocess_image, Pillow-exact) ->
// image rows (qwenvl_vision_*, ONNX Runtime's C API on the bundle's vision graph) -> the vision session
// is freed -> decoder (qwenvl_open / qwenvl_generate on the bundle's GGUF) -> the answer streamed to
// stdout. Only the answer goes to stdout; an error is one line on stderr and a non-zero exit.
#include <sys/resource.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "image_file.h"
#include "json_value.h"
#include "qwenvl_core.h"
#include "qwenvl_preprocess.h"
#include "qwenvl_vision.h"

namespace {

using qwenvl::tool::JsonValue;
using Clock = std::chrono::steady_clock;

const char* const kUsage =
    "usage: qwenvl-native run BUNDLE [IMAGE...] QUESTION [--greedy] [--max-tokens N] [--temperature T]\n"
    "                         [--seed N] [--threads N] [--ctx N] [--kv f16|q8_0] [--mmap] [--stats] [-v]\n"
    "                         [--rows-out FILE] [--vision-only]\n"
    "\n"
    "Answers QUESTION about the images with the bundle (a folder written by `qwenvl-edge export`), all in\n"
    "native code: image -> vision.onnx (ONNX Runtime) -> llm.gguf (llama.cpp). The answer is streamed to stdout.\n"
    "\n"
    "  --greedy          argmax decoding (temperature 0), as the golden tests run\n"
    "  --max-tokens N    most tokens to generate (default: the bundle's max_new_tokens)\n"
    "  --temperature T   sampling temperature (default 1.0; top_p from the bundle)\n"
    "  --seed N          sampling seed (default 0)\n"
    "  --threads N       CPU threads for vision and decoder (default: all cores)\n"
    "  --ctx N           context positions (default 2048)\n"
    "  --kv f16|q8_0     KV cache type (default f16; q8_0 halves its memory, the phone setting)\n"
    "  --mmap            map the GGUF and use it as it is (no repacking): the weights stay file pages the\n"
    "                    OS can drop under memory pressure; default: read them (repacked for the CPU)\n"
    "  --stats           one JSON line of timings and peak memory on stderr at the end\n"
    "  -v                llama.cpp's info log on stderr\n"
    "  --rows-out FILE   also write the image rows, float32 little-endian [images, rows, width]\n"
    "  --vision-only     stop after the vision step (with --rows-out: compare rows across machines)\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::string bundle;
    std::vector<std::string> images;
    std::string question;
    bool greedy = false;
    int max_tokens = 0;  // 0: the bundle's
    double temperature = 1.0;
    long seed = 0;
    int threads = 0;
    int ctx = 2048;
    int kv_type = QWENVL_KV_F16;
    bool mmap = false;
    bool stats = false;
    bool verbose = false;
    std::string rows_out;
    bool vision_only = false;
};

long parse_int(const std::string& flag, const std::string& text, long low, long high) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0 || v < low || v > high) {
        throw UsageError(flag + " " + text + ": expected an integer in " + std::to_string(low) + ".." + std::to_string(high));
    }
    return v;
}

Options parse_args(int argc, char** argv) {
    if (argc < 2 || std::strcmp(argv[1], "run") != 0) throw UsageError("expected the command `run`");
    Options o;
    std::vector<std::string> positional;
    bool options_done = false;
    for (int i = 2; i < argc; ++i) {
        const std::string a = argv[i];
        const auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw UsageError(a + " needs a value");
            return argv[++i];
        };
        if (options_done || a.size() < 2 || a[0] != '-') positional.push_back(a);
        else if (a == "--") options_done = true;
        else if (a == "--greedy") o.greedy = true;
        else if (a == "--max-tokens") o.max_tokens = static_cast<int>(parse_int(a, value(), 1, 1 << 20));
        else if (a == "--seed") o.seed = parse_int(a, value(), 0, 4294967295L);
        else if (a == "--threads") o.threads = static_cast<int>(parse_int(a, value(), 1, 1024));
        else if (a == "--ctx") o.ctx = static_cast<int>(parse_int(a, value(), 16, 1 << 20));
        else if (a == "--mmap") o.mmap = true;
        else if (a == "--stats") o.stats = true;
        else if (a == "-v" || a == "--verbose") o.verbose = true;
        else if (a == "--rows-out") o.rows_out = value();
        else if (a == "--vision-only") o.vision_only = true;
        else if (a == "--temperature") {
            const std::string t = value();
            char* end = nullptr;
            o.temperature = std::strtod(t.c_str(), &end);
            if (t.empty() || *end != '\0' || !std::isfinite(o.temperature) || o.temperature < 0 || o.temperature > 100) {
                throw UsageError("--temperature " + t + ": expected a number in 0..100");
            }
        } else if (a == "--kv") {
            const std::string k = value();
            if (k == "f16") o.kv_type = QWENVL_KV_F16;
            else if (k == "q8_0") o.kv_type = QWENVL_KV_Q8_0;
            else throw UsageError("--kv " + k + ": expected f16 or q8_0");
        } else {
            throw UsageError("unknown option " + a);
        }
    }
    if (positional.size() < 2) throw UsageError("expected BUNDLE and QUESTION");
    o.bundle = positional.front();
    o.question = positional.back();
    o.images.assign(positional.begin() + 1, positional.end() - 1);
    if (o.greedy) o.temperature = 0.0;
    return o;
}

// --- the bundle: manifest.json and the two files it names ---------------------------------------------

struct BundleFacts {
    std::string vision_path;
    std::string llm_path;
    int image_size = 0;
    float mean[3] = {0, 0, 0};
    float std_[3] = {0, 0, 0};
    float top_p = 0.3f;
    int max_new_tokens = 512;
};

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": missing: not a qwenvl-edge bundle");
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

long long file_size(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    return in ? static_cast<long long>(in.tellg()) : -1;
}

BundleFacts read_bundle(const std::string& folder) {
    const std::string manifest_path = folder + "/manifest.json";
    JsonValue m;
    try {
        m = qwenvl::tool::parse_json(read_text(manifest_path));
    } catch (const std::runtime_error& e) {
        const std::string what = e.what();
        throw std::runtime_error(what.rfind(manifest_path, 0) == 0 ? what : manifest_path + ": not valid JSON (" + what + ")");
    }
    const auto bad = [&](const std::string& why) { return std::runtime_error(manifest_path + ": " + why); };
    const JsonValue* format = m.get("format");
    if (!format || format->string != "qwenvl-edge-bundle") throw bad("not a qwenvl-edge bundle manifest");
    const JsonValue* model = m.get("model");
    const JsonValue* files = m.get("files");
    if (!model || !files || files->kind != JsonValue::Kind::Object) throw bad("no model or files section");
    BundleFacts b;
    const auto number = [&](const char* key, double low, double high) {
        const JsonValue* v = model->get(key);
        if (!v || v->kind != JsonValue::Kind::Number || !(v->number >= low && v->number <= high)) {
            throw bad(std::string("model.") + key + " missing or out of range");
        }
        return v->number;
    };
    const auto triple = [&](const char* key, float* out, bool positive) {
        const JsonValue* v = model->get(key);
        if (!v || v->array.size() != 3) throw bad(std::string("model.") + key + " is not three numbers");
        for (int k = 0; k < 3; ++k) {
            const JsonValue& x = v->array[static_cast<size_t>(k)];
            if (x.kind != JsonValue::Kind::Number || !std::isfinite(x.number) || (positive && x.number <= 0)) {
                throw bad(std::string("model.") + key + " is not three finite numbers");
            }
            out[k] = static_cast<float>(x.number);
        }
    };
    b.image_size = static_cast<int>(number("image_size", 1, 8192));
    triple("image_mean", b.mean, false);
    triple("image_std", b.std_, true);
    if (model->get("top_p")) b.top_p = static_cast<float>(number("top_p", 1e-9, 1));
    if (model->get("max_new_tokens")) b.max_new_tokens = static_cast<int>(number("max_new_tokens", 1, 1 << 20));
    const auto part = [&](const char* section, const char* fallback) {
        const JsonValue* s = m.get(section);
        const JsonValue* f = s ? s->get("file") : nullptr;
        const std::string name = f && f->kind == JsonValue::Kind::String ? f->string : fallback;
        if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
            throw bad(std::string(section) + ".file is not a plain file name");
        }
        const JsonValue* entry = files->get(name);
        const JsonValue* bytes = entry ? entry->get("bytes") : nullptr;
        if (!bytes || bytes->kind != JsonValue::Kind::Number) throw bad("lists no " + name);
        const std::string path = folder + "/" + name;
        const long long size = file_size(path);
        if (size < 0) throw std::runtime_error(path + ": missing bundle file");
        if (static_cast<double>(size) != bytes->number) {
            throw std::runtime_error(path + ": " + std::to_string(size) + " bytes, manifest says " +
                                     std::to_string(static_cast<long long>(bytes->number)) +
                                     ": truncated or from another export");
        }
        return path;
    };
    b.vision_path = part("vision", "vision.onnx");
    b.llm_path = part("llm", "llm.gguf");
    return b;
}

// --- the run -------------------------------------------------------------------------------------------

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// Resident memory now (kB), from /proc/self/statm; 0 where there is none.
long rss_now_kb() {
    std::ifstream statm("/proc/self/statm");
    long pages = 0, resident = 0;
    if (!(statm >> pages >> resident)) return 0;
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

long peak_rss_kb() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return u.ru_maxrss;  // kilobytes on Linux
}

[[noreturn]] void core_fail(const char* what) {
    throw std::runtime_error(std::string(what) + ": " + qwenvl_last_error());
}

struct Stream {
    Clock::time_point start;
    double first_token_ms = -1;
};

int on_token(const char* piece, int32_t len, int32_t /*token*/, void* user) {
    auto* s = static_cast<Stream*>(user);
    if (s->first_token_ms < 0) s->first_token_ms = ms_since(s->start);
    if (len > 0) std::fwrite(piece, 1, static_cast<size_t>(len), stdout);
    std::fflush(stdout);
    return 0;
}

// Image files -> rows [n_rows * n_embd] per image; the vision session lives only inside this call.
std::vector<std::vector<float>> encode_images(const Options& o, const BundleFacts& b, int32_t* n_rows, int32_t* n_embd,
                                              double* load_ms, double* encode_ms) {
    std::vector<qwenvl::tool::RgbImage> pictures;
    for (const std::string& path : o.images) {
        try {
            pictures.push_back(qwenvl::tool::read_image_file(path, b.image_size));
        } catch (const std::runtime_error& e) {
            throw std::runtime_error(path + ": " + e.what());
        }
    }
    const auto t0 = Clock::now();
    qwenvl_vision* vision = nullptr;
    if (qwenvl_vision_open(b.vision_path.c_str(), o.threads, &vision) != QWENVL_OK) core_fail("vision");
    *load_ms = ms_since(t0);
    std::vector<std::vector<float>> rows;
    try {
        qwenvl_vision_info info{};
        if (qwenvl_vision_get_info(vision, &info) != QWENVL_OK) core_fail("vision");
        if (info.image_size != b.image_size) {
            throw std::runtime_error(b.vision_path + ": takes " + std::to_string(info.image_size) + " pixel images, manifest says " +
                                     std::to_string(b.image_size));
        }
        *n_rows = info.n_rows;
        *n_embd = info.n_embd;
        const auto t1 = Clock::now();
        const size_t side = static_cast<size_t>(b.image_size);
        std::vector<float> pixels(3 * side * side);
        for (size_t i = 0; i < pictures.size(); ++i) {
            const auto& p = pictures[i];
            const int rc = qwenvl_preprocess_image(p.rgb.data(), p.width, p.height, 3, b.image_size, b.mean, b.std_,
                                                   pixels.data());
            if (rc != QWENVL_PREPROCESS_OK) throw std::runtime_error(o.images[i] + ": " + qwenvl_preprocess_error_string(rc));
            rows.emplace_back(static_cast<size_t>(info.n_rows) * static_cast<size_t>(info.n_embd));
            if (qwenvl_vision_encode(vision, pixels.data(), rows.back().data()) != QWENVL_OK) core_fail(o.images[i].c_str());
        }
        *encode_ms = ms_since(t1);
    } catch (...) {
        qwenvl_vision_close(vision);
        throw;
    }
    qwenvl_vision_close(vision);  // before the decoder loads: on a phone the two never share memory
#if defined(__GLIBC__)
    if (std::getenv("QWENVL_NO_TRIM") == nullptr) malloc_trim(0);  // give the freed session's heap back to the OS
#endif
    return rows;
}

// Rows as raw float32 (the host's byte order: little-endian on x86-64 and aarch64 Linux).
void write_rows(const std::string& path, const std::vector<std::vector<float>>& rows) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    for (const auto& r : rows) out.write(reinterpret_cast<const char*>(r.data()), static_cast<std::streamsize>(r.size() * sizeof(float)));
    out.close();
    if (!out) throw std::runtime_error(path + ": cannot write the rows");
}

int run(const Options& o) {
    const auto start = Clock::now();
    qwenvl_set_log_level(o.verbose ? 3 : 1);
    const BundleFacts b = read_bundle(o.bundle);
    int32_t n_rows = 0, n_embd = 0;
    double vision_load_ms = 0, vision_ms = 0;
    std::vector<std::vector<float>> rows;
    if (!o.images.empty()) rows = encode_images(o, b, &n_rows, &n_embd, &vision_load_ms, &vision_ms);
    const long peak_after_vision = peak_rss_kb();
    const long rss_after_vision = rss_now_kb();
    if (!o.rows_out.empty()) write_rows(o.rows_out, rows);
    if (o.vision_only) {
        if (o.stats) std::fprintf(stderr, "{\"peak_rss_vision_kb\": %ld, \"rss_after_vision_kb\": %ld}\n", peak_after_vision, rss_after_vision);
        return 0;
    }

    const auto t_load = Clock::now();
    qwenvl_open_params params = qwenvl_open_default_params();
    params.n_ctx = o.ctx;
    params.n_threads = o.threads;
    params.kv_type = o.kv_type;
    params.use_mmap = o.mmap ? 1 : 0;
    qwenvl_session* session = nullptr;
    if (qwenvl_open(b.llm_path.c_str(), &params, &session) != QWENVL_OK) core_fail("decoder");
    const double load_ms = ms_since(t_load);

    std::vector<qwenvl_image> images;
    for (const auto& r : rows) images.push_back(qwenvl_image{r.data(), n_rows, n_embd});
    qwenvl_generate_params gen = qwenvl_generate_default_params();
    gen.max_tokens = o.max_tokens > 0 ? o.max_tokens : b.max_new_tokens;
    gen.temperature = static_cast<float>(o.temperature);
    gen.top_p = b.top_p;
    gen.seed = static_cast<uint32_t>(o.seed);
    Stream stream{start};
    qwenvl_result result{};
    const int rc = qwenvl_generate(session, images.empty() ? nullptr : images.data(), static_cast<int32_t>(images.size()),
                                   o.question.c_str(), &gen, on_token, &stream, &result);
    if (rc != QWENVL_OK) {
        const std::string why = qwenvl_last_error();
        qwenvl_close(session);
        throw std::runtime_error(why);
    }
    std::fputc('\n', stdout);
    std::fflush(stdout);
    if (o.stats) {
        std::fprintf(stderr,
                     "{\"images\": %zu, \"vision_load_ms\": %.1f, \"vision_ms\": %.1f, \"decoder_load_ms\": %.1f, "
                     "\"prefill_ms\": %.1f, \"ttft_ms\": %.1f, \"decode_ms\": %.1f, \"n_tokens\": %d, "
                     "\"decode_tokens_per_s\": %.3f, \"n_prompt_positions\": %d, \"peak_rss_vision_kb\": %ld, "
                     "\"rss_after_vision_kb\": %ld, \"peak_rss_kb\": %ld, \"kv\": \"%s\", \"mmap\": %s, \"n_ctx\": %d}\n",
                     rows.size(), vision_load_ms, vision_ms, load_ms, result.prefill_ms, stream.first_token_ms,
                     result.decode_ms, result.n_tokens, result.decode_tokens_per_s, result.n_prompt_positions,
                     peak_after_vision, rss_after_vision, peak_rss_kb(), o.kv_type == QWENVL_KV_Q8_0 ? "q8_0" : "f16",
                     o.mmap ? "true" : "false", o.ctx);
    }
    qwenvl_close(session);
    return 0;
}

std::string one_line(std::string s) {
    for (char& c : s) {
        if (c == '\n' || c == '\r') c = ' ';
    }
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 2 && (std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "--help") == 0)) {
        std::fputs(kUsage, stdout);
        return 0;
    }
    try {
        return run(parse_args(argc, argv));
    } catch (const UsageError& e) {
        std::fprintf(stderr, "qwenvl-native: error: %s (see qwenvl-native --help)\n", one_line(e.what()).c_str());
        return 2;
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "qwenvl-native: error: out of memory\n");
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "qwenvl-native: error: %s\n", one_line(e.what()).c_str());
        return 1;
    }
}
