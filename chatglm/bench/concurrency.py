"""Throughput under concurrent requests: N streams submitted at once to the engine thread.

For each N: aggregate decode tokens/s and per-stream decode tokens/s (median over streams), both
over the steady window in which every stream is decoding (from the last stream's first token to the
first stream's last token), so the prompts of the others do not count as decode time; and time to
first token p50 / p99 over the streams (from submission, so it includes waiting for the others'
prompts, which are read in chunks between decode steps).
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


def _run_streams(model: ChatGLMForConditionalGeneration, streams: int, prompt_tokens: int, new_tokens: int,
                 seed: int) -> tuple[float, list[list[float]], float]:
    """Submit ``streams`` requests at once; the submission time, each stream's token times, and the
    longest stall the engine saw."""
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
    return start, stamps, stall


def run_level(model: ChatGLMForConditionalGeneration, streams: int, prompt_tokens: int, new_tokens: int,
              seed: int = 0) -> dict:
    """Submit ``streams`` requests at once and time them; returns the figures of one level."""
    start, stamps, stall = _run_streams(model, streams, prompt_tokens, new_tokens, seed)
    window_start = max(s[0] for s in stamps)
    window_end = min(s[-1] for s in stamps)
    if window_end <= window_start:
        raise RuntimeError(f"{streams} streams never decoded together; raise the tokens per stream ({new_tokens})")
    inside = [[t for t in s if window_start < t <= window_end] for s in stamps]
    seconds = window_end - window_start
    decoded = sum(len(s) for s in inside)
    ttft = [s[0] - start for s in stamps]
    per_stream = [len(s) / seconds for s in inside]
    return {"aggregate_tokens_per_s": decoded / seconds, "per_stream_tokens_per_s": statistics.median(per_stream),
            "window_seconds": seconds,
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
            "longest_stall_s": stall, "streams": streams, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens}


def run_levels(model: ChatGLMForConditionalGeneration, levels: list[int], prompt_tokens: int = 32,
               new_tokens: int = 16) -> dict[str, dict]:
    """``{str(N): figures}`` for every level, each measured after a short warm-up at that level."""
    out = {}
    for n in levels:
        _run_streams(model, n, prompt_tokens, 3, seed=1)  # warm-up: kernels and allocator at this batch size
        out[str(n)] = run_level(model, n, prompt_tokens, new_tokens)
    return out


def table(levels: dict[str, dict]) -> str:
    """The figures of :func:`run_levels` as a text table, with ratios against one stream."""
    one = levels.get("1")
    lines = ["streams  aggregate tok/s  per-stream tok/s  TTFT p50 / p99 s  longest stall s  vs 1 stream (agg / per)"]
    for n, r in levels.items():
        ratio = (f"{r['aggregate_tokens_per_s'] / one['aggregate_tokens_per_s']:.2f}x / "
                 f"{r['per_stream_tokens_per_s'] / one['per_stream_tokens_per_s']:.2f}x") if one else "-"
        lines.append(f"{n:>7}  {r['aggregate_tokens_per_s']:15.2f}  {r['per_stream_tokens_per_s']:16.2f}  "
                     f"{r['ttft_p50_s']:7.2f} / {r['ttft_p99_s']:6.2f}  {r['longest_stall_s']:15.2f}  {ratio}")
    return "\n".join(lines)
