"""The transformer, its KV cache and the CUDA-graph decode step."""
