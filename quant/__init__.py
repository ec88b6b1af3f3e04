"""Quantization passes over finished FP32 artifacts: ONNX INT8 and GGUF k-quants."""
