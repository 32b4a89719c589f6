"""The ChatGLM2/3 transformer. Module and parameter names mirror the official state-dict keys
(``transformer.encoder.layers.N.self_attention.query_key_value.weight`` ...), so loading is a strict
name-for-name mapping. Linear layers are plain ``nn.Linear``; quantization swaps them elsewhere."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import chunk_attention, prompt_attention, row_token_attention, token_attention
from .cache import KVCache, RowCaches
from ..config import ChatGLMConfig
from ..quant.kernels import cpu_fused


class Step(NamedTuple):
    """What one forward call does, decided once for all layers (see the model's docstring)."""

    cache: KVCache | None
    input_pos: torch.Tensor  # long [B, S]
    start: int  # first position of a chunk (S > 1)
    visible: torch.Tensor | None  # bool [B, capacity] for a one-token step, else None
    span: int | None  # cache positions a one-token step attends to at most


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_fused.applies(x):
            return cpu_fused.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE on the first half of each head dimension, interleaved pairs ``(2i, 2i+1)``,
    base ``10000 * rope_ratio``. Tables are float32 whatever the compute dtype, built once per device
    for the whole context and never replaced (a captured CUDA graph keeps reading the same memory)."""

    def __init__(self, rot_dim: int, rope_ratio: float, max_positions: int):
        super().__init__()
        self.rot_dim, self.max_positions = rot_dim, max_positions
        self.base = 10000.0 * rope_ratio
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[max_positions, rot_dim/2]`` on ``device``."""
        if device not in self._tables:
            exponent = torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device) / self.rot_dim
            inv_freq = 1.0 / (self.base ** exponent)
            angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
            self._tables[device] = angles.cos(), angles.sin()
        return self._tables[device]

    def at(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, 1, S, rot_dim/2]`` for positions ``input_pos [B, S]`` (a gather: no host sync)."""
        cos_t, sin_t = self.tables(input_pos.device)
        flat = input_pos.reshape(-1)
        shape = (input_pos.shape[0], 1, input_pos.shape[1], -1)
        return cos_t.index_select(0, flat).view(shape), sin_t.index_select(0, flat).view(shape)


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step, layer: int) -> torch.Tensor:
        B, S, _ = x.shape
        q_size, kv_size = self.heads * self.head_dim, self.groups * self.head_dim
        q, k, v = self.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = k.view(B, S, self.groups, self.head_dim).transpose(1, 2)  # [B, G, S, D]
        v = v.view(B, S, self.groups, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cache = step.cache
        if cache is None:
            out = prompt_attention(q, k, v)
        elif isinstance(cache, RowCaches):
            out = row_token_attention(q, k, v, cache, layer)
        elif step.visible is not None:  # one token per row, written at each row's own position
            keys, values = cache.write_rows(layer, step.input_pos, k, v)
            span = step.span or cache.capacity
            out = token_attention(q, keys[:, :, :span], values[:, :, :span], step.visible[:, :span])
        else:  # a chunk at positions start .. start+S-1 of every row
            keys, values = cache.write_span(layer, step.start, k, v)
            out = prompt_attention(q, k, v) if step.start == 0 else chunk_attention(q, keys, values)
        return self.dense(out.transpose(1, 2).reshape(B, S, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_h_to_4h(x)
        if cpu_fused.applies(h):
            return self.dense_4h_to_h(cpu_fused.swiglu(h))
        gate, up = h.chunk(2, dim=-1)  # first half is the gate
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step, layer: int) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), rope, step, layer)
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
        self.rotary_pos_emb = RotaryEmbedding(cfg.kv_channels // 2, cfg.rope_ratio, cfg.seq_length)
        self.encoder = GLMTransformer(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)


class ChatGLMForConditionalGeneration(nn.Module):
    """``model(input_ids[B, S], input_pos, cache) -> logits[B, S, vocab]`` (float32): one forward for
    whole prompts, prompt chunks and decode steps.

    - no ``cache``: a whole sequence from position 0 (``input_pos`` may be omitted);
    - ``S > 1`` with ``cache``: a chunk at the same contiguous positions ``start .. start+S-1`` of
      every row (``input_pos [B, S]``), written into the cache, attending to the cached positions
      before it (chunked prefill);
    - ``S == 1`` with ``cache``: one token per row, each at its own position ``input_pos [B, 1]`` (rows
      at different lengths decode together). Shapes do not depend on the positions, nothing is read
      back to the host and nothing branches on tensor values, so this step can be captured in a CUDA
      graph. Each row attends to its positions ``<= input_pos``, over the first ``span`` cache
      positions when given (a host-side bound that eager callers know), else the whole capacity.
      With :class:`~chatglm.model.cache.RowCaches` each row has a cache of its own size instead
      (concurrent requests): the linear layers run once for all rows, attention row by row.

    ``last_only`` computes logits for the last position only."""

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = ChatGLMModel(cfg)

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the embedding table may be kept in a narrower stored dtype)."""
        return self.transformer.encoder.final_layernorm.weight.dtype

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | RowCaches | None = None,
                last_only: bool = False, span: int | None = None) -> torch.Tensor:
        step = self._step(input_ids, input_pos, cache, span)
        t = self.transformer
        rope = t.rotary_pos_emb.at(step.input_pos)
        x = t.embedding(input_ids).to(self.dtype)
        for i, layer in enumerate(t.encoder.layers):
            x = layer(x, rope, step, i)
        if last_only:
            x = x[:, -1:]
        x = t.encoder.final_layernorm(x)
        return t.output_layer(x).float()

    def _step(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None, cache: KVCache | RowCaches | None,
              span: int | None) -> Step:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        limit = cache.capacity if cache is not None else self.config.seq_length
        if input_pos is None:
            if cache is not None:
                raise ValueError("a forward over a cache needs input_pos [batch, seq]: where the tokens go")
            if S > limit:
                raise ValueError(f"{S} tokens exceed the model's context of {limit}")
            input_pos = torch.arange(S, device=input_ids.device).expand(B, S)
        if tuple(input_pos.shape) != (B, S):
            raise ValueError(f"input_pos must be [batch, seq] = {(B, S)}, got {tuple(input_pos.shape)}")
        if cache is None:
            return Step(None, input_pos, 0, None, None)
        if cache.batch != B:
            raise ValueError(f"the cache holds {cache.batch} rows but input_ids has {B}")
        if isinstance(cache, RowCaches):
            if S != 1:
                raise ValueError("row caches take one-token steps only; prefill each row's own cache")
            return Step(cache, input_pos, 0, None, None)
        if S == 1:
            positions = torch.arange(cache.capacity, device=input_ids.device)
            if span is not None and not 0 < span <= cache.capacity:
                raise ValueError(f"span={span} must lie in 1..{cache.capacity} (the cache capacity)")
            return Step(cache, input_pos, 0, positions[None, :] <= input_pos, span)
        start = int(input_pos[0, 0])  # one host read per prompt chunk
        want = torch.arange(start, start + S, device=input_pos.device).expand(B, S)
        if start < 0 or start + S > cache.capacity or not torch.equal(input_pos, want):
            raise ValueError(f"a chunk of {S} tokens needs the same contiguous positions start .. start+{S - 1} "
                             f"in every row, within the cache capacity {cache.capacity}")
        return Step(cache, input_pos, start, None, None)
