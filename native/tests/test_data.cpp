// test_data.cpp - see test_data.h.
#include "test_data.h"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace qwenvl_test {
namespace {

std::string from_hex(const std::string& hex) {
    std::string out;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) {
        out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    }
    return out;
}

std::vector<int32_t> read_ints(std::istringstream& in) {
    std::vector<int32_t> out;
    int32_t v = 0;
    while (in >> v) out.push_back(v);
    return out;
}

}  // namespace

bool TestData::load(std::string& error) {
    const char* env = std::getenv("QWENVL_TEST_DATA");
    if (env == nullptr || *env == '\0') {
        error = "QWENVL_TEST_DATA is not set (tests/test_native_core.py writes it)";
        return false;
    }
    dir = env;
    std::ifstream file(dir + "/cases.txt");
    if (!file) {
        error = dir + "/cases.txt: cannot open";
        return false;
    }
    std::string line;
    GoldenCase* current = nullptr;
    while (std::getline(file, line)) {
        std::istringstream in(line);
        std::string key;
        if (!(in >> key)) continue;
        std::string value;
        if (key == "gguf") {
            std::getline(in >> std::ws, gguf);
        } else if (key == "n_embd") {
            in >> n_embd;
        } else if (key == "image_size") {
            in >> image_size;
        } else if (key == "max_new_tokens") {
            in >> max_new_tokens;
        } else if (key == "rgb") {
            RgbImage im;
            in >> im.name >> im.width >> im.height;
            rgb_images.push_back(im);
        } else if (key == "image_mean" || key == "image_std" || key == "other_image_mean" || key == "other_image_std" ||
                   key == "rgba") {
            // for the Java smoke test; the C++ tests take them from the GGUF (qwenvl_get_info)
        } else if (key == "fixture_turn") {
            FixtureTurn turn;
            std::string question, answer;
            in >> turn.n_images >> question >> answer;
            turn.question = from_hex(question);
            turn.answer = from_hex(answer == "-" ? "" : answer);
            fixture_turns.push_back(turn);
        } else if (key == "fixture_question") {
            in >> fixture_question_images >> value;
            fixture_question = from_hex(value);
        } else if (key == "fixture_ids") {
            fixture_ids = read_ints(in);
        } else if (key == "case") {
            cases.emplace_back();
            current = &cases.back();
            in >> current->name;
        } else if (current == nullptr) {
            error = "cases.txt: '" + key + "' before any 'case' line";
            return false;
        } else if (key == "images") {
            while (in >> value) current->images.push_back(value);
        } else if (key == "text") {
            in >> value;
            current->text = from_hex(value);
        } else if (key == "input_ids") {
            current->input_ids = read_ints(in);
        } else if (key == "generated_ids") {
            current->generated_ids = read_ints(in);
        } else if (key == "generated_text") {
            in >> value;
            current->generated_text = from_hex(value);
        } else if (key == "check_generation") {
            int v = 0;
            in >> v;
            current->check_generation = v != 0;
        } else if (key == "end") {
            current = nullptr;
        }
    }
    if (gguf.empty() || n_embd <= 0 || cases.empty()) {
        error = dir + "/cases.txt: needs gguf, n_embd and at least one case";
        return false;
    }
    return true;
}

const GoldenCase& TestData::find_case(const std::string& name) const {
    for (const GoldenCase& c : cases) {
        if (c.name == name) return c;
    }
    throw std::runtime_error("no golden case " + name);
}

std::vector<unsigned char> TestData::read_bytes(const std::string& file) const {
    std::ifstream in(dir + "/" + file, std::ios::binary);
    if (!in) throw std::runtime_error(dir + "/" + file + ": cannot open");
    return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::vector<float> TestData::read_floats(const std::string& file) const {
    const std::vector<unsigned char> bytes = read_bytes(file);
    std::vector<float> out(bytes.size() / sizeof(float));
    std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
    return out;
}

const std::vector<float>& TestData::rows(const std::string& image) {
    auto it = rows_cache_.find(image);
    if (it == rows_cache_.end()) it = rows_cache_.emplace(image, read_floats(image + ".f32")).first;
    return it->second;
}

}  // namespace qwenvl_test
