// test_data.h - the golden data that tests/test_native_core.py writes for the native tests.
//
// QWENVL_TEST_DATA names a folder with:
//   cases.txt         "key value..." lines: gguf PATH, n_embd N, image_size S, rgb NAME W H, then per
//                     golden case: case NAME / images A B / text HEX / input_ids ... / generated_ids ...
//                     / generated_text HEX / check_generation 0|1 / end; the prompt fixture as
//                     fixture_turn N_IMAGES QUESTION_HEX ANSWER_HEX / fixture_question N_IMAGES HEX /
//                     fixture_ids ...
//   NAME.f32          the golden vision rows of image NAME, float32 [256, n_embd]
//   NAME.rgb          image NAME decoded to uint8 RGB [H, W, 3] (for preprocessing)
//   NAME.pixels.f32   the golden preprocessed pixels, float32 [3, S, S]
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qwenvl_test {

struct GoldenCase {
    std::string name;
    std::vector<std::string> images;
    std::string text;                    // the user's question, UTF-8
    std::vector<int32_t> input_ids;      // -1 at image-row positions
    std::vector<int32_t> generated_ids;  // greedy, at most max_new_tokens
    std::string generated_text;
    bool check_generation = false;       // whether the greedy ids are expected to match
};

struct RgbImage {
    std::string name;
    int width = 0;
    int height = 0;
};

// One earlier turn of the shared multi-turn prompt fixture (tests/data/multi_turn_prompt.json).
struct FixtureTurn {
    std::string question;
    int32_t n_images = 0;
    std::string answer;
};

struct TestData {
    std::string dir;
    std::string gguf;
    int32_t n_embd = 0;
    int32_t image_size = 0;
    int32_t max_new_tokens = 24;
    std::vector<RgbImage> rgb_images;
    std::vector<GoldenCase> cases;
    // the shared multi-turn prompt fixture: earlier turns, the question, its image count, the ids
    std::vector<FixtureTurn> fixture_turns;
    std::string fixture_question;
    int32_t fixture_question_images = 0;
    std::vector<int32_t> fixture_ids;

    // Reads QWENVL_TEST_DATA; false (and `error`) when it is unset or unreadable.
    bool load(std::string& error);

    const GoldenCase& find_case(const std::string& name) const;

    // <dir>/<name><suffix> as raw bytes / float32 values (throws std::runtime_error when missing).
    std::vector<unsigned char> read_bytes(const std::string& file) const;
    std::vector<float> read_floats(const std::string& file) const;

    // The golden vision rows of an image, cached.
    const std::vector<float>& rows(const std::string& image);

private:
    std::map<std::string, std::vector<float>> rows_cache_;
};

}  // namespace qwenvl_test
