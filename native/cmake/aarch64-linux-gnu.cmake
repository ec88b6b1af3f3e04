# CMake toolchain file: cross-compile for aarch64 Linux with Debian's cross toolchain
# (apt-get install g++-aarch64-linux-gnu), run the test binaries with qemu-user.
#
#   cmake -S . -B native-build/arm64 -DCMAKE_TOOLCHAIN_FILE=native/cmake/aarch64-linux-gnu.cmake \
#         -DLLAMA_CPP_DIR=<llama.cpp source> -DQWENVL_CPU_VARIANTS=ON
#
# Our code is built for the armv8-a baseline (the compiler's default); llama.cpp's CPU kernels come
# as run-time selected variants (native/cmake/QwenvlCpuVariants.cmake). ctest runs the test binaries
# through CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64 with the cross sysroot); the emulated CPU is
# chosen with the QEMU_CPU environment variable (cortex-a76, max, ...), which qemu-user reads itself.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(QWENVL_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "prefix of the cross compiler's tools")
set(QWENVL_CROSS_SYSROOT "/usr/aarch64-linux-gnu" CACHE PATH "the target's libc and libstdc++ (Debian's cross packages)")
set(CMAKE_C_COMPILER "${QWENVL_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${QWENVL_CROSS_PREFIX}g++")

set(CMAKE_FIND_ROOT_PATH "${QWENVL_CROSS_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# PNG and JPEG for qwenvl-native: Debian's arm64 multiarch packages (dpkg --add-architecture arm64;
# apt-get install libpng-dev:arm64 libjpeg62-turbo-dev:arm64; .ci/run does it), the same libpng and
# libjpeg-turbo versions as x86-64's, so the command decodes the same pixels on both. They install into
# /usr/lib/aarch64-linux-gnu and /usr/include, beside the host's own headers, which a cross compile must not
# see: their headers and static libraries are linked into a folder of the build (searched as one more root),
# and qwenvl-native links them statically, so the binary (and native/arm64/package.sh's package) needs no
# libpng/libjpeg/zlib on the device. Without the packages qwenvl-native reads PPM/PGM only (said at configure).
set(QWENVL_CROSS_MULTIARCH "/usr/lib/aarch64-linux-gnu" CACHE PATH "Debian's arm64 multiarch library folder (libpng, libjpeg)")
get_property(_qwenvl_in_try GLOBAL PROPERTY IN_TRY_COMPILE)
if(NOT _qwenvl_in_try AND EXISTS "${QWENVL_CROSS_MULTIARCH}/libpng16.a" AND EXISTS "${QWENVL_CROSS_MULTIARCH}/libjpeg.a"
   AND EXISTS "${QWENVL_CROSS_MULTIARCH}/libz.a")
  set(_qwenvl_images "${CMAKE_BINARY_DIR}/aarch64-image-libs")
  file(MAKE_DIRECTORY "${_qwenvl_images}/include" "${_qwenvl_images}/lib")
  foreach(_lib png16 jpeg z)
    file(CREATE_LINK "${QWENVL_CROSS_MULTIARCH}/lib${_lib}.a" "${_qwenvl_images}/lib/lib${_lib}.a" SYMBOLIC)
  endforeach()
  foreach(_header libpng16/png.h libpng16/pngconf.h libpng16/pnglibconf.h jpeglib.h jerror.h jmorecfg.h
                  aarch64-linux-gnu/jconfig.h zlib.h zconf.h)
    get_filename_component(_name "${_header}" NAME)
    file(CREATE_LINK "/usr/include/${_header}" "${_qwenvl_images}/include/${_name}" SYMBOLIC)
  endforeach()
  list(APPEND CMAKE_FIND_ROOT_PATH "${_qwenvl_images}")
endif()

# qemu's -L folder: the sysroot, or (native/arm64/run.sh) a folder that links the sysroot's and adds a
# proc/cpuinfo of the emulated CPU: qemu-user 7.2 passes the host's x86 /proc/cpuinfo through, and ONNX
# Runtime's cpuinfo library crashes on it at load time (qemu looks a path up under -L first).
set(QWENVL_QEMU_PREFIX "${QWENVL_CROSS_SYSROOT}" CACHE PATH "qemu-aarch64 -L folder for the test binaries")
find_program(QWENVL_QEMU_AARCH64 qemu-aarch64)
if(QWENVL_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${QWENVL_QEMU_AARCH64};-L;${QWENVL_QEMU_PREFIX}")
endif()
