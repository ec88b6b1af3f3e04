# ONNX Runtime for the vision step (optional): provides the target qwenvl::onnxruntime and sets
# QWENVL_HAVE_ORT when a library is found.
#
#   QWENVL_ORT_LIBRARY  the libonnxruntime shared library (ONNX Runtime >= 1.32.0: the core calls C API
#                       version 32). Empty (default): the one inside this Python's onnxruntime package
#                       (onnxruntime/capi/libonnxruntime.so.1.32.0), looked up on host builds only; a
#                       cross build (aarch64, Android) names its target's library here. OFF: no vision step.
# ONNX Runtime ships no C header we can install, so the core declares the few entries it calls itself
# (native/src/ort_api.h) and links only the library. The wheel's file is named libonnxruntime.so.1.32.0
# but its SONAME is libonnxruntime.so.1: a link of that name is made in the build folder, and the build
# RPATH points there, so the test binaries run in place.

set(QWENVL_ORT_LIBRARY "" CACHE STRING "libonnxruntime shared library for the vision step (empty: the onnxruntime Python package's; OFF: none)")
set(QWENVL_HAVE_ORT OFF)
set(_ort "${QWENVL_ORT_LIBRARY}")
string(TOUPPER "${_ort}" _ort_upper)
if(_ort_upper STREQUAL "OFF")
  set(_ort "")
  message(STATUS "qwenvl: QWENVL_ORT_LIBRARY=OFF: vision step disabled")
elseif(NOT _ort AND NOT CMAKE_CROSSCOMPILING AND NOT ANDROID)
  if(NOT Python3_EXECUTABLE)
    find_package(Python3 COMPONENTS Interpreter QUIET)
  endif()
  if(Python3_EXECUTABLE)
    # the package's folder without importing it (importing loads the library and its telemetry)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
        "import importlib.util as u; s = u.find_spec('onnxruntime'); print(list(s.submodule_search_locations)[0])"
      RESULT_VARIABLE _rc OUTPUT_VARIABLE _ort_pkg ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_rc EQUAL 0 AND _ort_pkg)
      file(GLOB _ort_candidates "${_ort_pkg}/capi/libonnxruntime.so*" "${_ort_pkg}/capi/libonnxruntime*.dylib")
      list(FILTER _ort_candidates EXCLUDE REGEX "providers")
      if(_ort_candidates)
        list(SORT _ort_candidates)
        list(GET _ort_candidates 0 _ort)
      endif()
    endif()
  endif()
endif()

if(_ort)
  if(NOT EXISTS "${_ort}")
    message(FATAL_ERROR "QWENVL_ORT_LIBRARY=${_ort} does not exist: point it at libonnxruntime.so (ONNX Runtime 1.32.0), or set it to OFF")
  endif()
  get_filename_component(_ort_real "${_ort}" REALPATH)
  get_filename_component(_ort_name "${_ort_real}" NAME)
  # the SONAME ONNX Runtime gives its library: libonnxruntime.so.<major>
  string(REGEX REPLACE "^(libonnxruntime\\.so\\.[0-9]+)\\..*$" "\\1" _ort_soname "${_ort_name}")
  set(_ort_dir "${CMAKE_BINARY_DIR}/onnxruntime")
  file(MAKE_DIRECTORY "${_ort_dir}")
  file(CREATE_LINK "${_ort_real}" "${_ort_dir}/${_ort_soname}" SYMBOLIC)
  add_library(qwenvl::onnxruntime SHARED IMPORTED GLOBAL)
  set_target_properties(qwenvl::onnxruntime PROPERTIES IMPORTED_LOCATION "${_ort_dir}/${_ort_soname}")
  set(QWENVL_HAVE_ORT ON)
  set(QWENVL_ORT_FILE "${_ort_real}")
  message(STATUS "qwenvl: ONNX Runtime from ${_ort_real} (vision step on)")
elseif(NOT _ort_upper STREQUAL "OFF")
  message(STATUS "qwenvl: no ONNX Runtime library: vision step disabled (the onnxruntime Python package was not "
                 "found; set -DQWENVL_ORT_LIBRARY=/path/to/libonnxruntime.so to enable it)")
endif()
