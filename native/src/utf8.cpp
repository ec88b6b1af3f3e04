// utf8.cpp - see utf8.h.
#include "utf8.h"

#include <cstddef>
#include <cstdint>

namespace qwenvl {
namespace {

constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// The well-formed byte sequences of UTF-8 (Unicode table 3-7), by lead byte: the sequence length
// and the allowed range of the second byte; later bytes are always 0x80..0xBF.
struct LeadInfo {
    int length;  // 0: the byte cannot start a character
    unsigned char second_lo, second_hi;
};

LeadInfo lead_info(unsigned char b) {
    if (b < 0x80) return {1, 0, 0};
    if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
    if (b == 0xE0) return {3, 0xA0, 0xBF};
    if (b == 0xED) return {3, 0x80, 0x9F};
    if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
    if (b == 0xF0) return {4, 0x90, 0xBF};
    if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
    if (b == 0xF4) return {4, 0x80, 0x8F};
    return {0, 0, 0};
}

enum class Scan { kComplete, kInvalid, kTruncated };

// Looks at the sequence starting at s[i]; `used` gets the bytes it covers (the maximal valid
// prefix when it is invalid or truncated).
Scan scan(const unsigned char* s, size_t n, size_t i, size_t& used) {
    const LeadInfo info = lead_info(s[i]);
    used = 1;
    if (info.length == 0) return Scan::kInvalid;
    for (int k = 1; k < info.length; ++k) {
        if (i + k >= n) return Scan::kTruncated;
        const unsigned char lo = k == 1 ? info.second_lo : 0x80;
        const unsigned char hi = k == 1 ? info.second_hi : 0xBF;
        if (s[i + k] < lo || s[i + k] > hi) return Scan::kInvalid;
        used = static_cast<size_t>(k) + 1;
    }
    return Scan::kComplete;
}

}  // namespace

bool is_valid_utf8(std::string_view text) {
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    size_t i = 0;
    while (i < text.size()) {
        size_t used = 0;
        if (scan(s, text.size(), i, used) != Scan::kComplete) return false;
        i += used;
    }
    return true;
}

std::string Utf8Stream::push(std::string_view bytes) {
    held_.append(bytes.data(), bytes.size());
    const auto* s = reinterpret_cast<const unsigned char*>(held_.data());
    const size_t n = held_.size();
    std::string out;
    size_t i = 0;
    while (i < n) {
        size_t used = 0;
        const Scan result = scan(s, n, i, used);
        if (result == Scan::kTruncated) break;  // wait for the next token's bytes
        if (result == Scan::kComplete) {
            out.append(held_, i, used);
        } else {
            out += kReplacement;
        }
        i += used;
    }
    held_.erase(0, i);
    return out;
}

std::string Utf8Stream::flush() {
    const bool truncated = !held_.empty();
    held_.clear();
    return truncated ? kReplacement : "";
}

}  // namespace qwenvl
