"""splitllm: run a decoder-only LLM split between an edge device and a cloud server."""

__version__ = "0.1.0"
