"""Running the vision encoder writes nothing into the user's home (onnxruntime telemetry is off)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def test_vision_import_and_session_write_nothing_under_home(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    code = (
        "from qwenvl_edge.runtime import vision\n"
        "import numpy as np\n"
        f"s = vision.ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
        "print(s.run(None, {'x': np.array([2.0], np.float32)})[0][0])\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2.0"
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []  # before fix: .cache/Microsoft/...
