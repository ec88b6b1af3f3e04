#!/usr/bin/env bash
# Run a command natively while CPUID reports an AVX2-only x86 CPU (no AVX-512, VNNI or AMX), so onnxruntime's
# MLAS and llama.cpp pick the kernels an AVX2-only laptop gets: how benchmarks measure INT8 speed "on AVX2"
# on a machine that has more. KVM guests with -cpu Haswell are the usual way, but this workplace's KVM (PVM)
# boots no stock kernel; Linux CPUID faulting works instead (cpuidmask.c). Needs the cpuid_fault CPU flag
# (Intel) and gcc. /proc/cpuinfo is not masked, only the CPUID instruction.
# Usage: benchmarks/avx2_cpuid/run.sh COMMAND [ARG...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${AVX2_CPUID_CACHE:-$here/../cache}"
so="$cache/cpuidmask.so"
grep -q -w cpuid_fault /proc/cpuinfo || { echo "avx2_cpuid/run.sh: error: this CPU has no cpuid_fault flag" >&2; exit 2; }
[[ $# -ge 1 ]] || { echo "usage: avx2_cpuid/run.sh COMMAND [ARG...]" >&2; exit 2; }
command -v -- "$1" >/dev/null || { echo "avx2_cpuid/run.sh: error: command not found: $1" >&2; exit 2; }
if [[ ! -f "$so" || "$here/cpuidmask.c" -nt "$so" ]]; then
    mkdir -p "$cache"
    gcc -O2 -shared -fPIC -o "$so.tmp" "$here/cpuidmask.c" && mv "$so.tmp" "$so"
fi
export LD_PRELOAD="$so${LD_PRELOAD:+:$LD_PRELOAD}"
export GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
exec "$@"
