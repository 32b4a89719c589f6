"""Decode steps replayed from a CUDA graph, so a token costs one graph launch instead of hundreds of
Python-issued kernel launches.

A :class:`GraphedDecoder` owns, for one batch size and one cache capacity: a :class:`KVCache` of that
capacity, static buffers for the input ids ``[B, 1]`` and the position (long ``[1]``), and the step
:meth:`ChatGLMForConditionalGeneration.decode_static` whose shapes do not depend on the position. On
CUDA it runs a few warm-up steps on a side stream (Triton compiles, cuBLAS and the caching allocator
settle), then captures one step with ``torch.cuda.CUDAGraph``; :meth:`GraphedDecoder.step` copies the
new ids and position into the static buffers and replays it. Elsewhere (CPU), when
``CHATGLM_CUDA_GRAPH=0`` is set, or when the capture fails (logged with its traceback), the very
same static step runs eagerly on the same buffers: the numbers are those of the graph, only slower.

CUDA design: a request needing ``n`` cache positions uses the bucket :func:`bucket_capacity` (``n``
rounded up to a power of two, at least ``MIN_BUCKET``, at most the model's ``seq_length``), so one
graph serves every request of that bucket. A :class:`DecoderPool` per model keeps the ``KEEP_BUCKETS``
most recently used decoders between requests; each holds its bucket's whole KV cache (counted in
:func:`chatglm.cache.cache_usage` while it is kept: ``layers * B * groups * capacity * head_dim *
2 * dtype bytes``, 0.94 GB for ChatGLM3-6B fp16 at 32K) plus the graph's private memory pool (one
step's activations and the float32 logits ``[B, vocab]``, a few MB). Prefill stays eager and writes
into the same cache; :meth:`KVCache.reset` zeroes it before each request. :func:`release_decoders`
frees everything, and must be called if the model's weights or kernels are replaced, since a graph
replays the memory addresses it captured.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch

from .cache import KVCache
from .transformer import ChatGLMForConditionalGeneration

log = logging.getLogger(__name__)

ENV_VAR = "CHATGLM_CUDA_GRAPH"
"""Set to ``0`` (or ``false``/``no``/``off``) to run the static decode step eagerly on CUDA."""
MIN_BUCKET = 256
KEEP_BUCKETS = 2
WARMUP_STEPS = 3
_OFF = ("0", "false", "no", "off")


def bucket_capacity(needed: int, limit: int) -> int:
    """The cache capacity for ``needed`` positions: the next power of two, at least ``MIN_BUCKET``,
    at most ``limit`` (the model's context), and never less than ``needed``."""
    if needed <= 0:
        raise ValueError(f"a decoder needs a positive capacity, got {needed}")
    power = 1 << (needed - 1).bit_length()
    return max(needed, min(max(MIN_BUCKET, power), limit))


def graphs_enabled(device: torch.device | str) -> bool:
    """Whether decode steps on ``device`` are captured: CUDA is available and not switched off
    with ``CHATGLM_CUDA_GRAPH=0``."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


class GraphedDecoder:
    """Static decode steps for ``batch`` rows over a cache of ``capacity`` positions.

    ``use_graph``: None captures when :func:`graphs_enabled`; True tries to capture (failures are
    logged and fall back to eager); False never captures."""

    def __init__(self, model: ChatGLMForConditionalGeneration, batch: int, capacity: int,
                 use_graph: bool | None = None):
        self.model, self.batch, self.capacity = model, batch, capacity
        device = model.device
        self.cache = KVCache(model.config, batch, capacity, device, model.dtype)
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self._rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.in_use = False
        if use_graph is None:
            use_graph = graphs_enabled(device)
            if device.type == "cuda" and not use_graph:
                log.info("CUDA graphs are off (%s=%s): decode steps run eagerly",
                         ENV_VAR, os.environ.get(ENV_VAR))
        if use_graph:
            try:
                self._capture()
            except BaseException:  # a cancellation in the middle of the capture
                self.release()
                raise

    @property
    def graphed(self) -> bool:
        """True when steps replay a captured CUDA graph."""
        return self._graph is not None

    def _run(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.decode_static(self._ids, self._position, self.cache)

    def _capture(self) -> None:
        device = self._ids.device
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    self._run()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = self._run()
        except Exception:
            log.warning("CUDA graph capture of the decode step failed (batch %d, capacity %d); the same "
                        "static step runs eagerly instead (same computation, slower)", self.batch, self.capacity,
                        exc_info=True)
            return
        self._graph, self._logits = graph, logits
        # The graph reads the RoPE tables it saw at capture; keep them alive even if the model later
        # grows (replaces) its tables for a longer prefill.
        self._rope_tables = self.model.transformer.rotary_pos_emb.tables(self.capacity, device)
        log.info("captured the decode step in a CUDA graph: batch %d, capacity %d, KV cache %.1f MiB",
                 self.batch, self.capacity, self.cache.nbytes / 2**20)

    def begin(self) -> KVCache:
        """Start a new sequence: the cache is emptied (and zeroed) and returned for the prefill."""
        self.cache.reset()
        return self.cache

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append ``input_ids [B, 1]`` at the cache's length and return float32 logits ``[B, vocab]``.
        With a graph the result is the graph's output buffer: read or copy it before the next step."""
        if tuple(input_ids.shape) != (self.batch, 1):
            raise ValueError(f"a decode step takes ids of shape ({self.batch}, 1), got {tuple(input_ids.shape)}")
        cache = self.cache
        cache.reserve(1)
        self._ids.copy_(input_ids)
        self._position.fill_(cache.length)
        if self._graph is not None:
            self._graph.replay()
            logits = self._logits
        else:
            logits = self._run()
        cache.advance(1)
        return logits

    def release(self) -> None:
        """Free the graph, its buffers and the KV cache (idempotent)."""
        self._graph = self._logits = self._rope_tables = None
        self.cache.release()


class DecoderPool:
    """The ``keep`` most recently used decoders of one model, one per (batch, capacity bucket).
    A decoder serves one sequence at a time (:meth:`acquire` / :meth:`give_back`)."""

    def __init__(self, model: ChatGLMForConditionalGeneration, keep: int = KEEP_BUCKETS):
        self.model, self.keep = model, keep
        self._decoders: OrderedDict[tuple[int, int], GraphedDecoder] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, batch: int, needed: int, use_graph: bool | None = None) -> GraphedDecoder | None:
        """A decoder with room for ``needed`` positions, its cache reset; None when that bucket's
        decoder is serving another sequence (the caller then decodes without it)."""
        key = (batch, bucket_capacity(needed, self.model.config.seq_length))
        with self._lock:
            decoder = self._decoders.get(key)
            if decoder is not None and decoder.in_use:
                return None
            if decoder is None:
                self._evict(self.keep - 1)
                decoder = GraphedDecoder(self.model, batch, key[1], use_graph)
                self._decoders[key] = decoder
            self._decoders.move_to_end(key)
            decoder.in_use = True
        try:
            decoder.begin()
        except BaseException:
            self.give_back(decoder)
            raise
        return decoder

    def give_back(self, decoder: GraphedDecoder) -> None:
        """Mark ``decoder`` free for the next sequence; its cache and graph stay allocated."""
        with self._lock:
            decoder.in_use = False
            self._evict(self.keep)

    def _evict(self, at_most: int) -> None:
        for key in [k for k, d in self._decoders.items() if not d.in_use]:
            if len(self._decoders) <= at_most:
                break
            self._decoders.pop(key).release()

    def capacities(self) -> list[tuple[int, int]]:
        """The (batch, capacity) keys held, least recently used first."""
        with self._lock:
            return list(self._decoders)

    def release(self) -> None:
        """Free every decoder that is not serving a sequence."""
        with self._lock:
            self._evict(0)


_pools_lock = threading.Lock()


def decoder_pool(model: ChatGLMForConditionalGeneration) -> DecoderPool:
    """The model's decoder pool (made on first use; it lives as long as the model)."""
    with _pools_lock:
        pool = getattr(model, "_chatglm_decoder_pool", None)
        if pool is None:
            pool = DecoderPool(model)
            model._chatglm_decoder_pool = pool
        return pool


def release_decoders(model: ChatGLMForConditionalGeneration) -> None:
    """Free the model's kept graphs and KV caches (those not serving a sequence)."""
    pool = getattr(model, "_chatglm_decoder_pool", None)
    if pool is not None:
        pool.release()
