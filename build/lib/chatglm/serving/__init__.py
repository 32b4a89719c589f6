"""Serving: request inputs, sampling, generation of token ids and the public Pipeline."""
