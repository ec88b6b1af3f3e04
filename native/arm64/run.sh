#!/usr/bin/env bash
# The native core on ARM64, in one command: cross-compile llama.cpp + libqwenvl_core + the native tests
# for aarch64 Linux, then run the native test suite and the CPU probe under qemu-aarch64 on each
# emulated CPU (default: cortex-a76 = armv8.2 + dot-product, and max = armv8.x/9 with i8mm, SVE2, SME).
# llama.cpp's CPU kernels are built as variants chosen at run time (native/cmake/QwenvlCpuVariants.cmake).
#
#   native/arm64/run.sh [--build-only]
#   native/arm64/run.sh --qemu CPU PROGRAM [ARG...]   one aarch64 program of the build under qemu-aarch64 -cpu CPU
#                                                     (its /proc/cpuinfo and sysroot as the tests get them)
#
# Installs nothing. Needs g++-aarch64-linux-gnu, qemu-user (qemu-aarch64), cmake (ninja and ccache are
# used when there) and a Python with this project installed (PYTHON, default python3) for the llama.cpp
# source (native/get_llama_cpp_source.py, downloaded once), ONNX Runtime's aarch64 library (pip download
# of the onnxruntime wheel of the installed version, once) and the test data.
# Environment:
#   QWENVL_ARM64_BUILD   build folder (default native-build/arm64; kept, so a second run only re-links)
#   QWENVL_ARM64_CACHE   llama.cpp source + ONNX Runtime + ccache (default native-build/arm64-cache; .ci/run points it at
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
qemu_root="$build/qemu-root"  # ctest's qemu -L folder: the sysroot's folders + proc/cpuinfo (write_cpuinfo)
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

# qemu-user 7.2 shows the host's x86 /proc/cpuinfo to the guest, on which ONNX Runtime's cpuinfo library
# crashes while loading; qemu looks every path up under its -L folder first, so the emulated CPU's own
# /proc/cpuinfo goes there (its MIDR: the CPU type and the cores ONNX Runtime picks kernels by; its
# features come from the auxiliary vector qemu fills per CPU, the Features line only mirrors them).
write_cpuinfo() {  # CPU FOLDER
    local root="$2"
    local implementer=0x41 variant=0x4 part=0xd0b revision=1 n
    local features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
    if [ "$1" = max ]; then  # qemu's MIDR for "max" (implementer 0) makes ONNX Runtime warn: shown as a
        variant=0x2 part=0xd47 revision=0  # Cortex-A710, the first phone core with i8mm + SVE2 as "max" has
        features="$features sha3 sm3 sm4 sha512 sve asimdfhm flagm sb paca pacg dcpodp sve2 svei8mm svebf16 i8mm bf16 bti"
    fi
    mkdir -p "$root/proc"
    for entry in "$sysroot"/*; do
        [ "$(basename "$entry")" = lib ] || ln -sfn "$entry" "$root/$(basename "$entry")"
    done
    # qemu falls back to the host's path when -L has none: with Debian's arm64 multiarch packages installed
    # (libpng-dev:arm64 brings libc6:arm64, .ci/run installs it), the guest's loader would take libc.so.6
    # from the host's /lib/aarch64-linux-gnu (listed in the host's ld.so.cache), another glibc build than
    # the sysroot's ld.so, and hang. The multiarch folders name the sysroot's lib here.
    [ -L "$root/lib" ] && rm "$root/lib"  # a link to the sysroot's lib, as earlier versions made it
    mkdir -p "$root/lib" "$root/usr/lib"
    for entry in "$sysroot"/lib/*; do ln -sfn "$entry" "$root/lib/$(basename "$entry")"; done
    ln -sfn "$sysroot/lib" "$root/lib/aarch64-linux-gnu"
    ln -sfn "$sysroot/lib" "$root/usr/lib/aarch64-linux-gnu"
    for n in $(seq 0 $(($(getconf _NPROCESSORS_CONF) - 1))); do
        printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: %s\n' "$n" "$features" "$implementer"
        printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %d\n\n' "$variant" "$part" "$revision"
    done >"$root/proc/cpuinfo.$$"
    mv "$root/proc/cpuinfo.$$" "$root/proc/cpuinfo"
}

if [ "${1:-}" = "--qemu" ]; then
    [ $# -ge 3 ] || { echo "usage: run.sh --qemu CPU PROGRAM [ARG...]" >&2; exit 2; }
    cpu="$2"
    shift 2
    write_cpuinfo "$cpu" "$qemu_root-$cpu"  # one folder per CPU: runs on different CPUs may overlap
    QEMU_CPU="$cpu" exec qemu-aarch64 -L "$qemu_root-$cpu" "$@"
fi

seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

echo "== llama.cpp source (the version of the installed llama-cpp-python)"
llama_src="$("$python" "$repo/native/get_llama_cpp_source.py" --full --cache "$cache/llama-cpp")"
echo "$llama_src"

echo "== ONNX Runtime for aarch64 (the wheel of the installed onnxruntime's version: x86-64 and ARM64 differ only in CPU)"
ort_version="$("$python" -c "import importlib.metadata as m; print(m.version('onnxruntime'))")"
ort_dir="$cache/onnxruntime-$ort_version-aarch64"
ort_lib="$ort_dir/libonnxruntime.so.$ort_version"
if [ ! -f "$ort_lib" ]; then
    mkdir -p "$ort_dir"
    # manylinux_2_28 (glibc 2.28): Debian 12's cross sysroot has 2.36; the library is the same for every cp3x
    "$python" -m pip download -q "onnxruntime==$ort_version" --platform manylinux_2_28_aarch64 --only-binary=:all: \
        --python-version 3.11 --no-deps -d "$ort_dir/wheel" >&2
    "$python" - "$ort_dir" "$ort_version" <<'PY'
import sys, zipfile
from pathlib import Path
out, version = Path(sys.argv[1]), sys.argv[2]
(wheel,) = (out / "wheel").glob("onnxruntime-*aarch64.whl")
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
tmp = out / (Path(name).name + ".part")
with zipfile.ZipFile(wheel) as z:
    tmp.write_bytes(z.read(name))
tmp.rename(out / Path(name).name)
PY
    rm -rf "$ort_dir/wheel"
fi
echo "$ort_lib"

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
    -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF -DQWENVL_ORT_LIBRARY="$ort_lib" \
    -DQWENVL_QEMU_PREFIX="$qemu_root" "${launcher[@]}" >"$build.configure.log" 2>&1 \
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
    write_cpuinfo "$cpu" "$qemu_root"
    if ! QEMU_CPU="$cpu" qemu-aarch64 -L "$qemu_root" "$build/bin/qwenvl_cpu_probe" "$data/tiny-Q4_0.gguf" 6 \
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
