"""Bundle -> answers: onnxruntime for the image, llama.cpp for the text. Never imports torch."""
