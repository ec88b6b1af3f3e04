"""qwenvl-edge: Qwen-VL-Chat on a CPU, vision in onnxruntime and the decoder in llama.cpp.

The stages live in their own folders and install as subpackages:
``qwenvl_edge.export`` (checkpoint -> ONNX + GGUF), ``qwenvl_edge.quant`` (INT8 / 4-bit),
``qwenvl_edge.runtime`` (bundle -> answers).
"""

from __future__ import annotations

import os

# onnxruntime writes a device id and an event database into the user's cache at import unless told not
# to; set before any room (runtime or export/quant) imports it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from qwenvl_edge.errors import QwenVLError

__version__ = "0.1.0"

_LAZY = {  # importing the package must not load llama.cpp or onnxruntime
    "QwenVL": "qwenvl_edge.runtime.pipeline", "GenerationResult": "qwenvl_edge.runtime.results",
    "Timings": "qwenvl_edge.runtime.results", "Turn": "qwenvl_edge.runtime.prompt",
    "ImageRef": "qwenvl_edge.runtime.prompt", "Box": "qwenvl_edge.runtime.boxes",
}

__all__ = ["QwenVLError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
