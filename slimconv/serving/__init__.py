"""Serving slimconv outputs in engines that need code of slimconv's: the vLLM plugin."""
