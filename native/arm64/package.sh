#!/usr/bin/env bash
# qwenvl-native for ARM64 Linux (Raspberry Pi 5, Jetson, Graviton, ...) as one archive that runs where it
# is unpacked: the aarch64 build of native/arm64/run.sh (run it first: run.sh --build-only) packed as
#
#   qwenvl-native-<version>-linux-aarch64/      (version: pyproject.toml's)
#     bin/qwenvl-native                         PNG/JPEG/PPM decoding linked in (libpng, libjpeg-turbo, zlib)
#     bin/libggml-cpu-*.so -> ../lib/...        llama.cpp looks for its CPU variants next to the executable
#     lib/libqwenvl_core.so libllama.so.0 libggml.so.0 libggml-base.so.0 libggml-cpu-<variant>.so
#     lib/libonnxruntime.so.1                   ONNX Runtime's aarch64 library (the vision step)
#     include/qwenvl_core.h                     the C API, to link libqwenvl_core from your own program
#     README.md  LICENSES.md  licenses/         how to run it; every component's license
#
# Every binary finds the others through its RUNPATH ($ORIGIN/../lib for bin/, $ORIGIN for lib/), so it
# needs no LD_LIBRARY_PATH and no install step; from the system only glibc and libstdc++ (README.md says
# which versions). The archive is reproducible (sorted, owner root, mtime of the build).
#
#   native/arm64/package.sh [OUT_DIR]    (default: next to the build folder) -> prints the archive's path
#
# Environment: QWENVL_ARM64_BUILD (run.sh's build folder), PYTHON (for ONNX Runtime's license files, taken
# from the installed onnxruntime package: the same release as the aarch64 library). Needs cmake (it sets
# the RUNPATHs, no patchelf) and binutils-aarch64-linux-gnu (g++-aarch64-linux-gnu brings it).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build="${QWENVL_ARM64_BUILD:-$repo/native-build/arm64}"
out_dir="${1:-$(dirname "$build")}"
python="${PYTHON:-python3}"
cross=aarch64-linux-gnu-

fail() { echo "package.sh: error: $*" >&2; exit 2; }

for tool in cmake "${cross}readelf" "${cross}nm" "${cross}strip" tar "$python"; do
    command -v "$tool" >/dev/null || fail "$tool missing (apt-get install g++-aarch64-linux-gnu cmake)"
done
bin="$build/bin"
[ -x "$bin/qwenvl-native" ] || fail "no aarch64 build in $build (bin/qwenvl-native): run native/arm64/run.sh --build-only"
# a build without the arm64 libpng/libjpeg reads PPM only: not what a phone photo needs
symbols="$("${cross}nm" "$bin/qwenvl-native")"  # not piped into grep -q: pipefail would see nm's SIGPIPE
for symbol in png_create_read_struct jpeg_read_header; do
    grep -q " T $symbol\$" <<<"$symbols" \
        || fail "$bin/qwenvl-native has no $symbol (built without libpng/libjpeg: dpkg --add-architecture arm64;
  apt-get install libpng-dev:arm64 libjpeg62-turbo-dev:arm64, then run native/arm64/run.sh --build-only again)"
done
ort="$build/onnxruntime/libonnxruntime.so.1"
[ -e "$ort" ] || fail "$ort missing: the build has no ONNX Runtime (run native/arm64/run.sh --build-only)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -1)"
[ -n "$version" ] || fail "no version in $repo/pyproject.toml"
name="qwenvl-native-$version-linux-aarch64"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/qwenvl-package.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
pkg="$tmp/$name"
mkdir -p "$pkg/bin" "$pkg/lib" "$pkg/include" "$pkg/licenses"

# the libraries under their SONAMEs (what the loader looks for), symbols the loader needs only
cp "$bin/qwenvl-native" "$pkg/bin/"
cp "$bin/libqwenvl_core.so" "$pkg/lib/"
for soname in libllama.so.0 libggml.so.0 libggml-base.so.0; do
    cp -L "$bin/$soname" "$pkg/lib/$soname"
done
variants=()
for variant in "$bin"/libggml-cpu-*.so; do
    [ -f "$variant" ] || fail "no CPU variants in $bin (libggml-cpu-*.so): the build needs -DQWENVL_CPU_VARIANTS=ON"
    cp "$variant" "$pkg/lib/"
    variants+=("$(basename "$variant" .so | sed 's/^libggml-cpu-//')")
    ln -s "../lib/$(basename "$variant")" "$pkg/bin/$(basename "$variant")"
done
cp -L "$ort" "$pkg/lib/libonnxruntime.so.1"
cp "$repo/native/include/qwenvl_core.h" "$pkg/include/"
ours=("$pkg"/lib/libqwenvl_core.so "$pkg"/lib/libllama.so.0 "$pkg"/lib/libggml*.so*)  # ONNX Runtime's is stripped
"${cross}strip" --strip-unneeded "$pkg/bin/qwenvl-native" "${ours[@]}"

# RUNPATHs: cmake edits the ELF files in place (the new path is shorter than the build's)
{
    echo "file(RPATH_SET FILE \"$pkg/bin/qwenvl-native\" NEW_RPATH \"\$ORIGIN/../lib\")"
    for lib in "${ours[@]}"; do  # those that have one (libggml-base needs none of ours)
        [[ "$("${cross}readelf" -d "$lib")" == *"(RUNPATH)"* ]] || continue
        echo "file(RPATH_SET FILE \"$lib\" NEW_RPATH \"\$ORIGIN\")"
    done
} >"$tmp/rpath.cmake"
cmake -P "$tmp/rpath.cmake" >/dev/null
for elf in "$pkg/bin/qwenvl-native" "$pkg"/lib/*.so*; do
    if "${cross}readelf" -d "$elf" | grep -E "R(UN)?PATH" | grep -v '\[\$ORIGIN' >&2; then
        fail "$elf keeps a path of this machine"
    fi
done

# what the device's system must have: the newest glibc and libstdc++ symbol versions asked for
newest() { "${cross}readelf" -V "$pkg/bin/qwenvl-native" "$pkg"/lib/*.so* | grep -o "$1_[0-9.]*" | sort -uV | tail -1; }
glibc="$(newest GLIBC)"
glibcxx="$(newest GLIBCXX)"
sed -e "s/@VERSION@/$version/g" -e "s/@NAME@/$name/g" -e "s/@GLIBC@/${glibc#GLIBC_}/g" \
    -e "s/@GLIBCXX@/${glibcxx#GLIBCXX_}/g" -e "s/@VARIANTS@/$(IFS=,; echo "${variants[*]}" | sed 's/,/, /g')/g" \
    "$repo/native/arm64/package-README.md" >"$pkg/README.md"

# licenses: ours, llama.cpp/ggml's, ONNX Runtime's (+ its third-party notices), the image decoders'
llama_src="$(sed -n 's/^LLAMA_CPP_DIR:PATH=//p' "$build/CMakeCache.txt")"
ort_pkg="$("$python" -c "import importlib.util as u; print(list(u.find_spec('onnxruntime').submodule_search_locations)[0])" 2>/dev/null)" \
    || fail "$python has no onnxruntime package (its LICENSE goes into the archive)"
license() {  # FILE SOURCE
    [ -f "$2" ] || fail "license file $2 missing"
    cp "$2" "$pkg/licenses/$1"
}
license llama.cpp-MIT.txt "$llama_src/LICENSE"
license onnxruntime-MIT.txt "$ort_pkg/LICENSE"
license onnxruntime-ThirdPartyNotices.txt "$ort_pkg/ThirdPartyNotices.txt"
license libpng.txt /usr/share/doc/libpng16-16/copyright
license libjpeg-turbo.txt /usr/share/doc/libjpeg62-turbo/copyright
license zlib.txt /usr/share/doc/zlib1g/copyright
cat >"$pkg/LICENSES.md" <<EOF
# Licenses of what $name holds

| Component | Files | License | Text |
|---|---|---|---|
| qwenvl-edge $version (the native core and command) | bin/qwenvl-native, lib/libqwenvl_core.so, include/qwenvl_core.h | Apache-2.0 | https://www.apache.org/licenses/LICENSE-2.0 |
| llama.cpp / ggml (the version llama-cpp-python pins) | lib/libllama.so.0, lib/libggml*.so* | MIT | licenses/llama.cpp-MIT.txt |
| ONNX Runtime $(basename "$(readlink -f "$ort")" | sed 's/libonnxruntime.so.//') (aarch64 wheel) | lib/libonnxruntime.so.1 | MIT (+ third-party notices) | licenses/onnxruntime-MIT.txt, licenses/onnxruntime-ThirdPartyNotices.txt |
| libpng (Debian 12, linked into bin/qwenvl-native) | bin/qwenvl-native | libpng License | licenses/libpng.txt |
| libjpeg-turbo (Debian 12, linked into bin/qwenvl-native) | bin/qwenvl-native | IJG + BSD-3-Clause + zlib | licenses/libjpeg-turbo.txt |
| zlib (Debian 12, linked into bin/qwenvl-native) | bin/qwenvl-native | zlib | licenses/zlib.txt |
EOF

mkdir -p "$out_dir"
archive="$out_dir/$name.tar.gz"
mtime="@$(stat -c %Y "$bin/qwenvl-native")"
tar -C "$tmp" --sort=name --owner=0 --group=0 --numeric-owner --mtime="$mtime" -cf - "$name" \
    | gzip -n -9 >"$archive.part"
mv "$archive.part" "$archive"
echo "$archive"
