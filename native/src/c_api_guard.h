// c_api_guard.h - how every C entry point of the core runs its body: no C++ exception crosses into C
// (or JNI); a failure becomes a qwenvl_status and a one-line message in a thread-local slot.
#pragma once

#include <new>
#include <string>

#include "error.h"
#include "qwenvl_core.h"

namespace qwenvl {

// The message qwenvl_last_error() returns (this thread's last failed call).
inline std::string& last_error_slot() {
    static thread_local std::string message;
    return message;
}

template <class Body>
int guarded(Body&& body) {
    std::string& last_error = last_error_slot();
    try {
        body();
        last_error.clear();
        return QWENVL_OK;
    } catch (const Error& e) {
        last_error = e.what();
        return e.status();
    } catch (const std::bad_alloc&) {
        last_error = "out of memory";
        return QWENVL_ERR_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        last_error = std::string("internal error: ") + e.what();
        return QWENVL_ERR_INTERNAL;
    } catch (...) {
        last_error = "internal error: unknown exception";
        return QWENVL_ERR_INTERNAL;
    }
}

inline void require(bool ok, const char* what) {
    if (!ok) fail(QWENVL_ERR_INVALID_ARGUMENT, what);
}

}  // namespace qwenvl
