"""ChatGLM2-6B / ChatGLM3-6B(-32K) inference: our own model, int4 kernels, tokenizer and chat formats."""
from .config import ChatGLMConfig
from .serving.pipeline import GenerationStats, Pipeline

__all__ = ["ChatGLMConfig", "GenerationStats", "Pipeline"]
