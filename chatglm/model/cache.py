"""A static key/value cache: allocated once per request at the size the request needs (or, for the
CUDA-graph decoder of :mod:`chatglm.graph`, once per capacity bucket and reused across requests).

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
    """Per-layer keys and values ``[batch, groups, capacity, head_dim]`` plus the filled length."""

    def __init__(self, cfg: ChatGLMConfig, batch: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype):
        global _live, _live_bytes, _allocated, _last_capacity
        self.released = True  # until the tensors exist, so a failed allocation is never counted
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        shape = (cfg.num_layers, batch, cfg.multi_query_group_num, capacity, cfg.kv_channels)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0
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
        with _lock:
            if self.released:
                return
            self.released = True
            _live -= 1
            _live_bytes -= self._nbytes
        del self.k, self.v

    def __del__(self) -> None:
        self.release()

    def reserve(self, n: int) -> None:
        if self.released:
            raise RuntimeError("KV cache used after release()")
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache full: {self.length} cached + {n} new tokens > capacity {self.capacity}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``k, v [B, G, S, D]`` after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def write_at(self, layer: int, position: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's ``k, v [B, G, 1, D]`` at ``position`` (long ``[1]``, a device tensor, so
        the write needs no host value) and return the whole capacity ``[B, G, capacity, D]``.
        ``length`` is left to the caller."""
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(2, position, k)
        values.index_copy_(2, position, v)
        return keys, values

    def reset(self) -> None:
        """Empty the cache for a new sequence: length 0 and every key and value zeroed, so that
        positions a static step masks out hold finite numbers (0 * NaN would poison attention)."""
        if self.released:
            raise RuntimeError("KV cache used after release()")
        self.length = 0
        self.k.zero_()
        self.v.zero_()
