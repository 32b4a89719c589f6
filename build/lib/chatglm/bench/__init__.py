"""Benchmark: ``python -m chatglm.bench`` (see ``__main__``)."""
