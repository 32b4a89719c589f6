"""A static key/value cache with a batch dimension: ``[layers, batch, groups, capacity, head_dim]``.
The model writes each token at its row's position (``input_pos``); which positions hold what is the
caller's business (see :mod:`chatglm.model.slots`). Allocated zeroed, so positions a step masks out
hold finite numbers (0 * NaN would poison attention).

Every cache is counted while it is alive (from allocation until :meth:`KVCache.release`, or until it
is garbage-collected): :func:`cache_usage` reports the live count and bytes and the capacity of the
most recent allocation, so tests and operators can see that a finished or cancelled request freed
its cache and that each request got only the room it needed."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..config import ChatGLMConfig

_lock = threading.RLock()  # re-entrant: release() may run from __del__ while the lock is held
_live = 0
_live_bytes = 0
_allocated = 0
_last_capacity = 0


@dataclass(frozen=True)
class CacheUsage:
    """A snapshot of the KV cache counters (process-wide)."""

    live: int  # caches allocated and not yet released
    live_bytes: int  # their key + value bytes
    allocated: int  # caches ever allocated
    last_capacity: int  # token capacity of the most recent allocation (0 before the first)


def cache_usage() -> CacheUsage:
    """The current counters."""
    with _lock:
        return CacheUsage(_live, _live_bytes, _allocated, _last_capacity)


class KVCache:
    """Per-layer keys and values ``[batch, groups, capacity, head_dim]`` for ``batch`` rows."""

    def __init__(self, cfg: ChatGLMConfig, batch: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype):
        global _live, _live_bytes, _allocated, _last_capacity
        self.released = True  # until the tensors exist, so a failed allocation is never counted
        if capacity <= 0 or batch <= 0:
            raise ValueError(f"KV cache batch and capacity must be positive, got {batch} and {capacity}")
        shape = (cfg.num_layers, batch, cfg.multi_query_group_num, capacity, cfg.kv_channels)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch, self.capacity = batch, capacity
        self._nbytes = self.k.numel() * self.k.element_size() * 2
        with _lock:
            _live += 1
            _live_bytes += self._nbytes
            _allocated += 1
            _last_capacity = capacity
            self.released = False

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def release(self) -> None:
        """Free the key/value tensors now (idempotent); the cache cannot be used afterwards."""
        global _live, _live_bytes
        if getattr(self, "_view", False):
            return
        with _lock:
            if self.released:
                return
            self.released = True
            _live -= 1
            _live_bytes -= self._nbytes
        self.__dict__.pop("_layers", None)  # views that would keep the tensors alive
        del self.k, self.v

    def __del__(self) -> None:
        self.release()

    def _check(self) -> None:
        if self.released:
            raise RuntimeError("KV cache used after release()")

    def rows(self, start: int, count: int) -> "KVCache":
        """A cache over rows ``start .. start+count-1`` sharing this one's memory (for prefilling one
        row of a batch); it is not counted separately and releasing it frees nothing."""
        self._check()
        if not (0 <= start and count > 0 and start + count <= self.batch):
            raise ValueError(f"rows {start}..{start + count - 1} are outside the cache's {self.batch} rows")
        if start == 0 and count == self.batch:
            return self
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:start + count], self.v[:, start:start + count]
        view.batch, view.capacity, view._nbytes, view.released = count, self.capacity, 0, False
        view._view = True
        return view

    def write_span(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, G, S, D]`` at positions ``start .. start+S-1`` of every row; return the
        keys and values of positions ``0 .. start+S-1``."""
        self._check()
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def append(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token ``k, v [1, G, 1, D]`` at position ``pos`` of a one-row cache; return the
        keys and values of positions ``0 .. pos``. The same values as :meth:`write_span`, with fewer
        tensor ops: a decode step calls this once per row and layer."""
        layers = self.__dict__.get("_layers")
        if layers is None:
            self._check()
            layers = self._layers = (self.k.unbind(0), self.v.unbind(0))
        keys, values = layers[0][layer], layers[1][layer]
        keys.narrow(2, pos, 1).copy_(k)
        values.narrow(2, pos, 1).copy_(v)
        return keys.narrow(2, 0, pos + 1), values.narrow(2, 0, pos + 1)

    def write_rows(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token per row, ``k, v [B, G, 1, D]``, at that row's position ``input_pos [B, 1]``
        (a device tensor: no host value needed); return the whole ``[B, G, capacity, D]``."""
        self._check()
        keys, values = self.k[layer], self.v[layer]
        index = input_pos.view(-1, 1, 1, 1).expand_as(k)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        return keys, values


class RowCaches:
    """One-token steps for rows that each own a cache of their own size (concurrent requests):
    row ``b`` writes into ``caches[b]`` at position ``lengths[b]`` and attends to its positions
    ``0 .. lengths[b]``. The linear layers still run once for all rows; only attention is per row.

    ``masks[b]`` is row ``b``'s attention mask ``[1, 1, 1, lengths[b] + 1]`` in the caches' dtype: all
    zeros (every position written so far is visible), what SDPA makes of an all-true boolean mask,
    built once per step for every layer."""

    def __init__(self, caches: list[KVCache], lengths: list[int]):
        if len(caches) != len(lengths) or not caches:
            raise ValueError(f"RowCaches needs one length per cache, got {len(caches)} caches, {len(lengths)} lengths")
        for c, n in zip(caches, lengths):
            c._check()
            if c.batch != 1 or not 0 <= n < c.capacity:
                raise ValueError(f"a row cache must hold one row with room at position {n} (capacity {c.capacity})")
        self.caches, self.lengths = caches, lengths
        self.batch = len(caches)
        self.capacity = max(c.capacity for c in caches)
        zeros = torch.zeros(1, 1, 1, max(lengths) + 1, dtype=caches[0].k.dtype, device=caches[0].k.device)
        self.masks = [zeros[..., :n + 1] for n in lengths]
