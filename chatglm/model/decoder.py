"""Who owns the KV cache: decode steps over a static batched cache, replayed from CUDA graphs on GPU.

A :class:`DecodeStep` owns, for ``batch`` rows and one capacity, a :class:`KVCache`, static buffers
for the step's ids and positions ``[batch, 1]``, and on CUDA a captured graph of the model's one-token
forward (whose shapes do not depend on the positions). Prompts are prefilled eagerly, in chunks, into
any row of its cache. Elsewhere (CPU), with ``CHATGLM_CUDA_GRAPH=0``, or when the capture failed (logged
once for that step, never retried), the same forward runs eagerly on the same buffers.

A :class:`DecoderPool` is the one owner of a model's steps. On CPU every request gets a step of its
own, sized to exactly the positions it needs and freed when it ends. On CUDA a request needing ``n``
positions uses the bucket :func:`bucket_capacity` (the next power of two, at least ``MIN_BUCKET``),
so one graph serves every request of the bucket; the ``keep`` most recently used buckets stay
allocated between requests (KV cache ``layers * batch * groups * capacity * head_dim * 2 * dtype
bytes``: 0.94 GB for ChatGLM3-6B fp16 at 32K), and all graphs share one memory pool.
:meth:`DecoderPool.warmup` captures buckets during setup so a first request does not pay for it.
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
"""Set to ``0`` (or ``false``/``no``/``off``) to run decode steps eagerly on CUDA."""
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


class DecodeStep:
    """One-token steps for ``batch`` rows over a cache of ``capacity`` positions (see the module)."""

    def __init__(self, model: ChatGLMForConditionalGeneration, batch: int, capacity: int):
        self.model, self.batch, self.capacity = model, batch, capacity
        device = model.device
        self.cache = KVCache(model.config, batch, capacity, device, model.dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_error: str | None = None
        self._logits: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.in_use = False

    def _run(self, span: int | None) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.ids, self.pos, self.cache, last_only=True, span=span)[:, -1]

    def capture(self, pool=None) -> bool:
        """Capture the step in a CUDA graph (in ``pool``, a graph memory pool handle, when given).
        On failure the reason is logged once and the step stays eager for good. Returns success."""
        if self.graph is not None or self.capture_error is not None:
            return self.graph is not None
        device = self.ids.device
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    self._run(None)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                logits = self._run(None)
        except Exception as exc:
            self.capture_error = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture of the decode step failed (batch %d, capacity %d): %s; this step "
                        "runs eagerly from now on (same numbers, slower)", self.batch, self.capacity,
                        self.capture_error)
            return False
        self.graph, self._logits = graph, logits
        log.info("captured the decode step in a CUDA graph: batch %d, capacity %d, KV cache %.1f MiB",
                 self.batch, self.capacity, self.cache.nbytes / 2**20)
        return True

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def prefill(self, ids: list[int], row: int = 0, start: int = 0) -> torch.Tensor:
        """Write prompt ``ids`` at positions ``start ..`` of cache row ``row`` (one eager chunk); the
        float32 logits of its last position ``[vocab]``."""
        if not ids or start < 0 or start + len(ids) > self.capacity:
            raise ValueError(f"a prefill of {len(ids)} tokens at {start} does not fit the capacity {self.capacity}")
        device = self.ids.device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        pos = torch.arange(start, start + len(ids), device=device)[None]
        with torch.inference_mode():
            return self.model(x, pos, self.cache.rows(row, 1), last_only=True)[0, -1]

    def step(self, ids: torch.Tensor, pos: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """Logits ``[batch, vocab]`` after writing ``ids [batch, 1]`` at ``pos [batch, 1]`` (device
        tensors; no host sync). ``span`` (eager steps only) bounds the positions attended to. The
        result is a fresh tensor, safe to keep while other steps run."""
        with self._lock:  # graphs of one pool share memory: replay and copy out one at a time
            self.ids.copy_(ids)
            self.pos.copy_(pos)
            if self.graph is not None:
                self.graph.replay()
                return self._logits.clone()
            return self._run(span)

    def release(self) -> None:
        """Free the graph, its buffers and the KV cache (idempotent)."""
        self.graph = self._logits = None
        self.cache.release()


class DecoderPool:
    """The one owner of a model's KV caches and decode graphs (see the module)."""

    def __init__(self, model: ChatGLMForConditionalGeneration, keep: int = KEEP_BUCKETS,
                 use_graphs: bool | None = None):
        self.model, self.keep = model, keep
        device = model.device
        self.bucketed = device.type == "cuda"
        self.use_graphs = graphs_enabled(device) if use_graphs is None else use_graphs
        if device.type == "cuda" and not self.use_graphs:
            log.info("CUDA graphs are off (%s=%s): decode steps run eagerly", ENV_VAR, os.environ.get(ENV_VAR))
        self._graph_pool = None
        self._steps: OrderedDict[tuple[int, int], DecodeStep] = OrderedDict()
        self._lock = threading.Lock()

    def capacity_for(self, needed: int) -> int:
        return bucket_capacity(needed, self.model.config.seq_length) if self.bucketed else needed

    def acquire(self, needed: int, batch: int = 1) -> DecodeStep:
        """A step with room for ``needed`` positions per row, for one sequence (or batch) at a time.
        A kept bucket serving another request is not shared: the caller gets a step of its own."""
        key = (batch, self.capacity_for(needed))
        with self._lock:
            kept = self._steps.get(key) if self.bucketed else None
            if kept is not None and not kept.in_use:
                step = kept
            else:
                step = DecodeStep(self.model, batch, key[1])
                if self.bucketed and kept is None:
                    self._evict(self.keep - 1)
                    self._steps[key] = step
            is_kept = self._steps.get(key) is step
            if is_kept:
                self._steps.move_to_end(key)
            step.in_use = True
        if self.use_graphs and is_kept:  # a spare step lives for one request: not worth a capture
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            step.capture(self._graph_pool)
        return step

    def give_back(self, step: DecodeStep) -> None:
        """End a request's use of ``step``: a kept bucket stays allocated, any other is freed."""
        with self._lock:
            step.in_use = False
            if self._steps.get((step.batch, step.capacity)) is not step:
                step.release()
            else:
                self._evict(self.keep)

    def _evict(self, at_most: int) -> None:
        for key in [k for k, s in self._steps.items() if not s.in_use]:
            if len(self._steps) <= at_most:
                break
            self._steps.pop(key).release()

    def warmup(self, needed: int, batch: int = 1) -> DecodeStep:
        """Allocate (and on CUDA capture) the bucket for ``needed`` positions now; returns it unused."""
        step = self.acquire(needed, batch)
        self.give_back(step)
        return step

    def kept(self) -> list[tuple[int, int]]:
        """The (batch, capacity) buckets held, least recently used first."""
        with self._lock:
            return list(self._steps)

    def release(self) -> None:
        """Free every kept step that is not serving a request."""
        with self._lock:
            self._evict(0)
