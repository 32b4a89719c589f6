"""A static key/value cache: allocated once per request at the size the request needs."""
from __future__ import annotations

import torch

from .config import ChatGLMConfig


class KVCache:
    """Per-layer keys and values ``[batch, groups, capacity, head_dim]`` plus the filled length."""

    def __init__(self, cfg: ChatGLMConfig, batch: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype):
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        shape = (cfg.num_layers, batch, cfg.multi_query_group_num, capacity, cfg.kv_channels)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reserve(self, n: int) -> None:
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
