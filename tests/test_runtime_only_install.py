"""`pip install .` without extras runs models: `run`, `chat`'s engine, `eval` and the Python API never import the
export side (onnx, gguf), the server (fastapi, uvicorn), ray or torch. Each command runs in a fresh process in
which those modules cannot be imported, as on a machine where they were never installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXTRAS = ("onnx", "gguf", "fastapi", "uvicorn", "ray", "pyarrow", "torch")
RUN_WITHOUT_EXTRAS = ("import sys; sys.modules.update(dict.fromkeys({extras!r})); "
                      "from qwenvl_edge.cli import main; sys.exit(main(sys.argv[1:]))")


def without_extras(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    code = RUN_WITHOUT_EXTRAS.format(extras=EXTRAS)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "QWENVL_EDGE_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("args", [
    ["run", "--greedy", "--max-tokens", "4", "{image}", "What is in the picture?"],
    ["run", "--json", "--greedy", "--max-tokens", "2", "Hello"],
    ["eval", "{bundle}", "--n", "1"],
], ids=["run-image", "run-text", "eval"])
def test_model_commands_run_without_the_extras(args: list[str], default_bundle: Path, golden, tmp_path: Path) -> None:
    args = [a.format(image=golden.images["sign"], bundle=default_bundle) for a in args]
    if args[0] == "run":
        args[1:1] = ["--bundle", str(default_bundle)]
    done = without_extras(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and done.stdout.strip()


def test_the_blocker_really_blocks() -> None:
    """The check above can fail: the export side cannot even be imported in the same process set-up."""
    code = f"import sys; sys.modules.update(dict.fromkeys({EXTRAS!r})); import qwenvl_edge.bundler.bundle_export"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and ("ModuleNotFoundError" in done.stderr or "ImportError" in done.stderr)
