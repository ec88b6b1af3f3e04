// json_value.h - a small JSON reader for manifest.json (objects, arrays, strings, numbers, literals).
//
// The native command reads only a few fields of the bundle manifest; this is enough JSON for that,
// strict (RFC 8259 syntax, a depth limit, no trailing garbage) so a broken manifest is one clear error.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace qwenvl::tool {

struct JsonValue {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    double number = 0;
    std::string string;
    std::vector<JsonValue> array;
    std::map<std::string, JsonValue> object;

    // The member `key` of an object, or nullptr (also when this is not an object).
    const JsonValue* get(const std::string& key) const;
};

// Parses `text`; throws std::runtime_error("... at byte N") on bad JSON.
JsonValue parse_json(const std::string& text);

}  // namespace qwenvl::tool
