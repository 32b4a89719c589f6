"""How an :class:`~chatglm.quant.linear.Int4Linear` computes: the int4 backends.

``cpu-native`` (our C++ kernels on the official bytes, nothing repacked: q4 x q8 GEMV for up to 8
rows, an unpack + oneDNN GEMM for prefill, and an int8 output layer; bfloat16 / float16 models on
CPU, where the extension builds), ``cpu-int4`` (torch's CPU int4 kernel for decode, an int8 GEMM for prefill; bfloat16 models on CPU),
``cuda-int4pack`` (torch's tinygemm kernel for decode on CUDA GPUs of capability 8.0+, bfloat16),
``triton`` (fused dequantize-and-multiply on any CUDA GPU) and ``reference`` (dequantize the whole
weight to the activation dtype, then ``F.linear``: plain torch, exact, always works; float32 models
use it so that their numbers equal the reference implementation's). On CUDA, inputs of more than
:data:`CUDA_DEQUANT_MIN_ROWS` rows (prefill) are dequantized and multiplied by cuBLAS whatever the
backend, which beats the GEMV-shaped kernels there.

A backend prepares a layer by registering its packed tensors as buffers of the layer (so ``.to()``
and ``state_dict()`` see them) and setting ``layer.kernel`` to itself. Which backend a model gets is
decided by :mod:`chatglm.quant.selfcheck`, which runs each candidate on the real layer shapes first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int4 import dequantize_int4
from .linear import Int4Linear

CUDA_DEQUANT_MIN_ROWS = 16
"""On CUDA, inputs with more rows than this dequantize the weight and run one cuBLAS GEMM."""


class Backend:
    """One way to compute an int4 layer. Subclasses set ``name`` and override the methods."""

    name = "reference"
    drops_weight = False  # True when the packed copy replaces the official ``weight`` buffer

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot serve a model on ``device`` in ``dtype``; None when it can."""
        return None

    def prepare(self, layer: Int4Linear) -> None:
        """Register this backend's tensors on ``layer`` (called once, after loading)."""

    def matmul(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int4(layer.weight, layer.weight_scale, x.dtype))


def _cuda_prefill(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor | None:
    if x.numel() > CUDA_DEQUANT_MIN_ROWS * x.shape[-1]:
        return F.linear(x, dequantize_int4(layer.weight, layer.weight_scale, x.dtype))
    return None


class CpuInt4(Backend):
    name = "cpu-int4"
    drops_weight = True

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        from .kernels import cpu_int4
        if device.type != "cpu" or dtype != torch.bfloat16:
            return "needs a bfloat16 model on CPU"
        return None if cpu_int4.is_available() else "torch's CPU int4 kernel is missing or wrong on this machine"

    def prepare(self, layer: Int4Linear) -> None:
        from .kernels import cpu_int4
        w = cpu_int4.pack(layer.weight, layer.weight_scale, inplace=True)
        layer.register_buffer("packed_weight", w.packed)
        layer.register_buffer("packed_scales_and_zeros", w.scales_and_zeros)
        layer.register_buffer("packed_row_scale", w.scale)
        layer.packed_group_size = w.group_size

    def matmul(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        from .kernels import cpu_int4
        w = cpu_int4.CpuInt4Weight(layer.packed_weight, layer.packed_scales_and_zeros, layer.packed_row_scale,
                                   layer.packed_group_size, layer.in_features, layer.out_features,
                                   layer.packed_weight.shape[1] * 2, layer.packed_weight.shape[0])
        return cpu_int4.matmul(x, w)


class CpuNative(Backend):
    name = "cpu-native"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        from .kernels import native
        if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
            return "needs a bfloat16 or float16 model on CPU"
        return native.unavailable_reason()

    def prepare(self, layer: Int4Linear) -> None:
        if not (layer.weight.is_contiguous() and layer.weight_scale.is_contiguous()):
            layer.weight, layer.weight_scale = layer.weight.contiguous(), layer.weight_scale.contiguous()

    def matmul(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        from .kernels import cpu_native
        return cpu_native.matmul(x, layer.weight, layer.weight_scale)


class Triton(Backend):
    name = "triton"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        from .kernels import triton_int4
        if device.type != "cuda":
            return "needs a CUDA device"
        return None if triton_int4.is_available() else "Triton is not installed"

    def matmul(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        from .kernels.triton_int4 import int4_matmul
        y = _cuda_prefill(layer, x)
        if y is not None:
            return y
        lead = x.shape[:-1]
        return int4_matmul(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale).reshape(*lead, layer.out_features)


class CudaInt4Pack(Backend):
    name = "cuda-int4pack"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        from .kernels import cuda_int4pack
        if device.type != "cuda" or dtype != torch.bfloat16:
            return "needs a bfloat16 model on CUDA"
        return cuda_int4pack.unavailable(device)

    def prepare(self, layer: Int4Linear) -> None:
        from .kernels import cuda_int4pack
        if not cuda_int4pack.supports_shape(layer.out_features, layer.in_features):
            raise ValueError(f"tinygemm cannot take a [{layer.out_features}, {layer.in_features}] weight")
        w = cuda_int4pack.pack(layer.weight, layer.weight_scale)
        layer.register_buffer("packed_weight", w.packed)
        layer.register_buffer("packed_scales_and_zeros", w.scales_and_zeros)
        layer.register_buffer("packed_row_scale", w.row_scale)
        layer.packed_group_size = w.group_size

    def matmul(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        from .kernels import cuda_int4pack
        y = _cuda_prefill(layer, x)
        if y is not None:
            return y
        w = cuda_int4pack.TinygemmWeight(layer.packed_weight, layer.packed_scales_and_zeros, layer.packed_row_scale,
                                         layer.packed_group_size, layer.in_features, layer.out_features)
        return cuda_int4pack.matmul(x, w)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Backend(), CpuNative(), CpuInt4(), Triton(), CudaInt4Pack())}
"""Every backend by name. A new backend registers itself here and in :data:`PREFERENCE`."""

PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda-int4pack", "triton", "reference"),
    "cpu": ("cpu-native", "cpu-int4", "reference"),
}
"""Backends to try, fastest first, per device type; ``reference`` ends every list."""


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPU (the fast int4 kernels need it) and on CUDA GPUs of capability 8.0+; float16
    on older GPUs such as the T4, which have no bfloat16 tensor cores."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a compute dtype the device cannot run well (bfloat16 on a GPU below sm80)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"dtype=torch.bfloat16 was requested on {torch.cuda.get_device_name(device)} (sm{major}{minor}), "
                         "which has no bfloat16 tensor cores; use dtype=torch.float16 (or None for the default)")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends worth trying for a model on ``device`` in ``dtype``, fastest first. float32
    models use the exact reference path only."""
    if dtype == torch.float32:
        return ["reference"]
    return [n for n in PREFERENCE.get(device.type, ("reference",)) if BACKENDS[n].unavailable(device, dtype) is None]


def prepare_layer(layer: Int4Linear, backend: str) -> None:
    """Prepare one loaded Int4Linear for ``backend``; a no-op when it already computes with it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown int4 backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if layer.backend == backend:
        return
    if layer.weight is None:
        raise ValueError(f"this int4 layer was packed for {layer.backend} and no longer holds the official "
                         f"weight; reload the model to use the {backend!r} backend")
    impl = BACKENDS[backend]
    impl.prepare(layer)
    layer.kernel = impl if backend != "reference" else None
    if impl.drops_weight:
        layer.weight = None


def int4_layers(model: nn.Module) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


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


def int8_head_used(backend: str) -> bool:
    """True where :func:`prepare_model` replaces the output layer by its int8 copy (so the loader may
    leave the stored float16 weight for it to quantize, instead of casting it first)."""
    if backend != "cpu-native":
        return False
    from .kernels import cpu_head
    return cpu_head.usable()


def prepare_model(model: nn.Module, backend: str) -> str:
    """Prepare every Int4Linear of ``model`` for ``backend`` (a name, see :mod:`chatglm.quant.selfcheck`
    for choosing one) and return it; ``none`` for a model without int4 layers. On CPU the output
    layer becomes a :class:`RowLinear` (same weight) whose decode GEMV is faster, or with
    ``cpu-native`` on an AVX512-VNNI CPU an int8 copy of it (:mod:`chatglm.quant.kernels.cpu_head`).
    An output layer left in another dtype than the model's (see ``int8_head_used``) is cast to it."""
    layers = int4_layers(model)
    for layer in layers:
        prepare_layer(layer, backend)
    head = model.transformer.output_layer if hasattr(model, "transformer") else None
    if isinstance(head, nn.Linear) and head.bias is None:
        if layers and int8_head_used(backend):
            from .kernels import cpu_head
            model.transformer.output_layer = cpu_head.Int8Head(head.weight)
        else:
            if head.weight.dtype != model.dtype:
                head.weight = nn.Parameter(head.weight.to(model.dtype), requires_grad=False)
            if layers and backend.startswith("cpu"):
                model.transformer.output_layer = RowLinear(head.weight)
    return backend if layers else "none"
