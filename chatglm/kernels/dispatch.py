"""Chooses how an :class:`~chatglm.quant.Int4Linear` computes.

Backends: ``cpu-int4`` (torch's CPU int4 kernel for decode, an int8 GEMM for prefill; bfloat16
models on CPU), ``triton`` (fused dequantize-and-multiply on CUDA) and ``reference`` (dequantize the
whole weight to the activation dtype, then matmul: exact, slow; float32 models use it so that their
numbers equal the reference implementation's).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..quant import dequantize_int4

BACKENDS = ("auto", "reference", "cpu-int4", "triton")


def int4_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` for an Int4Linear ``layer``."""
    if layer.packed is not None:
        y = layer.packed(x)
    else:
        y = F.linear(x, dequantize_int4(layer.weight, layer.weight_scale, x.dtype))
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y


def _triton_call(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from .triton_int4 import int4_matmul
    lead = x.shape[:-1]
    return int4_matmul(x.reshape(-1, x.shape[-1]), weight, scale).reshape(*lead, weight.shape[0])


def choose_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend that runs for a model on ``device`` computing in ``dtype``."""
    if device.type == "cuda":
        from . import triton_int4
        return "triton" if triton_int4.is_available() else "reference"
    if device.type == "cpu" and dtype == torch.bfloat16:
        from . import cpu_int4
        return "cpu-int4" if cpu_int4.is_available() else "reference"
    return "reference"


def prepare_model(model: torch.nn.Module, backend: str = "auto") -> str:
    """Prepare every Int4Linear of ``model`` for ``backend`` (``auto``: :func:`choose_backend`) and
    return the backend's name. ``cpu-int4`` repacks each weight for this CPU and drops the official
    tensor, so a prepared model holds its int4 weights once."""
    from ..quant import Int4Linear
    if backend not in BACKENDS:
        raise ValueError(f"unknown int4 backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return "none"
    if backend == "auto":
        backend = choose_backend(layers[0].weight.device, model.dtype)
    for layer in layers:
        if backend == "reference":
            layer.packed = None
        elif backend == "triton":
            layer.packed = functools.partial(_triton_call, weight=layer.weight, scale=layer.weight_scale)
        else:
            from . import cpu_int4
            if layer.weight is None:
                continue  # already packed
            layer.packed = functools.partial(cpu_int4.matmul, w=cpu_int4.pack(layer.weight, layer.weight_scale))
            layer.weight = None
    return backend
