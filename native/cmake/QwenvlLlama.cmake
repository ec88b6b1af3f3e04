# Provides the target qwenvl::llama: the llama.cpp library the native core links.
#
# Two ways, chosen by LLAMA_CPP_DIR:
#   - LLAMA_CPP_DIR set (the Android and ARM64 builds): a llama.cpp source folder, built here with
#     add_subdirectory; use a checkout of the version llama-cpp-python pins (see native/README.md).
#     QWENVL_CPU_VARIANTS=ON builds its CPU kernels as run-time selected variants
#     (native/cmake/QwenvlCpuVariants.cmake).
#   - LLAMA_CPP_DIR empty (a host build): the libllama shipped inside the llama-cpp-python wheel of
#     this Python, so the native core runs exactly the llama.cpp the Python runtime runs. The wheel
#     has no headers: they come from the same version's sdist, fetched once into a cache folder by
#     native/get_llama_cpp_source.py (or pass QWENVL_LLAMA_INCLUDE_DIRS yourself).
# Every failure stops CMake with one line that says what to set.

set(LLAMA_CPP_DIR "" CACHE PATH "llama.cpp source folder to build from (empty: link llama-cpp-python's libllama)")
set(QWENVL_LLAMA_INCLUDE_DIRS "" CACHE STRING "llama.h and ggml.h folders (empty: fetched from the sdist)")
set(QWENVL_LLAMA_CACHE "" CACHE PATH "where fetched llama.cpp headers are kept (empty: ~/.cache/qwenvl-edge)")
option(QWENVL_CPU_VARIANTS "with LLAMA_CPP_DIR: llama.cpp's CPU kernels as variants chosen at run time" OFF)

function(qwenvl_fail what)
  message(FATAL_ERROR "${what}")
endfunction()

if(LLAMA_CPP_DIR)
  if(NOT EXISTS "${LLAMA_CPP_DIR}/include/llama.h" OR NOT EXISTS "${LLAMA_CPP_DIR}/CMakeLists.txt")
    qwenvl_fail("LLAMA_CPP_DIR=${LLAMA_CPP_DIR} is not a llama.cpp source folder (no include/llama.h): set -DLLAMA_CPP_DIR to a llama.cpp checkout")
  endif()
  set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)
  set(LLAMA_BUILD_TESTS OFF CACHE BOOL "" FORCE)
  set(LLAMA_BUILD_TOOLS OFF CACHE BOOL "" FORCE)
  set(LLAMA_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
  set(LLAMA_BUILD_SERVER OFF CACHE BOOL "" FORCE)
  set(LLAMA_CURL OFF CACHE BOOL "" FORCE)
  if(QWENVL_CPU_VARIANTS)
    include("${CMAKE_CURRENT_LIST_DIR}/QwenvlCpuVariants.cmake")
  endif()
  add_subdirectory("${LLAMA_CPP_DIR}" "${CMAKE_BINARY_DIR}/llama.cpp" EXCLUDE_FROM_ALL)
  # their headers are system headers for our code: our warnings are not theirs
  foreach(_target llama ggml ggml-base)
    if(TARGET ${_target})
      get_target_property(_incs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
      if(_incs)
        set_property(TARGET ${_target} APPEND PROPERTY INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${_incs}")
      endif()
    endif()
  endforeach()
  add_library(qwenvl::llama ALIAS llama)
  set(QWENVL_LLAMA_ORIGIN "source ${LLAMA_CPP_DIR}")
  if(QWENVL_CPU_VARIANTS)
    get_property(_variants GLOBAL PROPERTY QWENVL_CPU_VARIANTS)
    string(REPLACE ";" ", " _variants "${_variants}")
    string(APPEND QWENVL_LLAMA_ORIGIN ", CPU variants: ${_variants}")
  endif()
  return()
endif()

find_package(Python3 COMPONENTS Interpreter)
if(NOT Python3_Interpreter_FOUND)
  qwenvl_fail("no Python found for llama-cpp-python: set -DPython3_EXECUTABLE=... or -DLLAMA_CPP_DIR=/path/to/llama.cpp")
endif()

# Version and lib folder of the installed wheel, without loading the shared library.
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
    "import importlib.metadata as m, importlib.util as u, os; s = u.find_spec('llama_cpp'); print(m.version('llama-cpp-python')); print(os.path.join(os.path.dirname(s.origin), 'lib'))"
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _rc EQUAL 0)
  qwenvl_fail("llama-cpp-python is not installed for ${Python3_EXECUTABLE}: pip install llama-cpp-python==0.3.36, or set -DLLAMA_CPP_DIR=/path/to/llama.cpp")
endif()
string(REPLACE "\n" ";" _out "${_out}")
list(GET _out 0 QWENVL_LLAMA_CPP_PYTHON_VERSION)
list(GET _out 1 _libdir)
find_library(QWENVL_LLAMA_LIBRARY NAMES llama PATHS "${_libdir}" NO_DEFAULT_PATH NO_CACHE)
if(NOT QWENVL_LLAMA_LIBRARY)
  qwenvl_fail("llama-cpp-python ${QWENVL_LLAMA_CPP_PYTHON_VERSION} has no libllama in ${_libdir}: reinstall it, or set -DLLAMA_CPP_DIR=/path/to/llama.cpp")
endif()

set(_incs "${QWENVL_LLAMA_INCLUDE_DIRS}")
# A wheel built from the sdist (pip's local build) installs the headers of that very build next to
# the package (site-packages/include): use them when they are there, no download needed.
get_filename_component(_wheel_include "${_libdir}/../../include" ABSOLUTE)
if(NOT _incs AND EXISTS "${_wheel_include}/llama.h" AND EXISTS "${_wheel_include}/ggml.h")
  set(_incs "${_wheel_include}")
endif()
if(_incs)
  list(GET _incs 0 _first)
  if(NOT EXISTS "${_first}/llama.h")
    qwenvl_fail("QWENVL_LLAMA_INCLUDE_DIRS=${_incs} has no llama.h: set it to the include and ggml/include folders of llama.cpp")
  endif()
else()
  set(_cache_arg "")
  if(QWENVL_LLAMA_CACHE)
    set(_cache_arg --cache "${QWENVL_LLAMA_CACHE}")
  endif()
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/../get_llama_cpp_source.py"
            --version "${QWENVL_LLAMA_CPP_PYTHON_VERSION}" ${_cache_arg}
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _incs ERROR_VARIABLE _err OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    string(STRIP "${_err}" _err)
    string(REGEX REPLACE ".*\n" "" _err "${_err}")
    qwenvl_fail("no llama.cpp headers for llama-cpp-python ${QWENVL_LLAMA_CPP_PYTHON_VERSION} (${_err}): set -DQWENVL_LLAMA_INCLUDE_DIRS=<llama.cpp>/include;<llama.cpp>/ggml/include or -DLLAMA_CPP_DIR=/path/to/llama.cpp")
  endif()
  string(REPLACE "\n" ";" _incs "${_incs}")
endif()

add_library(qwenvl::llama SHARED IMPORTED GLOBAL)
set_target_properties(qwenvl::llama PROPERTIES
  IMPORTED_LOCATION "${QWENVL_LLAMA_LIBRARY}"
  INTERFACE_INCLUDE_DIRECTORIES "${_incs}")
set(QWENVL_LLAMA_LIBRARY_DIR "${_libdir}")
set(QWENVL_LLAMA_ORIGIN "llama-cpp-python ${QWENVL_LLAMA_CPP_PYTHON_VERSION} (${QWENVL_LLAMA_LIBRARY})")
