"""One request of the scheduler: its state, and the stream its consumer reads token ids from."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch

from ..model.cache import KVCache
from .sampling import History, SamplingParams

MAX_AHEAD = 8
"""Tokens a request may have waiting for its consumer; beyond that its row sits out the next steps
(so a slow reader, or one that stopped reading, costs no decode work and cancels take effect at once)."""


class End:
    """Put on a request's queue last: why it ended, and the exception for a failed one."""
    def __init__(self, reason: str, error: BaseException | None = None):
        self.reason, self.error = reason, error


class Request:
    """One request's state, shared by the engine thread (which writes it) and its :class:`TokenStream`."""
    def __init__(self, ids: list[int], max_new: int, params: SamplingParams, stops: set[int],
                 generator: torch.Generator | None):
        self.prompt, self.max_new, self.params, self.stops, self.generator = ids, max_new, params, stops, generator
        self.out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.cache: KVCache | None = None
        self.history: History | None = None
        self.read = 0  # prompt tokens prefilled
        self.token: int | None = None  # the last token, not yet written to the cache
        self.produced = 0
        self.times: list[float] = []  # engine clock (time.perf_counter) when each emitted token was sampled


class TokenStream:
    """The token ids of one request, as the engine produces them. ``close()`` cancels it."""

    def __init__(self, seq: Request, wake: Callable[[], None]):
        self._seq, self._wake = seq, wake  # wake: tells the engine thread to look at this request again
        self.reason = ""

    def __iter__(self) -> Iterator[int]:
        return self

    @property
    def times(self) -> list[float]:
        """When the engine sampled each token emitted so far (``time.perf_counter``): tokens of one
        decode step share one time, so throughput counts by step, not by when a reader woke up."""
        return list(self._seq.times)

    def __next__(self) -> int:
        item = self._seq.out.get()
        if self._seq.out.qsize() < MAX_AHEAD // 2:
            self._wake()  # the engine may be holding this row back
        if isinstance(item, End):
            self._seq.out.put(item)  # later calls end too
            self.reason = item.reason
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        if not self._seq.cancelled.is_set():
            self._seq.cancelled.set()
            self._wake()

    def __del__(self) -> None:
        self.close()
