"""Concurrent requests batched on one model: iteration-level scheduling by one engine thread.

The engine thread owns the model. Each iteration it admits waiting requests into free slots (each
with a KV cache sized to its own prompt + max_new_tokens), runs one prefill chunk of the oldest
request still reading its prompt, then one decode step for every request that is generating: the
linear layers read the weights once for all rows (:class:`~chatglm.model.cache.RowCaches`), each
row samples with its own parameters and generator; the step's tensors (:class:`~.batch.DecodeBatch`)
are built when its rows change, not every step. Requests join and leave at step boundaries;
one that finishes, fails or is cancelled frees its slot before the next step. Prompts are read in
chunks of ``prefill_chunk`` tokens between decode steps, so running streams keep flowing while a
long prompt is read (the longest gap between two tokens of a stream is reported in ``stats``).

A consumer sees a :class:`TokenStream`: an iterator of token ids; closing it cancels the request.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..model.cache import KVCache, RowCaches
from ..model.transformer import ChatGLMForConditionalGeneration
from .batch import DecodeBatch, min_tokens_stops
from .generation import non_finite_error
from .openmp import release_thread_pool
from .request import MAX_AHEAD, End, Request, TokenStream
from .sampling import NON_FINITE, SamplingParams, new_history, next_tokens, record, row_params

log = logging.getLogger(__name__)

PREFILL_CHUNK = {"cpu": 128, "cuda": 1024}
"""Prompt tokens read per engine iteration, by device type: small enough that streams of other
requests keep flowing (128 tokens of a 6B model take a few seconds on 2 CPU cores), large enough to
keep the prompt matmuls efficient."""


CACHE_BUDGET_FRACTION = 0.5
"""Share of the memory free when serving starts that the KV caches of concurrent requests may take."""


def cache_budget_bytes(device: torch.device) -> int:
    """How many bytes the KV caches of concurrent requests may take on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CACHE_BUDGET_FRACTION)
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return int(info.get("MemAvailable", info.get("MemFree", 0)) * CACHE_BUDGET_FRACTION)



CPU_MAX_BATCH = 4
"""Rows a CPU engine decodes together: on 2 cores the 4-row step costs 1.75-2.5x the one-row step
(with the memory bandwidth of the moment), the 8-row one 2.5-2.7x the 4-row one (README,
Performance), so more rows only add latency."""


def engine_batch(device: torch.device, slots: int) -> int:
    """How many of ``slots`` concurrent requests the engine decodes together on ``device`` (the rest
    wait for a free row): all of them on a GPU, where a decode step is bound by reading the weights."""
    return min(slots, CPU_MAX_BATCH) if device.type == "cpu" else slots


class AtCapacityError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class SchedulerStats:
    steps: int = 0  # decode steps run
    rows: int = 0  # tokens decoded by them (sum of batch sizes)
    longest_stall_s: float = 0.0  # longest gap between two tokens of one stream
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


class Scheduler:
    """Batches the requests of :meth:`submit` on ``model`` (see the module)."""

    def __init__(self, model: ChatGLMForConditionalGeneration, max_batch: int = 4, max_waiting: int = 16,
                 vocab_limit: int | None = None, prefill_chunk: int | None = None,
                 max_cache_bytes: int | None = None):
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.model, self.max_batch, self.max_waiting, self.vocab_limit = model, max_batch, max_waiting, vocab_limit
        self.device = model.device
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK.get(self.device.type, 1024)
        cfg = model.config
        self._bytes_per_position = (2 * cfg.num_layers * cfg.multi_query_group_num * cfg.kv_channels
                                    * torch.empty(0, dtype=model.dtype).element_size())
        self.max_cache_bytes = max_cache_bytes
        self.stats = SchedulerStats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._batch: DecodeBatch | None = None  # the rows of the last decode step (engine thread only)
        self._cond = threading.Condition()
        self._closed = False
        if self.device.type == "cpu":
            release_thread_pool()  # from here on the engine thread runs the model (see .openmp)
        self._thread = threading.Thread(target=self._run, name="chatglm-engine", daemon=True)
        self._thread.start()

    # --- the consumer side -------------------------------------------------------------------------

    def submit(self, input_ids: list[int], max_new_tokens: int, params: SamplingParams, stop_ids: Iterable[int],
               generator: torch.Generator | None = None) -> TokenStream:
        """Queue a request; its ids arrive through the returned stream. Raises
        :class:`AtCapacityError` when every slot is busy and ``max_waiting`` requests already wait."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        need = (len(input_ids) + max_new_tokens) * self._bytes_per_position
        if self.max_cache_bytes is not None and need > self.max_cache_bytes:
            raise AtCapacityError(f"this request needs a {need / 2**20:.0f} MiB KV cache but the service holds at most "
                                  f"{self.max_cache_bytes / 2**20:.0f} MiB; lower max_tokens or shorten the prompt")
        seq = Request(list(input_ids), max_new_tokens, params, set(stop_ids), generator)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            busy = len(self._active) >= self.max_batch
            if busy and len(self._waiting) >= self.max_waiting:
                raise AtCapacityError(f"at capacity: {len(self._active)} predictions running and "
                                      f"{len(self._waiting)} waiting (limits {self.max_batch} and {self.max_waiting}); "
                                      "retry shortly")
            self._waiting.append(seq)
            self._cond.notify()
        return TokenStream(seq, self._wake)

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests now."""
        with self._cond:
            return len(self._active), len(self._waiting)

    def close(self) -> None:
        """Stop the engine thread; requests still queued or running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._runnable():
                    self._cond.wait(timeout=0.05 if self._active else None)
                if self._closed:
                    break
                self._admit()
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # an engine fault fails the running requests, never the thread
                log.exception("engine iteration failed; failing %d running request(s)", len(self._active))
                for seq in list(self._active):
                    self._finish(seq, "failed", exc)
        for seq in list(self._active) + list(self._waiting):
            self._finish(seq, "failed", RuntimeError("the service is shutting down"))

    def _runnable(self) -> bool:
        """Whether some active request can make progress now (cancelled, reading its prompt, or
        with fewer than MAX_AHEAD tokens unread)."""
        return any(s.cancelled.is_set() or s.token is None or s.out.qsize() < MAX_AHEAD for s in self._active)

    def _cache_bytes_live(self) -> int:
        return sum(s.cache.nbytes for s in self._active if s.cache is not None)

    def _admit(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled.is_set()]:
            self._waiting.remove(seq)
            self._end(seq, End("cancelled"))
        while self._waiting and len(self._active) < self.max_batch:
            seq = self._waiting[0]
            need = (len(seq.prompt) + seq.max_new) * self._bytes_per_position
            if self.max_cache_bytes is not None and self._active and self._cache_bytes_live() + need > self.max_cache_bytes:
                break  # waits until running requests free their caches
            self._waiting.popleft()
            self._active.append(seq)

    def _iteration(self) -> None:
        for seq in [s for s in self._active if s.cancelled.is_set()]:
            self._finish(seq, "cancelled")
        reading = [s for s in self._active if s.token is None]
        if reading:
            self._prefill_chunk(reading[0])
        decoding = [s for s in self._active if s.token is not None and s.out.qsize() < MAX_AHEAD]
        if decoding:
            self._decode(decoding)
        else:
            self._batch = None  # nothing to carry over; let finished requests go

    def _prefill_chunk(self, seq: Request) -> None:
        try:
            if seq.cache is None:
                seq.cache = KVCache(self.model.config, 1, len(seq.prompt) + seq.max_new, self.device, self.model.dtype)
                # Every row keeps both kinds of history, so that any rows can batch together.
                seq.history = new_history([seq.prompt], self.model.config.padded_vocab_size, self.device,
                                          seen=True, counts=True)
            chunk = seq.prompt[seq.read:seq.read + self.prefill_chunk]
            x = torch.tensor([chunk], dtype=torch.long, device=self.device)
            pos = torch.arange(seq.read, seq.read + len(chunk), device=self.device)[None]
            logits = self.model(x, pos, seq.cache, last_only=True)[:, -1]
            seq.read += len(chunk)
        except Exception as exc:  # e.g. out of memory for this request's cache: only it fails
            self._finish(seq, "failed", exc)
            return
        if seq.read == len(seq.prompt):
            token = next_tokens(logits, row_params([seq.params], self.device), seq.history, [seq.generator],
                                self.vocab_limit, min_tokens_stops([seq], self.device))
            self._accept(seq, int(token[0]), time.perf_counter())

    def _decode(self, rows: list[Request]) -> None:
        started = time.perf_counter()
        batch = self._batch
        if batch is None or batch.rows != rows:
            batch = self._batch = DecodeBatch(rows, self.device)
        else:
            batch.advance()
        record(batch.history, batch.ids.view(-1))
        caches = RowCaches([s.cache for s in rows], [len(s.prompt) + s.produced - 1 for s in rows])
        logits = self.model(batch.ids, batch.pos, caches, last_only=True)[:, -1]
        tokens = next_tokens(logits, batch.params, batch.history, [s.generator for s in rows], self.vocab_limit,
                             batch.stops)
        batch.tokens = tokens
        now = time.perf_counter()
        self.stats.steps += 1
        self.stats.rows += len(rows)
        self.stats.batch_sizes[len(rows)] += 1
        log.debug("decode step of %d rows in %.1f ms", len(rows), 1e3 * (now - started))
        for seq, token in zip(rows, tokens.tolist()):
            self._accept(seq, token, now)

    def _accept(self, seq: Request, token: int, now: float) -> None:
        """A new token of ``seq``, sampled at ``now`` (the end of its step): emit it, or end the request."""
        if seq.cancelled.is_set():
            return self._finish(seq, "cancelled")
        if token == NON_FINITE:
            return self._finish(seq, "failed", non_finite_error(seq.produced))
        if token in seq.stops:
            return self._finish(seq, "stop_token")
        if seq.times:
            self.stats.longest_stall_s = max(self.stats.longest_stall_s, now - seq.times[-1])
        seq.times.append(now)
        seq.out.put(token)
        seq.produced += 1
        seq.token = token
        if seq.produced >= seq.max_new:
            self._finish(seq, "max_tokens")

    def _finish(self, seq: Request, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if seq in self._active:
                self._active.remove(seq)
        if seq.cache is not None:
            seq.cache.release()
            seq.cache = None
        counter = reason if reason in ("cancelled", "failed") else "finished"
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self._end(seq, End(reason, error))

    @staticmethod
    def _end(seq: Request, end: End) -> None:
        seq.out.put(end)
