"""Throughput under concurrent requests: N streams submitted at once to the engine thread.

For each N: aggregate decode tokens/s and per-stream decode tokens/s (median over streams), both
over the steady window in which every stream is decoding: from the last stream's first token to the
first stream's last token, so the prompts (all read before the window opens) do not count as decode
time. Token times are the engine's (:attr:`~chatglm.serving.scheduler.TokenStream.times`: one per
decode step, shared by its rows), so the step that ends the window counts all its rows' tokens, not
only those whose reader happened to wake first. Time to first token p50 / p99 over the streams is
taken by the readers, from submission: it includes waiting for the others' prompts.

The levels run in ``ROUNDS`` interleaved rounds (1, 2, 4, 8, 1, 2, 4, 8, ...) after one warm-up of
each; every figure is the median over the rounds, so a slow minute of a shared machine lands on one
round of every level rather than on all of one level.
"""
from __future__ import annotations

import statistics
import threading
import time

import torch

from ..model.transformer import ChatGLMForConditionalGeneration
from ..serving.sampling import SamplingParams
from ..serving.scheduler import Scheduler

ROUNDS = 3
"""Interleaved rounds of every level; the figures reported are their medians."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _run_streams(model: ChatGLMForConditionalGeneration, streams: int, prompt_tokens: int, new_tokens: int,
                 seed: int) -> tuple[float, list[list[float]], list[list[float]], float]:
    """Submit ``streams`` requests at once; the submission time, each stream's token times as its
    reader saw them and as the engine sampled them, and the longest stall the engine saw."""
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
        engine = [h.times for h in handles]
    finally:
        scheduler.close()
    return start, stamps, engine, stall


def run_level(model: ChatGLMForConditionalGeneration, streams: int, prompt_tokens: int, new_tokens: int,
              seed: int = 0) -> dict:
    """Submit ``streams`` requests at once and time them; returns the figures of one level.
    ``cores_used`` (this process's CPU seconds per wall second over the level, all threads) shows
    whether it had the machine: on 2 idle cores it stays near 2, and well below means that other
    processes took cores from that level's figures."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    start, stamps, engine, stall = _run_streams(model, streams, prompt_tokens, new_tokens, seed)
    cores = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    if any(len(e) < 2 for e in engine):
        raise RuntimeError(f"every stream needs 2 tokens or more to be timed, got {[len(e) for e in engine]}")
    window_start = max(e[0] for e in engine)
    window_end = min(e[-1] for e in engine)
    if window_end <= window_start:
        raise RuntimeError(f"{streams} streams never decoded together; raise the tokens per stream ({new_tokens})")
    inside = [sum(window_start < t <= window_end for t in e) for e in engine]
    seconds = window_end - window_start
    ttft = [s[0] - start for s in stamps]
    return {"aggregate_tokens_per_s": sum(inside) / seconds,
            "per_stream_tokens_per_s": statistics.median(n / seconds for n in inside),
            "window_seconds": seconds, "window_tokens": sum(inside),
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
            "longest_stall_s": stall, "cores_used": cores, "streams": streams, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens}


def run_levels(model: ChatGLMForConditionalGeneration, levels: list[int], prompt_tokens: int = 32,
               new_tokens: int = 16, rounds: int = ROUNDS) -> dict[str, dict]:
    """``{str(N): figures}`` for every level: the median of each figure over ``rounds`` interleaved
    rounds, after one short warm-up per level; each level keeps its rounds' figures under ``rounds``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for n in levels:
        _run_streams(model, n, prompt_tokens, 3, seed=1)  # warm-up: kernels and allocator at this batch size
    measured: dict[str, list[dict]] = {str(n): [] for n in levels}
    for r in range(rounds):
        for n in levels:
            measured[str(n)].append(run_level(model, n, prompt_tokens, new_tokens, seed=r))
    out = {}
    for n, runs in measured.items():
        figures = {key: statistics.median(run[key] for run in runs) for key, value in runs[0].items()
                   if isinstance(value, (int, float))}
        out[n] = {**runs[0], **figures, "rounds": runs}
    return out


def table(levels: dict[str, dict]) -> str:
    """The figures of :func:`run_levels` as a text table, with ratios against one stream."""
    one = levels.get("1")
    lines = ["streams  aggregate tok/s  per-stream tok/s  TTFT p50 / p99 s  longest stall s  cores used  "
             "vs 1 stream (agg / per)  (medians of the rounds)"]
    for n, r in levels.items():
        ratio = (f"{r['aggregate_tokens_per_s'] / one['aggregate_tokens_per_s']:.2f}x / "
                 f"{r['per_stream_tokens_per_s'] / one['per_stream_tokens_per_s']:.2f}x") if one else "-"
        lines.append(f"{n:>7}  {r['aggregate_tokens_per_s']:15.2f}  {r['per_stream_tokens_per_s']:16.2f}  "
                     f"{r['ttft_p50_s']:7.2f} / {r['ttft_p99_s']:6.2f}  {r['longest_stall_s']:15.2f}  "
                     f"{r.get('cores_used', float('nan')):10.2f}  {ratio}")
    return "\n".join(lines)
