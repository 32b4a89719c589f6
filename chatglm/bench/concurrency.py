"""Throughput under concurrent requests: N streams submitted at once to the engine thread.

For each N: aggregate decode tokens/s (every stream's tokens after its first, over the time from the
first of those to the last), per-stream decode tokens/s (median over streams), and time to first
token p50 / p99 over the streams (from submission, so it includes waiting for the others' prompts).
"""
from __future__ import annotations

import statistics
import threading
import time

import torch

from ..model.transformer import ChatGLMForConditionalGeneration
from ..serving.sampling import SamplingParams
from ..serving.scheduler import Scheduler


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(model: ChatGLMForConditionalGeneration, streams: int, prompt_tokens: int, new_tokens: int,
              seed: int = 0) -> dict:
    """Submit ``streams`` requests at once and time them; returns the figures of one level."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.padded_vocab_size, 64000)
    prompts = [torch.randint(100, vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(streams)]
    params = SamplingParams(temperature=0.8, top_p=0.8, top_k=50)
    scheduler = Scheduler(model, max_batch=streams, max_waiting=streams)
    stamps: list[list[float]] = [[] for _ in range(streams)]
    try:
        start = time.perf_counter()
        handles = [scheduler.submit(p, new_tokens, params, (), torch.Generator(device=model.device).manual_seed(i))
                   for i, p in enumerate(prompts)]

        def consume(i: int) -> None:
            for _ in handles[i]:
                stamps[i].append(time.perf_counter())

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stall = scheduler.stats.longest_stall_s
    finally:
        scheduler.close()
    decoded = sum(len(s) - 1 for s in stamps)
    first_decode = min(s[0] for s in stamps)
    last = max(s[-1] for s in stamps)
    ttft = [s[0] - start for s in stamps]
    per_stream = [(len(s) - 1) / (s[-1] - s[0]) for s in stamps if len(s) > 1 and s[-1] > s[0]]
    return {"aggregate_tokens_per_s": decoded / (last - first_decode) if last > first_decode else 0.0,
            "per_stream_tokens_per_s": statistics.median(per_stream) if per_stream else 0.0,
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
            "longest_stall_s": stall, "streams": streams, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens}


def run_levels(model: ChatGLMForConditionalGeneration, levels: list[int], prompt_tokens: int = 32,
               new_tokens: int = 16) -> dict[str, dict]:
    """``{str(N): figures}`` for every level, each measured after a short warm-up at that level."""
    out = {}
    for n in levels:
        run_level(model, n, prompt_tokens, 2)  # warm-up: kernels and allocator at this batch size
        out[str(n)] = run_level(model, n, prompt_tokens, new_tokens)
    return out
