"""torch's tinygemm int4 kernel (``_weight_int4pack_mm``) for CUDA GPUs of compute capability 8.0+
(A40, A100, ...), with bfloat16 activations.

The official ChatGLM int4 bytes map losslessly: tinygemm takes ``uint8 [N, K/2]`` with the even
column in the high nibble (the official order) and unsigned ``q = code + 8`` (XOR 0x88 on each byte),
dequantizing ``(q - 8) * scale + zero``: the row scale repeated for every group and zero 0.
Its packed layout is produced on the GPU at load by ``_convert_weight_to_int4pack`` and never saved.

Before first use on a device, a random weight is multiplied both ways and compared with the
reference dequantization (:func:`is_available`); on any mismatch or error the kernel is reported
unavailable with a logged reason, and :mod:`chatglm.kernels.dispatch` uses the Triton kernels.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..int4 import dequantize_int4

log = logging.getLogger(__name__)
INNER_K_TILES = 8
_GROUP_SIZES = (256, 128, 64, 32)


@dataclass(frozen=True)
class TinygemmWeight:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # bfloat16 [K / group_size, N, 2]
    group_size: int
    in_features: int
    out_features: int


def tinygemm_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The official int8 ``[N, K/2]`` codes as tinygemm's input: uint8, ``q = code + 8`` per nibble,
    even column in the high nibble (the official order is kept)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"tinygemm_bytes needs the official int8 [out, in/2] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    return weight.view(torch.uint8) ^ 0x88


def supports_shape(out_features: int, in_features: int) -> bool:
    """tinygemm needs ``N`` a multiple of 8 and ``K`` a multiple of ``INNER_K_TILES * 16``."""
    return out_features % 8 == 0 and in_features % (INNER_K_TILES * 16) == 0


def pack(weight: torch.Tensor, scale: torch.Tensor) -> TinygemmWeight:
    """Pack an official int4 weight on its CUDA device for :func:`matmul`."""
    n, k = weight.shape[0], weight.shape[1] * 2
    if not supports_shape(n, k):
        raise ValueError(f"tinygemm cannot take a [{n}, {k}] weight (N % 8, K % {INNER_K_TILES * 16})")
    group_size = next(g for g in _GROUP_SIZES if k % g == 0)
    packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_bytes(weight).contiguous(), INNER_K_TILES)
    sz = torch.zeros(k // group_size, n, 2, dtype=torch.bfloat16, device=weight.device)
    sz[:, :, 0] = scale.to(torch.bfloat16)
    return TinygemmWeight(packed, sz, group_size, k, n)


def matmul(x: torch.Tensor, w: TinygemmWeight) -> torch.Tensor:
    """``x [..., K] @ W.T`` in ``x.dtype`` (computed with bfloat16 activations)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, w.packed, w.group_size, w.scales_and_zeros)
    return y.to(x.dtype).reshape(*lead, w.out_features)


@functools.lru_cache(maxsize=8)
def is_available(device: torch.device) -> bool:
    """True when ``device`` is a CUDA GPU of capability 8.0+ whose tinygemm kernel reproduces the
    reference dequantization on a random weight (checked once per device)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-128, 128, (256, 256), generator=gen, dtype=torch.int8)
    scale = (torch.rand(256, generator=gen) * 0.02 + 0.001).half()
    x = torch.randn(3, 512, generator=gen).bfloat16()
    want = x.float() @ dequantize_int4(weight, scale, torch.float32).T
    try:
        got = matmul(x.to(device), pack(weight.to(device), scale.to(device))).float().cpu()
    except (RuntimeError, NotImplementedError) as exc:
        log.warning("tinygemm int4 kernel unusable on %s (%s); using the Triton kernels", device, exc)
        return False
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
        log.warning("tinygemm int4 kernel disagrees with the reference on %s (max diff %.3g); using the "
                    "Triton kernels", device, float((got - want).abs().max()))
        return False
    return True
