#!/usr/bin/env bash
# The native core on ARM64, in one command: cross-compile llama.cpp + libqwenvl_core + the native tests
# for aarch64 Linux, then run the native test suite and the CPU probe under qemu-aarch64 on each
# emulated CPU (default: cortex-a76 = armv8.2 + dot-product, and max = armv8.x/9 with i8mm, SVE2, SME).
# llama.cpp's CPU kernels are built as variants chosen at run time (native/cmake/QwenvlCpuVariants.cmake).
#
#   native/arm64/run.sh [--build-only]
#
# Installs nothing. Needs g++-aarch64-linux-gnu, qemu-user (qemu-aarch64), cmake (ninja and ccache are
# used when there) and a Python with this project installed (PYTHON, default python3) for the llama.cpp
# source (native/get_llama_cpp_source.py, downloaded once) and the test data.
# Environment:
#   QWENVL_ARM64_BUILD   build folder (default native-build/arm64; kept, so a second run only re-links)
#   QWENVL_ARM64_CACHE   llama.cpp source + ccache (default native-build/arm64-cache; .ci/run points it at
#                        the user's cache so fresh clones build warm)
#   QWENVL_ARM64_CPUS    the qemu CPUs to run on (default "cortex-a76 max")
#   QWENVL_TEST_DATA     test data folder (python -m tests.native_arm64_data); written to a temp folder if unset
# Output: "== ..." step lines with their times, then per CPU "[cpu] cpu_backend: ...", "[cpu] system_info:
# ...", "[cpu] repack: ...", "[cpu] greedy: ..." and "[cpu] ctest: passed"; exit 0 only when all passed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build="${QWENVL_ARM64_BUILD:-$repo/native-build/arm64}"
cache="${QWENVL_ARM64_CACHE:-$repo/native-build/arm64-cache}"
cpus="${QWENVL_ARM64_CPUS:-cortex-a76 max}"
python="${PYTHON:-python3}"
sysroot=/usr/aarch64-linux-gnu
build_only=0
[ "${1:-}" = "--build-only" ] && build_only=1

missing=()
for tool in aarch64-linux-gnu-g++ qemu-aarch64 cmake "$python"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run.sh: missing ${missing[*]} (apt-get install g++-aarch64-linux-gnu qemu-user cmake)" >&2
    exit 2
fi

seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

echo "== llama.cpp source (the version of the installed llama-cpp-python)"
llama_src="$("$python" "$repo/native/get_llama_cpp_source.py" --full --cache "$cache/llama-cpp")"
echo "$llama_src"

generator=()
if command -v ninja >/dev/null && [ ! -f "$build/Makefile" ]; then
    generator=(-G Ninja)
fi
launcher=()
if command -v ccache >/dev/null; then
    export CCACHE_DIR="$cache/ccache" CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-2G}"
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

echo "== configure + build for aarch64 ($build)"
mkdir -p "$build"  # its logs are written beside it, before cmake creates it (fresh clones)
t0=$(seconds)
cmake -S "$repo" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$repo/native/cmake/aarch64-linux-gnu.cmake" \
    -DLLAMA_CPP_DIR="$llama_src" -DQWENVL_CPU_VARIANTS=ON -DQWENVL_BUILD_JNI=OFF \
    -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF "${launcher[@]}" >"$build.configure.log" 2>&1 \
    || { tail -20 "$build.configure.log" >&2; exit 1; }
grep "qwenvl: " "$build.configure.log" | sed 's/^-- //'
cmake --build "$build" -j "${QWENVL_ARM64_JOBS:-$(nproc)}" >"$build.build.log" 2>&1 \
    || { grep -B2 -A12 "error" "$build.build.log" | head -60 >&2; exit 1; }
echo "build: $(elapsed "$t0") s"
[ $build_only = 1 ] && exit 0

data="${QWENVL_TEST_DATA:-}"
tmp=""
if [ -z "$data" ]; then
    echo "== test data (tests/native_arm64_data.py, written on this machine)"
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/qwenvl-arm64-data.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    data="$tmp/data"
    (cd "$repo" && "$python" -m tests.native_arm64_data "$data") >/dev/null
fi

status=0
for cpu in $cpus; do
    echo "== qemu-aarch64 -cpu $cpu"
    t0=$(seconds)
    if ! QEMU_CPU="$cpu" qemu-aarch64 -L "$sysroot" "$build/bin/qwenvl_cpu_probe" "$data/tiny-Q4_0.gguf" 6 \
        | sed "s/^/[$cpu] /"; then
        echo "[$cpu] cpu_probe: FAILED"
        status=1
    fi
    if QEMU_CPU="$cpu" QWENVL_TEST_DATA="$data" ctest --test-dir "$build" --output-on-failure --timeout 600 \
        >"$build.ctest-$cpu.log" 2>&1; then
        echo "[$cpu] ctest: passed ($(grep -c "Passed" "$build.ctest-$cpu.log") tests)"
    else
        cat "$build.ctest-$cpu.log"
        echo "[$cpu] ctest: FAILED"
        status=1
    fi
    echo "[$cpu] time: $(elapsed "$t0") s"
done
exit $status
