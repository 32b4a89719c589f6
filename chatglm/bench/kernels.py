"""Kernel-level figures of a loaded model: the int4 layers' and the output layer's streaming rate
(GB/s, weights read from DRAM: every layer of the model in turn, so nothing stays in cache), the
decode step at M = 1, 2, 4, 8 batched rows, which ISA and prefill paths ran, and a memory-bandwidth
reading with the kernels' own loads (:func:`stream_read_bandwidth`)."""
from __future__ import annotations

import statistics
import time

import torch

from ..model.cache import KVCache
from ..quant.linear import Int4Linear
from . import measure

BATCH_ROWS = (1, 2, 4, 8)
STREAM_PREFETCH = (0, 1024, 2048, 4096)
"""Software-prefetch distances (bytes) tried by the streaming read; its best rate is reported."""


def _layer_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers() if t is not None) + \
        sum(p.numel() * p.element_size() for p in module.parameters())


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def streaming_rates(model: torch.nn.Module, rows: int = 1, repeats: int = 5) -> dict:
    """Seconds and GB/s of one pass over every int4 layer (and, separately, of the output layer) at
    ``rows`` input rows in the model's dtype."""
    dtype = model.dtype
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    inputs = {m.in_features: torch.randn(rows, m.in_features).to(dtype) for m in layers}
    head = model.transformer.output_layer
    out: dict = {}
    if layers:
        seconds = _median(lambda: [m(inputs[m.in_features]) for m in layers], repeats)
        nbytes = sum(_layer_bytes(m) for m in layers)
        out["int4"] = {"seconds": seconds, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9}
    head_x = torch.randn(rows, model.config.hidden_size).to(dtype)
    seconds = _median(lambda: head(head_x), repeats)
    nbytes = _layer_bytes(head)
    out["output_layer"] = {"seconds": seconds, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9,
                           "kind": type(head).__name__}
    return out


@torch.inference_mode()
def batched_decode_seconds(model: torch.nn.Module, rows: int, steps: int, prompt_tokens: int = 32,
                           seed: int = 0) -> list[float]:
    """Per-step seconds of greedy decoding ``rows`` sequences together (one forward of ``[rows, 1]``
    tokens over a batched KV cache per step), after a ``[rows, prompt_tokens]`` prefill."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, min(cfg.padded_vocab_size, 64000), (rows, prompt_tokens), generator=gen)
    dtype = model.dtype
    cache = KVCache(cfg, rows, prompt_tokens + steps + 1, "cpu", dtype)
    try:
        pos = torch.arange(prompt_tokens).expand(rows, prompt_tokens)
        nxt = model(ids, pos, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step_pos = torch.full((rows, 1), prompt_tokens + i)
            nxt = model(nxt, step_pos, cache, last_only=True, span=prompt_tokens + i + 1)[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        cache.release()


def batched_decode_rounds(model: torch.nn.Module, rows: tuple[int, ...], steps: int,
                          rounds: int = measure.TURN_ROUNDS) -> dict[str, list[float]]:
    """Per-step seconds at each row count, ``steps`` of them, taken in turns (:func:`.measure.in_turns`),
    so that a slow minute of a shared machine lands on every row count alike rather than on one of
    them; the first step of each turn is a warm-up, not counted."""
    return measure.in_turns({str(m): lambda n, m=m: batched_decode_seconds(model, m, n + 1)[1:] for m in rows},
                            steps, rounds)


def paths() -> dict:
    """The ISA path of our C++ kernels here and the prefill path measured for this process."""
    from ..quant.kernels import cpu_native, native
    if not native.load():
        return {"native": False, "reason": native.unavailable_reason()}
    rates = cpu_native.measure_prefill()
    return {"native": True, "isa": native.best_isa(), "supported_isas": native.supported_isas(),
            "prefill_path": cpu_native.prefill_path(), "prefill_rates_gflops": {k: v / 1e9 for k, v in rates.items()}}


def stream_read_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict | None:
    """Read bandwidth in bytes/s of our extension's streaming read (AVX512 or AVX2 loads over all threads,
    contiguous ranges, each software-prefetch distance in :data:`STREAM_PREFETCH`): the median of each
    distance, the best of them reported. None where the extension is not built."""
    from ..quant.kernels import native
    if not native.load():
        return None
    buf = torch.ones(int(gib * (1 << 30)) // 64 * 64, dtype=torch.uint8)
    rates = {str(pf): buf.numel() / _median(lambda pf=pf: native.stream_read(buf, pf), repeats) for pf in STREAM_PREFETCH}
    best = max(rates, key=rates.get)
    return {"bytes_per_s": rates[best], "prefetch": int(best), "by_prefetch": rates}
