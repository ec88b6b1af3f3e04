// utf8.h - UTF-8 checks for user text, and the incremental decoding of token bytes.
#pragma once

#include <string>
#include <string_view>

namespace qwenvl {

// True when `text` is well-formed UTF-8 (no overlong forms, surrogates or code points > U+10FFFF).
bool is_valid_utf8(std::string_view text);

// Token pieces are byte strings: one character may be split over two tokens, and a model can
// write bytes that form no character. This turns the bytes into valid UTF-8 text the way
// Python's incremental decoder with errors="replace" does (as the Python runtime streams): the
// bytes of an unfinished character are held back until it completes, and each maximal invalid
// sequence becomes one U+FFFD.
class Utf8Stream {
public:
    // Append a token's bytes; returns the text that is now complete (possibly empty).
    std::string push(std::string_view bytes);
    // The end of the stream: U+FFFD if an unfinished character is held back, else "".
    std::string flush();

private:
    std::string held_;
};

}  // namespace qwenvl
