"""Checkpoint -> bundle: read a Qwen-VL-Chat folder, write the vision ONNX and the LLM GGUF."""
