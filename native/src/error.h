// error.h - the one exception type inside the native core; the C API turns it into a status code.
#pragma once

#include <stdexcept>
#include <string>

#include "qwenvl_core.h"

namespace qwenvl {

// A failure with its qwenvl_status and a one-line message naming the offending value.
class Error : public std::runtime_error {
public:
    Error(qwenvl_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    qwenvl_status status() const { return status_; }

private:
    qwenvl_status status_;
};

[[noreturn]] inline void fail(qwenvl_status status, const std::string& message) { throw Error(status, message); }

}  // namespace qwenvl
