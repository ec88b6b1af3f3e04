// qwenvl_native.cpp - `qwenvl-native run BUNDLE [IMAGE...] QUESTION`: the whole pipeline without Python.
//
// image file -> upright RGB (image_file.cpp) -> pixels (qwenvl_preprocess_image, Pillow-exact) ->
// image rows (qwenvl_vision_*, ONNX Runtime's C API on the bundle's vision graph) -> the vision session
// is freed -> decoder (qwenvl_generate on the bundle's GGUF) -> the answer streamed to stdout. As
// `qwenvl-edge run` does, the decoder (qwenvl_open) loads on a thread of its own while the images encode
// when the memory holds both, and the GGUF is mapped as it is (`--load read`: read and repacked;
// `--overlap off`: the phone order, the vision session freed before the decoder loads).
// Only the answer goes to stdout; an error is one line on stderr and a non-zero exit.
#include <sys/resource.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <link.h>
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
#include <thread>
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
    "                         [--seed N] [--threads N] [--ctx N] [--kv f16|q8_0] [--load map|read]\n"
    "                         [--overlap auto|on|off] [--stats] [-v] [--rows-out FILE] [--vision-only]\n"
    "\n"
    "Answers QUESTION about the images with the bundle (a folder written by `qwenvl-edge export`), all in\n"
    "native code: image -> vision.onnx (ONNX Runtime) -> llm.gguf (llama.cpp). The answer is streamed to stdout.\n"
    "\n"
    "  --greedy          argmax decoding (temperature 0), as the golden tests run\n"
    "  --max-tokens N    most tokens to generate (default: the bundle's max_new_tokens)\n"
    "  --temperature T   sampling temperature (default 1.0; top_p from the bundle)\n"
    "  --seed N          sampling seed (default 0)\n"
    "  --threads N       CPU threads for vision and decoder (default: the cores this process may use)\n"
    "  --ctx N           context positions (default 2048)\n"
    "  --kv f16|q8_0     KV cache type (default f16; q8_0 halves its memory, the phone setting)\n"
    "  --load map|read   map: map the GGUF and use it as it is (the default, as `qwenvl-edge run`: starts in\n"
    "                    seconds, the weights stay file pages the OS can drop under memory pressure);\n"
    "                    read: read it and let llama.cpp repack it for the CPU (decodes faster, loads slower)\n"
    "  --mmap            the same as --load map\n"
    "  --overlap auto|on|off  load the decoder while the images encode (auto, the default: when the memory\n"
    "                    available holds both, or as QWENVL_EDGE_OVERLAP=0/1 says); off: free the vision\n"
    "                    session first (the phone order)\n"
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
    bool mmap = true;  // --load map (the default) or read
    enum class Overlap { Auto, On, Off } overlap = Overlap::Auto;
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
        } else if (a == "--load") {
            const std::string l = value();
            if (l == "map") o.mmap = true;
            else if (l == "read") o.mmap = false;
            else throw UsageError("--load " + l + ": expected map or read");
        } else if (a == "--overlap") {
            const std::string v = value();
            if (v == "auto") o.overlap = Options::Overlap::Auto;
            else if (v == "on") o.overlap = Options::Overlap::On;
            else if (v == "off") o.overlap = Options::Overlap::Off;
            else throw UsageError("--overlap " + v + ": expected auto, on or off");
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
    double vision_bytes = 0;  // the vision graph and its external data (vision.onnx*)
    double llm_bytes = 0;
    double hidden_size = 4096;
    double n_layers = 32;  // source.config.num_hidden_layers
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
    b.llm_bytes = static_cast<double>(file_size(b.llm_path));
    const std::string vision_name = b.vision_path.substr(folder.size() + 1);
    for (const auto& [name, entry] : files->object) {
        const JsonValue* bytes = entry.get("bytes");
        if (name.rfind(vision_name, 0) == 0 && bytes && bytes->kind == JsonValue::Kind::Number) b.vision_bytes += bytes->number;
    }
    if (model->get("hidden_size")) b.hidden_size = number("hidden_size", 1, 1 << 20);
    const JsonValue* source = m.get("source");
    const JsonValue* config = source ? source->get("config") : nullptr;
    const JsonValue* layers = config ? config->get("num_hidden_layers") : nullptr;
    if (layers && layers->kind == JsonValue::Kind::Number && layers->number >= 1) b.n_layers = layers->number;
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

// --- loading the decoder while the images encode ---------------------------------------------------------

// MemAvailable from /proc/meminfo in bytes; -1 where it is not known.
double available_bytes() {
    std::ifstream meminfo("/proc/meminfo");
    std::string key, unit;
    double kb = 0;
    while (meminfo >> key >> kb) {
        if (key == "MemAvailable:") return kb * 1024;
        std::getline(meminfo, unit);
    }
    return -1;
}

// Whether the decoder may load while the images encode, the two resident at once. --overlap on/off, else
// QWENVL_EDGE_OVERLAP=0/1, else the Python runtime's rule (runtime/memory.py): the memory available now must hold
// the GGUF, 2.5 x the vision files (ONNX Runtime keeps prepacked copies), the KV cache and 1 GiB to spare.
bool overlap_fits(const Options& o, const BundleFacts& b) {
    if (o.overlap != Options::Overlap::Auto) return o.overlap == Options::Overlap::On;
    const char* forced = std::getenv("QWENVL_EDGE_OVERLAP");
    if (forced != nullptr && (std::strcmp(forced, "0") == 0 || std::strcmp(forced, "1") == 0)) return forced[0] == '1';
    const double kv_bytes_per_value = o.kv_type == QWENVL_KV_Q8_0 ? 1.0625 : 2.0;
    const double kv = 2 * b.n_layers * b.hidden_size * kv_bytes_per_value * o.ctx;
    const double need = b.llm_bytes + 2.5 * b.vision_bytes + kv + 1073741824.0;
    const double have = available_bytes();
    return have > need;
}

// qwenvl_open, on a thread of its own or on the caller's. Its error message is thread-local, so the loading
// thread keeps a copy; a session nobody collected is closed (after the load ends) by the destructor.
class DecoderLoad {
public:
    DecoderLoad(std::string path, const qwenvl_open_params& params) : path_(std::move(path)), params_(params) {}
    DecoderLoad(const DecoderLoad&) = delete;
    DecoderLoad& operator=(const DecoderLoad&) = delete;
    ~DecoderLoad() {
        if (thread_.joinable()) thread_.join();
        if (session_ != nullptr) qwenvl_close(session_);
    }

    void start() { thread_ = std::thread([this] { load(); }); }

    // The session (loaded here unless start() ran); throws the load's error.
    qwenvl_session* take() {
        if (thread_.joinable()) thread_.join();
        else if (session_ == nullptr && error_.empty()) load();
        if (session_ == nullptr) throw std::runtime_error("decoder: " + error_);
        qwenvl_session* s = session_;
        session_ = nullptr;
        return s;
    }

    double load_ms() const { return load_ms_; }

private:
    void load() {
        const auto t0 = Clock::now();
        if (qwenvl_open(path_.c_str(), &params_, &session_) != QWENVL_OK) {
            error_ = qwenvl_last_error();
            session_ = nullptr;
        }
        load_ms_ = ms_since(t0);
    }

    std::string path_;
    qwenvl_open_params params_;
    std::thread thread_;
    qwenvl_session* session_ = nullptr;
    std::string error_;
    double load_ms_ = 0;
};

// The decoder's thread count for --threads 0: the core's own rule (the cores this process may run on).
int resolved_threads(int threads) { return threads > 0 ? threads : qwenvl_default_threads(); }

// --- OpenMP's spinning ----------------------------------------------------------------------------------
//
// llama.cpp's CPU threads are OpenMP's (libgomp) in the llama-cpp-python build the host links, and every ggml
// barrier busy-waits GOMP_SPINCOUNT rounds of `pause` (300000 by default: 3 ms by libgomp's estimate, several
// more on CPUs with a slow `pause`) before the thread sleeps. When a third process wants a core, the waiting
// thread burns its core while the thread it waits for is not running, every barrier, hundreds per token: two
// threads beside one busy process decoded at 0.51 tok/s. A short spin keeps the idle speed (the threads of one
// graph meet within microseconds) and gives the core away under contention. libgomp reads it once, when it is
// loaded, before main runs, so the command sets it and starts itself again; a user's GOMP_SPINCOUNT or
// OMP_WAIT_POLICY wins, and without libgomp (other OpenMP runtimes, ggml's own threads) nothing changes.

constexpr const char* kOmpSpinCount = "10000";  // 0.1 ms by libgomp's estimate

bool libgomp_loaded() {
#if defined(__GLIBC__)
    return dl_iterate_phdr(
               [](dl_phdr_info* info, size_t, void*) {
                   return info->dlpi_name != nullptr && std::strstr(info->dlpi_name, "libgomp") != nullptr ? 1 : 0;
               },
               nullptr) != 0;
#else
    return false;
#endif
}

// What governs the spinning: "GOMP_SPINCOUNT=N", "OMP_WAIT_POLICY=..", "libgomp default" or "no libgomp".
std::string omp_spin_setting() {
    if (const char* spin = std::getenv("GOMP_SPINCOUNT")) return std::string("GOMP_SPINCOUNT=") + spin;
    if (const char* policy = std::getenv("OMP_WAIT_POLICY")) return std::string("OMP_WAIT_POLICY=") + policy;
    return libgomp_loaded() ? "libgomp default" : "no libgomp";
}

// Sets GOMP_SPINCOUNT and re-executes this program, once; returns when nothing needs doing or exec failed.
void bound_omp_spinning(char** argv) {
#if defined(__linux__)
    if (std::getenv("GOMP_SPINCOUNT") != nullptr || std::getenv("OMP_WAIT_POLICY") != nullptr || !libgomp_loaded()) return;
    if (setenv("GOMP_SPINCOUNT", kOmpSpinCount, 1) != 0) return;
    execv("/proc/self/exe", argv);
    unsetenv("GOMP_SPINCOUNT");  // exec failed: go on with libgomp's own setting, and say so in --stats
#else
    (void)argv;
#endif
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
// `decoder`, when given, starts loading once the files are read (a bad image fails before any load).
std::vector<std::vector<float>> encode_images(const Options& o, const BundleFacts& b, int32_t* n_rows, int32_t* n_embd,
                                              double* load_ms, double* encode_ms, DecoderLoad* decoder) {
    std::vector<qwenvl::tool::RgbImage> pictures;
    for (const std::string& path : o.images) {
        try {
            pictures.push_back(qwenvl::tool::read_image_file(path, b.image_size));
        } catch (const std::runtime_error& e) {
            throw std::runtime_error(path + ": " + e.what());
        }
    }
    if (decoder != nullptr) decoder->start();
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
    qwenvl_open_params params = qwenvl_open_default_params();
    params.n_ctx = o.ctx;
    params.n_threads = resolved_threads(o.threads);  // the vision step keeps 0: ONNX Runtime's default, as in Python
    params.kv_type = o.kv_type;
    params.use_mmap = o.mmap ? 1 : 0;
    DecoderLoad decoder(b.llm_path, params);
    const bool overlap = !o.images.empty() && !o.vision_only && overlap_fits(o, b);
    int32_t n_rows = 0, n_embd = 0;
    double vision_load_ms = 0, vision_ms = 0;
    std::vector<std::vector<float>> rows;
    if (!o.images.empty()) {
        rows = encode_images(o, b, &n_rows, &n_embd, &vision_load_ms, &vision_ms, overlap ? &decoder : nullptr);
    }
    const long peak_after_vision = peak_rss_kb();
    const long rss_after_vision = rss_now_kb();
    if (!o.rows_out.empty()) write_rows(o.rows_out, rows);
    if (o.vision_only) {
        if (o.stats) std::fprintf(stderr, "{\"peak_rss_vision_kb\": %ld, \"rss_after_vision_kb\": %ld}\n", peak_after_vision, rss_after_vision);
        return 0;
    }

    const auto t_wait = Clock::now();
    qwenvl_session* session = decoder.take();
    const double wait_ms = ms_since(t_wait);  // with overlap: what the load added after the images
    const double load_ms = decoder.load_ms();

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
                     "\"rss_after_vision_kb\": %ld, \"peak_rss_kb\": %ld, \"kv\": \"%s\", \"mmap\": %s, \"n_ctx\": %d, "
                     "\"load\": \"%s\", \"overlap\": %s, \"decoder_wait_ms\": %.1f, \"n_threads\": %d, \"omp_spin\": \"%s\"}\n",
                     rows.size(), vision_load_ms, vision_ms, load_ms, result.prefill_ms, stream.first_token_ms,
                     result.decode_ms, result.n_tokens, result.decode_tokens_per_s, result.n_prompt_positions,
                     peak_after_vision, rss_after_vision, peak_rss_kb(), o.kv_type == QWENVL_KV_Q8_0 ? "q8_0" : "f16",
                     o.mmap ? "true" : "false", o.ctx, o.mmap ? "map" : "read", overlap ? "true" : "false", wait_ms,
                     params.n_threads, omp_spin_setting().c_str());
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
        const Options options = parse_args(argc, argv);
        bound_omp_spinning(argv);
        return run(options);
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
