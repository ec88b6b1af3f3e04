"""The ARM64 package (native/arm64/package.sh): unpacked into an empty folder, it runs as on a device (long suite).

``package.sh`` packs the aarch64 build as qwenvl-native-<version>-linux-aarch64.tar.gz (bin/, lib/, include/,
README.md, LICENSES.md). Here it is unpacked into an empty folder and run under qemu-aarch64 with a clean
environment: no build tree, no LD_LIBRARY_PATH, qemu's -L folder holding only the cross sysroot (glibc,
libstdc++) and the emulated CPU's /proc/cpuinfo (native/arm64/run.sh --qemu, with its folder in a temp
place). What it pins down:
- the layout, and that every library of ours is found through the RUNPATH ($ORIGIN/../lib, $ORIGIN): the
  loader resolves them inside the unpacked folder, and no RUNPATH names a path of the build machine;
- on cortex-a76 it answers the golden F32 bundle exactly, from the golden PNG itself (libpng is linked in);
- on max (the i8mm CPU variant, found through bin/'s links into lib/) it answers the trained tiny model's
  Q4_0 bundle (INT8 vision) as x86-64's qwenvl-native does, or differs only by a near-tie of x86-64's own
  decoder (tests/test_native_arm64.py's NEAR_TIE rule).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_edge.evaluation.evaluate import synthetic_items
from tests.conftest import export_for_tests
from tests.native_build import BUILD_ROOT, build_native
from tests.test_native_arm64 import NEAR_TIE, RUN, TASK_SEED, TASK_TOKENS, below_greedy, run_sh

pytestmark = pytest.mark.long
REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "native" / "arm64" / "package.sh"
VERSION = re.search(r'^version = "(.*)"$', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)[1]
NAME = f"qwenvl-native-{VERSION}-linux-aarch64"
VARIANTS = ("armv8.0", "armv8.2_dotprod", "armv8.6_i8mm")  # QwenvlCpuVariants.cmake's default set
LIBS = ("libqwenvl_core.so", "libllama.so.0", "libggml.so.0", "libggml-base.so.0", "libonnxruntime.so.1",
        *(f"libggml-cpu-{v}.so" for v in VARIANTS))
SYSTEM = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libdl.so.2", "librt.so.1",
          "libpthread.so.0", "ld-linux-aarch64.so.1"}  # what a device's glibc + libstdc++ provide


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """package.sh's archive (the build first: run.sh --build-only, nothing to do when .ci/run built it)."""
    run_sh("--build-only")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(PACKAGE), str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


@pytest.fixture(scope="module")
def device(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive unpacked into an empty folder, as on a device: the package's root."""
    root = tmp_path_factory.mktemp("device")
    subprocess.run(["tar", "xzf", str(archive), "-C", str(root)], check=True)
    return root / NAME


def on_device(device: Path, cpu: str, *args: str | Path | int, guest_env: tuple[str, ...] = ()) -> str:
    """The package's qwenvl-native ARGS under qemu-aarch64 -cpu CPU, from an empty folder, with a clean
    environment (PATH, and run.sh's qemu folder outside any build): its stdout."""
    work = device.parent.parent / f"cwd-{cpu}"
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "QWENVL_ARM64_BUILD": str(device.parent.parent / "qemu")}
    qemu_env = [arg for var in guest_env for arg in ("-E", var)]  # in the guest only (qemu-user -E)
    cmd = [str(RUN), "--qemu", cpu, *qemu_env, str(device / "bin" / "qwenvl-native"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, timeout=900, cwd=work, env=env)
    assert proc.returncode == 0, (cpu, args, proc.stderr.decode(errors="replace")[-3000:])
    return proc.stdout.decode("utf-8")


def readelf(path: Path) -> str:
    return subprocess.run(["aarch64-linux-gnu-readelf", "-d", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_package_layout_and_runpaths(archive: Path, device: Path):
    """Catches a package that misses a library, a README or LICENSES, or keeps a RUNPATH of the build machine."""
    assert archive.name == f"{NAME}.tar.gz"
    assert (device / "bin" / "qwenvl-native").is_file()
    for lib in LIBS:
        assert (device / "lib" / lib).is_file(), lib
    for variant in VARIANTS:  # llama.cpp looks for its CPU variants next to the executable
        link = device / "bin" / f"libggml-cpu-{variant}.so"
        assert link.is_symlink() and link.resolve() == (device / "lib" / link.name).resolve(), link
    readme = (device / "README.md").read_text(encoding="utf-8")
    assert "Raspberry Pi 5" in readme and "Android" in readme and "@" not in readme.replace("`@", "")
    licenses = (device / "LICENSES.md").read_text(encoding="utf-8")
    for component in ("llama.cpp", "ONNX Runtime", "libpng", "libjpeg-turbo", "zlib"):
        assert component in licenses, component
    assert "RUNPATH" in readelf(device / "bin" / "qwenvl-native")
    for elf in [device / "bin" / "qwenvl-native", *(device / "lib").iterdir()]:
        paths = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r\w*path: \[(.*)\]", readelf(elf))
        assert all(p in ("$ORIGIN", "$ORIGIN/../lib") for p in paths), (elf.name, paths)
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", readelf(elf)))
        assert needed <= SYSTEM | set(LIBS), (elf.name, needed - SYSTEM - set(LIBS))


def test_package_libraries_resolve_inside_it(device: Path):
    """Catches a library the loader takes from elsewhere than the package (the build tree, LD_LIBRARY_PATH)."""
    trace = on_device(device, "cortex-a76", guest_env=("LD_TRACE_LOADED_OBJECTS=1",))
    resolved = dict(re.findall(r"^\s*(\S+) => (\S+)", trace, re.MULTILINE))
    for lib in ("libqwenvl_core.so", "libllama.so.0", "libggml.so.0", "libggml-base.so.0", "libonnxruntime.so.1"):
        assert Path(resolved[lib]).resolve() == (device / "lib" / lib).resolve(), (lib, trace)
    assert not {"libpng16.so.16", "libjpeg.so.62", "libz.so.1"} & set(resolved), trace  # linked in


def test_package_answers_golden_f32_exactly(device: Path, f32_bundle: Path, golden):
    """Catches a package that cannot run (libraries, CPU variants, ONNX Runtime) or answers other text."""
    case = golden.cases["one_image"]
    images = [golden.images[name] for name in case["images"]]  # the PNGs themselves
    answer = on_device(device, "cortex-a76", "run", f32_bundle, *images, case["text"], "--greedy", "--max-tokens",
                       golden.max_new_tokens, "--threads", "2")
    assert answer == case["generated_text"] + "\n"


@pytest.fixture(scope="module")
def trained_q4_0(trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_for_tests(trained_ckpt, tmp_path_factory.mktemp("bundle") / "Q4_0", "int8", "Q4_0")


def test_package_answers_trained_q4_0_as_x86(device: Path, trained_q4_0: Path, tmp_path: Path):
    """Catches the package's i8mm variant or INT8 vision changing the trained model's answer (a grounding box)."""
    item = next(it for it in synthetic_items(1, TASK_SEED) if it.task == "grounding")
    image = tmp_path / "grounding.png"
    item.image.save(image)
    args = (trained_q4_0, image, item.question, "--greedy", "--max-tokens", TASK_TOKENS, "--threads", "2")
    proc = subprocess.run([str(build_native(BUILD_ROOT / "host") / "qwenvl-native"), "run", *map(str, args)],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    x86 = proc.stdout.decode("utf-8")
    arm = on_device(device, "max", "run", *args)
    print(f"package on max: {arm.strip()!r} (x86-64 {x86.strip()!r})")
    if arm != x86:
        gap = max(below_greedy(trained_q4_0, image, item.question, arm.removesuffix("\n")))
        assert gap <= NEAR_TIE, (arm, x86, gap)
