"""Loading a model for inference: the int4 backend is chosen by its self-check on the model's real
layer shapes, then each int4 layer is packed for it as soon as the loader has filled it. Where the
output layer becomes an int8 copy, it is quantized from the stored weight, which is then released."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..config import ChatGLMConfig
from ..model.transformer import ChatGLMForConditionalGeneration
from ..quant.linear import Int4Linear
from ..quant.dispatch import BACKENDS, check_dtype, int8_head_used, prepare_layer, prepare_model
from ..quant.selfcheck import select_backend
from ..weights.checkpoint import find_weight_files, load_model
from ..weights.mapped import prefetch, release


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
    files = find_weight_files(model_dir)
    if files.kind == "safetensors":
        prefetch(files.files)  # the disk reads while the self-check runs
    if backend == "auto":
        backend = select_backend(device, dtype, int4_shapes(config))
    head = "transformer.output_layer.weight"
    model = load_model(model_dir, config, device=device, dtype=dtype, quantize=quantize,
                       on_int4_layer=functools.partial(_prepare_layer, backend=backend),
                       keep_stored=(head,) if int8_head_used(backend) else ())
    stored_head = model.transformer.output_layer.weight
    backend = prepare_model(model, backend)
    _release_unless_kept([stored_head], model.transformer.output_layer)
    return model, backend


def _prepare_layer(layer: Int4Linear, backend: str) -> None:
    stored = [layer.weight, layer.weight_scale]
    prepare_layer(layer, backend)
    _release_unless_kept(stored, layer)


def _release_unless_kept(stored: list[torch.Tensor], module: torch.nn.Module) -> None:
    """Release the mapped pages of each ``stored`` tensor that ``module`` no longer holds (a backend that
    repacks the weights keeps only its copy)."""
    kept = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers()) if t is not None}
    for t in stored:
        if t is not None and t.data_ptr() not in kept:
            release(t)
