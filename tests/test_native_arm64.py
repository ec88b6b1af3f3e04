"""The native core on ARM64: cross-compiled for aarch64 Linux and run under qemu-aarch64 (long suite).

``native/arm64/run.sh`` builds llama.cpp (the version llama-cpp-python pins, with its CPU kernels as
run-time selected variants), libqwenvl_core and the native tests with Debian's cross GCC, then runs
them under ``qemu-aarch64 -cpu cortex-a76`` (armv8.2 + dot-product, no i8mm) and ``-cpu max`` (i8mm,
SVE2, ...). What it pins down:
- the whole native ctest suite passes on both CPUs, with the test data written here on x86-64: the
  prompt ids and the greedy ids of the tiny golden at F32 equal the original's, as on x86-64;
- llama.cpp really takes the ARM paths it is meant to: the dot-product variant and the q4_0_4x4
  repacked Q4_0 layout on cortex-a76, the i8mm variant and q4_0_4x8 on max (its system info and
  log, printed by ``qwenvl_cpu_probe``);
- the repacked Q4_0 kernels of both CPUs give the same greedy ids as x86-64's llama.cpp on the same
  Q4_0 file and prompt.
A missing cross compiler or qemu skips these tests, and fails them under CI=true (.ci/run installs both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gguf_builds import greedy, load_llama
from tests.native_arm64_data import Q4_0_NAME, write_arm64_data

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "native" / "arm64" / "run.sh"
TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64", "cmake")
CPUS = ("cortex-a76", "max")
PROBE_TOKENS = 6  # run.sh's qwenvl_cpu_probe MODEL 6

pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def arm64_data(tmp_path_factory: pytest.TempPathFactory, golden, tiny_ckpt: Path) -> Path:
    return write_arm64_data(tmp_path_factory.mktemp("arm64_data"), golden, tiny_ckpt)


@pytest.fixture(scope="module")
def arm64_run(arm64_data: Path) -> str:
    """run.sh's output: build (warm when .ci/run built it before), then the suite on every CPU."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} missing: apt-get install g++-aarch64-linux-gnu qemu-user cmake"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "QWENVL_TEST_DATA": str(arm64_data), "PYTHON": sys.executable,
           "QWENVL_ARM64_CPUS": " ".join(CPUS)}
    proc = subprocess.run([str(RUN)], capture_output=True, text=True, timeout=3600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"native/arm64/run.sh failed ({proc.returncode}):\n{out[-12000:]}"
    return out


def probe(out: str, cpu: str) -> dict[str, str]:
    """The "[cpu] key: value" lines run.sh printed for ``cpu``."""
    prefix = f"[{cpu}] "
    found = {}
    for line in out.splitlines():
        if line.startswith(prefix) and ": " in line:
            key, value = line[len(prefix):].split(": ", 1)
            found[key] = value
    return found


def features(system_info: str) -> dict[str, str]:
    """"CPU : NEON = 1 | DOTPROD = 1 | ..." -> {"NEON": "1", "DOTPROD": "1", ...}"""
    pairs = (part.split(" = ") for part in system_info.replace("CPU : ", "").split("|") if " = " in part)
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.mark.parametrize("cpu", CPUS)
def test_native_suite_passes_on_arm64(arm64_run: str, cpu: str):
    """Catches a native test (golden prompt ids, greedy ids at F32, KV cache, preprocessing) that fails on ARM64."""
    assert probe(arm64_run, cpu).get("ctest", "").startswith("passed"), arm64_run[-6000:]


def test_dotprod_and_i8mm_paths_are_chosen_by_cpu(arm64_run: str):
    """Catches a build without the run-time variants, or one whose i8mm kernels never run (or crash without i8mm)."""
    a76, top = probe(arm64_run, "cortex-a76"), probe(arm64_run, "max")
    assert a76["cpu_backend"] == "libggml-cpu-armv8.2_dotprod.so", a76
    assert features(a76["system_info"]).get("DOTPROD") == "1", a76
    assert features(a76["system_info"]).get("MATMUL_INT8", "0") == "0", a76
    assert a76["repack"].startswith("q4_0_4x4 x"), a76
    assert top["cpu_backend"] == "libggml-cpu-armv8.6_i8mm.so", top
    assert features(top["system_info"]).get("MATMUL_INT8") == "1", top
    assert top["repack"].startswith("q4_0_4x8 x"), top


def test_repacked_q4_0_answers_as_on_x86(arm64_run: str, arm64_data: Path):
    """Catches ARM Q4_0 kernels (dot-product 4x4, i8mm 4x8) that compute other logits than x86-64's llama.cpp."""
    llm = load_llama(arm64_data / Q4_0_NAME)
    try:
        n_vocab = llm.n_vocab()
        prompt = [(1000 + 7919 * i) % n_vocab for i in range(40)]  # qwenvl_cpu_probe's fixed prompt
        _, ids = greedy(llm, prompt, PROBE_TOKENS)
    finally:
        llm.close()
    x86 = " ".join(map(str, ids))
    for cpu in CPUS:
        assert probe(arm64_run, cpu)["greedy"] == x86, (cpu, probe(arm64_run, cpu))
