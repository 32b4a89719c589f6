"""The ChatGLM2/3 transformer. Module and parameter names mirror the official state-dict keys
(``transformer.encoder.layers.N.self_attention.query_key_value.weight`` ...), so loading is a strict
name-for-name mapping. Linear layers are plain ``nn.Linear``; quantization swaps them elsewhere."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from ..config import ChatGLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE on the first half of each head dimension, interleaved pairs ``(2i, 2i+1)``,
    base ``10000 * rope_ratio``. Tables are float32 whatever the compute dtype."""

    def __init__(self, rot_dim: int, rope_ratio: float):
        super().__init__()
        self.rot_dim = rot_dim
        self.base = 10000.0 * rope_ratio
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < length or self._cos.device != device:
            n = max(length, 2 * self._cos.shape[0], 256)
            exponent = torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device) / self.rot_dim
            inv_freq = 1.0 / (self.base ** exponent)
            angles = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)
            self._cos, self._sin = angles.cos(), angles.sin()  # [n, rot_dim/2]
        return self._cos, self._sin

    def at(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[length, rot_dim/2]`` for positions ``start .. start+length-1``."""
        cos_t, sin_t = self.tables(start + length, device)
        return cos_t[start:start + length], sin_t[start:start + length]


class StaticStep(NamedTuple):
    """Where a static decode step writes (``position``, long ``[1]``) and what it attends to
    (``mask``, bool ``[1, 1, 1, capacity]``), both on the model's device."""

    position: torch.Tensor
    mask: torch.Tensor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x[..., :2*cos.shape[-1]]`` (x ``[B, heads, S, D]``) in float32."""
    rot_dim = 2 * cos.shape[-1]
    rot = x[..., :rot_dim].float().unflatten(-1, (-1, 2))
    x0, x1 = rot[..., 0], rot[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), x[..., rot_dim:]), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels
        self.query_key_value = nn.Linear(cfg.hidden_size, cfg.qkv_out_features, bias=cfg.add_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None, layer: int, static: StaticStep | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        qkv = self.query_key_value(x)
        q_size, kv_size = self.heads * self.head_dim, self.groups * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = k.view(B, S, self.groups, self.head_dim).transpose(1, 2)  # [B, G, S, D]
        v = v.view(B, S, self.groups, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if static is not None:  # static-shape step: write at the position, attend over the capacity
            k, v = cache.write_at(layer, static.position, k, v)  # [B, G, capacity, D]
            return self.dense(self._attend_one_token(q, k, v, static.mask))
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # [B, G, start+S, D]
        if S == 1:
            return self.dense(self._attend_one_token(q, k, v, None))
        if start == 0:
            mask, causal = None, True
        else:
            qpos = torch.arange(start, start + S, device=x.device)[:, None]
            mask, causal = torch.arange(start + S, device=x.device)[None, :] <= qpos, False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             scale=1.0 / math.sqrt(self.head_dim), enable_gqa=True)
        return self.dense(out.transpose(1, 2).reshape(B, S, q_size))

    def _attend_one_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of one new token per row (``q [B, H, 1, D]``, ``k, v [B, G, L, D]``) -> ``[B, 1, H*D]``.
        The query heads of a group become that group's query rows (head ``h`` reads group
        ``h // (heads/groups)``, as with ``enable_gqa``), so keys and values are read once and never
        repeated per head."""
        B = q.shape[0]
        q = q.reshape(B, self.groups, self.heads // self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        return out.reshape(B, 1, self.heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # first half is the gate
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None,
                layer: int, static: StaticStep | None = None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), rope, cache, layer, static)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        # nn.Embedding's own initialisation, except on the meta device (where the loader builds the
        # model): there normal_ would import torch's Python meta kernels, ~2 s of setup.
        weight = torch.empty(cfg.padded_vocab_size, cfg.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size, _weight=weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class GLMTransformer(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)


class ChatGLMModel(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.embedding = Embedding(cfg)
        self.rotary_pos_emb = RotaryEmbedding(cfg.kv_channels // 2, cfg.rope_ratio)
        self.encoder = GLMTransformer(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)


class ChatGLMForConditionalGeneration(nn.Module):
    """``model(input_ids[B, S]) -> logits[B, S, vocab]`` (float32). With ``cache`` the new tokens
    continue the cached sequence; ``last_only`` computes logits for the last position only."""

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = ChatGLMModel(cfg)

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        t = self.transformer
        start = cache.length if cache is not None else 0
        S = input_ids.shape[1]
        if cache is not None:
            cache.reserve(S)
        rope = t.rotary_pos_emb.at(start, S, input_ids.device)
        x = t.embedding(input_ids)
        for i, layer in enumerate(t.encoder.layers):
            x = layer(x, rope, cache, i)
        if cache is not None:
            cache.advance(S)
        if last_only:
            x = x[:, -1:]
        x = t.encoder.final_layernorm(x)
        return t.output_layer(x).float()

    def decode_static(self, input_ids: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step whose shapes do not depend on the position: ``input_ids [B, 1]`` are
        written into ``cache`` at ``position`` (long ``[1]`` on the model's device, the same for every
        row) and attend to cache positions ``<= position``; returns float32 logits ``[B, vocab]``.

        No host synchronisation and no branch on tensor values, so a CUDA graph can capture it. The
        cache's ``length`` is not read or advanced here: the caller keeps it (see chatglm.graph).
        Positions after ``position`` must hold finite values (a zeroed cache does)."""
        t = self.transformer
        device = input_ids.device
        cos_t, sin_t = t.rotary_pos_emb.tables(cache.capacity, device)
        rope = cos_t.index_select(0, position), sin_t.index_select(0, position)  # [1, rot_dim/2]
        mask = (torch.arange(cache.capacity, device=device) <= position).view(1, 1, 1, -1)
        static = StaticStep(position, mask)
        x = t.embedding(input_ids)
        for i, layer in enumerate(t.encoder.layers):
            x = layer(x, rope, cache, i, static)
        x = t.encoder.final_layernorm(x[:, -1])
        return t.output_layer(x).float()
