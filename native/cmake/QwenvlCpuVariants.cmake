# llama.cpp's CPU backend as run-time selected variants (QWENVL_CPU_VARIANTS=ON, ARM64 builds).
#
# Why: a phone's CPU is not known at build time. Dot-product (armv8.2) and i8mm (armv8.6) kernels,
# and the ARM repacked Q4_0 layouts that use them (q4_0_4x4 with dot-product, q4_0_4x8 with i8mm),
# are compiled only when the compiler targets those features. With GGML_BACKEND_DL +
# GGML_CPU_ALL_VARIANTS llama.cpp builds one libggml-cpu-<variant>.so per feature level and, at
# llama_backend_init(), loads the best one the running CPU supports (its own check,
# ggml-cpu/arch/arm/cpu-feats.cpp), searched for next to the executable.
#
# Which variants: QWENVL_CPU_VARIANT_SET, entries "tag" or "tag:FEATURE,FEATURE" (ggml's feature names).
# The default is three phone levels: armv8-a (any ARM64), armv8.2-a+dotprod (Cortex-A55/A76/A78
# class) and armv8.6-a+dotprod+i8mm (Cortex-A710/X2 and later). Left out on purpose:
# - FP16 vector arithmetic (+fp16, in all of llama.cpp's dot-product variants): with it ggml sums F16
#   dot products (the F16 KV cache's attention scores) in half precision, where x86-64 sums in float;
#   on the tiny golden model that flips greedy tokens (one_image, grounding) on ARM64 only. Without it
#   ARM64 answers golden-exact like x86-64 (checked under qemu; the armv8.0 variant passes too).
# - SVE: phones run it at 128 bits, where ggml's SVE paths gain nothing over NEON; the repacked
#   q4_0_8x8 layout needs 256-bit SVE (server cores).
# - SME (armv9.2): needs GCC >= 14; Debian 12's cross GCC is 12.
# llama.cpp's own Linux list (QWENVL_CPU_VARIANT_SET=llama.cpp: 8 variants, twice the build time) or any
# other set can be chosen; a variant whose -march the compiler rejects is left out, said at configure time.
#
# How, without patching llama.cpp: with GGML_CPU off ggml does not include ggml-cpu/CMakeLists.txt
# itself, so the per-variant function its list calls is the wrapper below, which builds the chosen
# variants through the original (CMake keeps a redefined command as _name). Include this file before
# add_subdirectory(llama.cpp).
include(CheckCCompilerFlag)

set(QWENVL_CPU_VARIANT_SET
    "armv8.0;armv8.2_dotprod:DOTPROD;armv8.6_i8mm:DOTPROD,MATMUL_INT8"
    CACHE STRING "CPU variants to build: tag[:FEATURE,...];... or llama.cpp (its own list)")

set(BUILD_SHARED_LIBS ON CACHE BOOL "" FORCE)
set(GGML_NATIVE OFF CACHE BOOL "" FORCE)
set(GGML_BACKEND_DL ON CACHE BOOL "" FORCE)
set(GGML_CPU_ALL_VARIANTS ON CACHE BOOL "" FORCE)
set(GGML_CPU OFF CACHE BOOL "" FORCE)

include("${LLAMA_CPP_DIR}/ggml/src/ggml-cpu/CMakeLists.txt")  # defines ggml_add_cpu_backend_variant_impl

set(QWENVL_ARM_FEATURES DOTPROD FP16_VECTOR_ARITHMETIC SVE MATMUL_INT8 SVE2 NOSVE SME)

# The -march of a variant, as ggml-cpu/CMakeLists.txt composes it from the GGML_INTERNAL_* flags.
function(qwenvl_variant_march out)
  set(arch armv8-a)
  set(tags "")
  foreach(pair DOTPROD:armv8.2-a:+dotprod FP16_VECTOR_ARITHMETIC:armv8.2-a:+fp16 SVE:armv8.2-a:+sve
               MATMUL_INT8:armv8.6-a:+i8mm SVE2:armv8.6-a:+sve2 NOSVE::+nosve SME:armv9.2-a:+sme)
    string(REPLACE ":" ";" pair "${pair}")
    list(GET pair 0 feat)
    list(GET pair 1 level)
    list(GET pair 2 tag)
    if(GGML_INTERNAL_${feat})
      if(level)
        set(arch ${level})
      endif()
      string(APPEND tags ${tag})
    endif()
  endforeach()
  set(${out} "${arch}${tags}" PARENT_SCOPE)
endfunction()

# One variant with the GGML_INTERNAL_* flags in scope, unless the compiler cannot target it.
function(qwenvl_add_cpu_variant tag_name)
  qwenvl_variant_march(march)
  string(MAKE_C_IDENTIFIER "QWENVL_MARCH_${march}" probe)
  check_c_compiler_flag("-march=${march}" ${probe})
  if(NOT ${probe})
    message(STATUS "qwenvl: CPU variant ${tag_name} left out: ${CMAKE_C_COMPILER} does not know -march=${march}")
    return()
  endif()
  set_property(GLOBAL APPEND PROPERTY QWENVL_CPU_VARIANTS "${tag_name} (-march=${march})")
  _ggml_add_cpu_backend_variant_impl(${tag_name})
endfunction()

set_property(GLOBAL PROPERTY QWENVL_CPU_VARIANTS "")
function(ggml_add_cpu_backend_variant_impl tag_name)
  if(QWENVL_CPU_VARIANT_SET STREQUAL "llama.cpp")
    qwenvl_add_cpu_variant(${tag_name})
    return()
  endif()
  get_property(done GLOBAL PROPERTY QWENVL_CPU_VARIANTS_ADDED)
  if(done)  # the whole set was added at llama.cpp's first call
    return()
  endif()
  set_property(GLOBAL PROPERTY QWENVL_CPU_VARIANTS_ADDED ON)
  foreach(entry IN LISTS QWENVL_CPU_VARIANT_SET)
    string(REPLACE ":" ";" parts "${entry}")
    list(GET parts 0 tag)
    set(features "")
    list(LENGTH parts n)
    if(n GREATER 1)
      list(GET parts 1 features)
      string(REPLACE "," ";" features "${features}")
    endif()
    foreach(feat IN LISTS QWENVL_ARM_FEATURES)
      set(GGML_INTERNAL_${feat} OFF)
    endforeach()
    foreach(feat IN LISTS features)
      if(NOT feat IN_LIST QWENVL_ARM_FEATURES)
        message(FATAL_ERROR "QWENVL_CPU_VARIANT_SET: unknown feature ${feat} in ${entry} (known: ${QWENVL_ARM_FEATURES})")
      endif()
      set(GGML_INTERNAL_${feat} ON)
    endforeach()
    qwenvl_add_cpu_variant(${tag})
  endforeach()
endfunction()

# ggml looks for the variants next to the executable: executables and libraries all go to <build>/bin.
if(NOT CMAKE_RUNTIME_OUTPUT_DIRECTORY)
  set(CMAKE_RUNTIME_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}/bin")
endif()
if(NOT CMAKE_LIBRARY_OUTPUT_DIRECTORY)
  set(CMAKE_LIBRARY_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}/bin")
endif()
