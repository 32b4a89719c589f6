"""Scaled dot-product attention for the three shapes of the one forward: a prompt from position 0,
a prompt chunk continuing a cached sequence, and one new token per row over a static cache.

Grouped-query attention: query head ``h`` reads key/value group ``h // (heads / groups)``. Every form
here lets SDPA pick its fused kernels (flash / memory-efficient on CUDA, the flash kernel on CPU):
causal masks are given as ``is_causal`` or a lower-right causal bias, never as a boolean tensor
combined with ``enable_gqa`` (which on CUDA falls to the math kernel and materialises float32 scores
``[B, heads, S, L]``: about 4 GB per layer call for a 1024-token chunk at L = 32K)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .cache import RowCaches


def _repeat_groups(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, G, L, D]`` -> ``[B, heads, L, D]``: one copy per query head of the chunk's keys and values."""
    per_group = heads // k.shape[1]
    return k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)


def _gqa_kwargs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """On CUDA the groups are repeated so that flash / memory-efficient kernels apply; on CPU the
    flash kernel takes ``enable_gqa`` directly (no copy)."""
    if q.device.type == "cuda":
        k, v = _repeat_groups(k, v, q.shape[1])
        return k, v, {}
    return k, v, {"enable_gqa": True}


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``S`` new tokens from position 0 among themselves.
    ``q [B, H, S, D]``, ``k, v [B, G, S, D]`` -> ``[B, H, S, D]``."""
    k, v, extra = _gqa_kwargs(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(q.shape[-1]), **extra)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``S`` of ``L`` positions (a chunk after ``L - S`` cached ones):
    query ``i`` sees keys ``0 .. L - S + i``. ``q [B, H, S, D]``, ``k, v [B, G, L, D]``."""
    S, L = q.shape[2], k.shape[2]
    k, v, extra = _gqa_kwargs(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(S, L),
                                          scale=1.0 / math.sqrt(q.shape[-1]), **extra)


def token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One new token per row over a static cache: ``q [B, H, 1, D]``, ``k, v [B, G, C, D]``,
    ``visible`` bool ``[B, C]`` -> ``[B, H, 1, D]``. The heads of a group become that group's query
    rows, so each group's keys and values are read once, never repeated per head; the mask is tiny
    (one query row), so the math kernel costs nothing here."""
    B, H, _, D = q.shape
    G = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, G, H // G, D), k, v, attn_mask=visible[:, None, None, :],
                                         scale=1.0 / math.sqrt(D))
    return out.reshape(B, H, 1, D)


def row_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowCaches,
                        layer: int) -> torch.Tensor:
    """One new token per row, row ``b`` over its own cache (:class:`RowCaches`): its ``k, v`` are
    written at position ``rows.lengths[b]`` and it attends to positions ``0 .. lengths[b]``.
    ``q [B, H, 1, D]``, ``k, v [B, G, 1, D]`` -> ``[B, H, 1, D]``. Each row computes exactly what
    :func:`token_attention` computes for it alone (the same SDPA call on the same values, with the
    float mask SDPA derives from an all-true boolean one), with the per-row tensor ops kept few."""
    B, H, _, D = q.shape
    G = k.shape[1]
    queries, ks, vs = q.reshape(B, G, H // G, D).split(1), k.split(1), v.split(1)
    scale = 1.0 / math.sqrt(D)
    out = []
    for b, (cache, n) in enumerate(zip(rows.caches, rows.lengths)):
        keys, values = cache.append(layer, n, ks[b], vs[b])
        mask = rows.masks[b] if rows.masks[b].dtype == q.dtype else rows.masks[b].to(q.dtype)
        out.append(F.scaled_dot_product_attention(queries[b], keys, values, attn_mask=mask, scale=scale))
    return torch.cat(out).view(B, H, 1, D)


def attention_peak_bytes(chunk: int, length: int, heads: int, groups: int, head_dim: int, dtype_bytes: int,
                         repeat: bool) -> int:
    """Temporary memory of one chunk's attention with fused kernels: the query chunk, the output and
    (when ``repeat``) the keys and values copied per head; scores are never materialised."""
    kv = 2 * length * heads * head_dim * dtype_bytes if repeat else 0
    return kv + 2 * chunk * heads * head_dim * dtype_bytes
