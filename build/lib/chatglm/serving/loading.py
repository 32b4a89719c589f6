"""Loading a model for inference: the int4 backend is chosen by its self-check on the model's real
layer shapes, then each int4 layer is packed for it as soon as the loader has filled it."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..config import ChatGLMConfig
from ..model.transformer import ChatGLMForConditionalGeneration
from ..quant.dispatch import BACKENDS, check_dtype, prepare_layer, prepare_model
from ..quant.selfcheck import select_backend
from ..weights.checkpoint import load_model


def int4_shapes(cfg: ChatGLMConfig) -> list[tuple[int, int]]:
    """``(out_features, in_features)`` of the four int4 linears of every block."""
    return [(cfg.qkv_out_features, cfg.hidden_size), (cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels),
            (2 * cfg.ffn_hidden_size, cfg.hidden_size), (cfg.hidden_size, cfg.ffn_hidden_size)]


def load_for_inference(model_dir: str | Path, config: ChatGLMConfig, device: torch.device, dtype: torch.dtype,
                       quantize: int | None = None, backend: str = "auto") -> tuple[ChatGLMForConditionalGeneration, str]:
    """The model of ``model_dir`` on ``device`` computing in ``dtype``, and its int4 backend's name
    (``none`` for a float model). ``backend="auto"`` takes the fastest one that passes the self-check."""
    check_dtype(device, dtype)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown int4 backend {backend!r}; allowed: auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = select_backend(device, dtype, int4_shapes(config))
    model = load_model(model_dir, config, device=device, dtype=dtype, quantize=quantize,
                       on_int4_layer=functools.partial(prepare_layer, backend=backend))
    return model, prepare_model(model, backend)
