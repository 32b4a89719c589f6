"""Chooses how an :class:`~chatglm.quant.Int4Linear` computes.

Backends: ``cpu-int4`` (torch's CPU int4 kernel for decode, an int8 GEMM for prefill; bfloat16
models on CPU), ``cuda-int4pack`` (torch's tinygemm kernel: bfloat16 models on CUDA GPUs of compute
capability 8.0+, after a self-check), ``triton`` (fused dequantize-and-multiply on any CUDA GPU) and
``reference`` (dequantize the whole weight to the activation dtype, then matmul: exact, slow; float32
models use it so that their numbers equal the reference implementation's).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .int4 import dequantize_int4

BACKENDS = ("auto", "reference", "cpu-int4", "cuda-int4pack", "triton")
_DROPS_WEIGHT = ("cpu-int4", "cuda-int4pack")  # backends that keep only their packed copy


def int4_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` for an Int4Linear ``layer``."""
    if layer.packed is not None:
        y = layer.packed(x)
    else:
        y = F.linear(x, dequantize_int4(layer.weight, layer.weight_scale, x.dtype))
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y


class RowLinear(nn.Module):
    """A bias-free linear over ``weight [out, in]`` that multiplies a single input row with
    ``torch.mv``: for bfloat16 on CPU that GEMV streams the weight ~1.7x faster than ``F.linear``
    (the decode step's output layer). Several rows use ``F.linear``. The parameter keeps its name."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return torch.mv(self.weight, x.reshape(-1)).reshape(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight)


def _triton_call(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from .kernels.triton_int4 import int4_matmul
    lead = x.shape[:-1]
    return int4_matmul(x.reshape(-1, x.shape[-1]), weight, scale).reshape(*lead, weight.shape[0])


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPU (the fast int4 kernel needs it) and on CUDA GPUs of capability 8.0+ (tinygemm);
    float16 on older GPUs such as the T4, which have no bfloat16 tensor cores."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def choose_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend that runs for a model on ``device`` computing in ``dtype``."""
    if device.type == "cuda":
        from .kernels import cuda_int4pack
        from .kernels import triton_int4
        if dtype == torch.bfloat16 and cuda_int4pack.is_available(torch.device(device)):
            return "cuda-int4pack"
        return "triton" if triton_int4.is_available() else "reference"
    if device.type == "cpu" and dtype == torch.bfloat16:
        from .kernels import cpu_int4
        return "cpu-int4" if cpu_int4.is_available() else "reference"
    return "reference"


def prepare_layer(layer, backend: str) -> None:
    """Prepare one loaded Int4Linear for ``backend`` (not ``auto``); a no-op for a layer that is
    already packed for it. ``cuda-int4pack`` serves the shapes tinygemm takes, Triton the others."""
    if layer.weight is None:
        if getattr(layer, "backend", None) != backend:
            raise ValueError(f"this int4 layer was packed for {getattr(layer, 'backend', None)} and no longer "
                             f"holds the official weight; reload the model to use the {backend!r} backend")
        return
    if backend == "cuda-int4pack":
        from .kernels import cuda_int4pack
        if not cuda_int4pack.is_available(layer.weight.device):
            raise ValueError(f"the cuda-int4pack backend is not available on {layer.weight.device}: it needs a "
                             "CUDA GPU of compute capability 8.0+ whose tinygemm kernel passes the self-check "
                             "(see the log); use 'triton' or 'auto'")
        if not cuda_int4pack.supports_shape(layer.out_features, layer.in_features):
            backend = "triton"
    if backend == "reference":
        layer.packed = None
    elif backend == "triton":
        layer.packed = functools.partial(_triton_call, weight=layer.weight, scale=layer.weight_scale)
    elif backend == "cpu-int4":
        from .kernels import cpu_int4
        layer.packed = functools.partial(cpu_int4.matmul, w=cpu_int4.pack(layer.weight, layer.weight_scale,
                                                                           inplace=True))
    elif backend == "cuda-int4pack":
        from .kernels import cuda_int4pack
        layer.packed = functools.partial(cuda_int4pack.matmul, w=cuda_int4pack.pack(layer.weight, layer.weight_scale))
    else:
        raise ValueError(f"unknown int4 backend {backend!r}; allowed: {', '.join(BACKENDS[1:])}")
    layer.backend = backend
    if backend in _DROPS_WEIGHT:
        layer.weight = None


def prepare_model(model: torch.nn.Module, backend: str = "auto") -> str:
    """Prepare every Int4Linear of ``model`` for ``backend`` (``auto``: :func:`choose_backend`) and
    return the backend's name. ``cpu-int4`` and ``cuda-int4pack`` repack each weight and drop the
    official tensor, so a prepared model holds its int4 weights once; the output layer becomes a
    :class:`RowLinear` (same weight) whose decode GEMV is faster."""
    from .linear import Int4Linear
    if backend not in BACKENDS:
        raise ValueError(f"unknown int4 backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return "none"
    if backend == "auto":
        backend = choose_backend(layers[0].weight_scale.device, model.dtype)
    for layer in layers:
        prepare_layer(layer, backend)
    head = model.transformer.output_layer if hasattr(model, "transformer") else None
    if backend == "cpu-int4" and isinstance(head, nn.Linear) and head.bias is None:
        model.transformer.output_layer = RowLinear(head.weight)
    return backend
