"""qwenvl-edge: Qwen-VL-Chat on a CPU, vision in onnxruntime and the decoder in llama.cpp.

The stages live in their own folders and install as subpackages:
``qwenvl_edge.export`` (checkpoint -> ONNX + GGUF), ``qwenvl_edge.quant`` (INT8 / 4-bit),
``qwenvl_edge.runtime`` (bundle -> answers).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["QwenVL", "__version__"]


def __getattr__(name: str):  # lazy: importing the package must not load llama.cpp
    if name == "QwenVL":
        from qwenvl_edge.runtime.pipeline import QwenVL

        return QwenVL
    raise AttributeError(name)
