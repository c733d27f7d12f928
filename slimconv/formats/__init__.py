"""Output formats: nemotron-nas (DeciLM) checkpoints, the ONNX decoder graph and its export, GGUF for llama.cpp."""
