"""Building the native core (CMake + Ninja) for the native tests, into ``<repo>/native-build/`` (kept between runs).

Shared by tests/test_native_core.py and tests/test_native_command.py: one host build folder, so the second
module's configure + build is a no-op. Without cmake the native tests skip, except under ``CI=true``, where a
missing tool is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# QWENVL_NATIVE_BUILD_ROOT: another build root, so two checkouts or two people building at once do not share one
BUILD_ROOT = Path(os.environ.get("QWENVL_NATIVE_BUILD_ROOT") or REPO / "native-build")
BUILD_TIMEOUT = 900  # seconds; a first configure may download the llama.cpp headers (~80 s)
_MISSING = [tool for tool in ("cmake", "ctest") if shutil.which(tool) is None]

# skipped without the tools, except under CI=true: there build_native fails instead
needs_cmake = pytest.mark.skipif(bool(_MISSING) and os.environ.get("CI") != "true",
                                 reason=f"needs {' and '.join(_MISSING) or 'cmake'}")


def run_checked(cmd: list[str], timeout: int = BUILD_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    output = f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}"
    return proc


def build_native(build_dir: Path, *options: str) -> Path:
    """Configure (once) and build the native targets in ``build_dir``; returns it."""
    if _MISSING:
        pytest.fail(f"{', '.join(_MISSING)} not on PATH: install CMake (CI=true: native tests do not skip)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build_dir / "Makefile").exists() else []
    run_checked(["cmake", "-S", str(REPO), "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython3_EXECUTABLE={sys.executable}", *options])
    run_checked(["cmake", "--build", str(build_dir), "-j", str(min(os.cpu_count() or 2, 4))])
    return build_dir
