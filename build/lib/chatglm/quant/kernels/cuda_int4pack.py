"""torch's tinygemm int4 kernel (``_weight_int4pack_mm``) for CUDA GPUs of compute capability 8.0+
(A40, A100, ...), with bfloat16 activations.

The official ChatGLM int4 bytes map losslessly: tinygemm takes ``uint8 [N, K/2]`` with the even
column in the high nibble (the official order) and unsigned ``q = code + 8`` (XOR 0x88 on each byte),
dequantizing ``(q - 8) * scale + zero``. The kernel takes its scales in bfloat16, which would round
the official fp16 row scales, so it runs with scale 1 and zero 0 (exact for integer codes) and the
fp16 row scale multiplies each output column in float32 afterwards: a per-row scale factors out of
the dot product, so the result equals the reference dequantization up to the kernel's accumulation.
Its packed layout is produced on the GPU at load by ``_convert_weight_to_int4pack`` and never saved.

Whether the kernel works on a device is decided by :mod:`chatglm.quant.selfcheck` on the model's
real layer shapes; :func:`unavailable` only rules out devices and builds that cannot run it at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INNER_K_TILES = 8
_GROUP_SIZES = (256, 128, 64, 32)


@dataclass(frozen=True)
class TinygemmWeight:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # bfloat16 [K / group_size, N, 2]: scale 1, zero 0
    row_scale: torch.Tensor  # float32 [N]: the official fp16 row scale, exact
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
    sz[:, :, 0] = 1.0
    return TinygemmWeight(packed, sz, scale.to(torch.float32), group_size, k, n)


def matmul(x: torch.Tensor, w: TinygemmWeight) -> torch.Tensor:
    """``x [..., K] @ W.T`` in ``x.dtype`` (bfloat16 activations, row scale applied in float32)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, w.packed, w.group_size, w.scales_and_zeros)
    return (y.float() * w.row_scale).to(x.dtype).reshape(*lead, w.out_features)


def unavailable(device: torch.device) -> str | None:
    """Why tinygemm cannot run on ``device`` at all; None when it may (the self-check decides)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm is built for compute capability 8.0+ only"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm"
    return None
