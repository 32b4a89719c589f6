"""Fused dequantize-and-multiply Triton kernels for the official ChatGLM int4 format.

The kernels read the official layout directly (no repacking): ``weight`` int8 ``[N, K/2]`` whose
byte ``j`` holds the signed code of input column ``2j`` in its high nibble and of ``2j + 1`` in its
low nibble, and ``scale`` ``[N]`` with ``W[n, k] = code[n, k] * scale[n]`` (see ``chatglm.quant``).

* ``M <= GEMV_MAX_ROWS`` (decode): each program reads a block of weight rows once per input row,
  unpacks both nibbles in registers, multiplies with the even and odd input columns in float32 and
  applies the row scale at the end. The input row is the fastest-varying program index, so the
  programs sharing a weight block run together and re-read it from L2.
* Larger ``M``: a tiled kernel that unpacks a ``[K/2, BLOCK_N]`` weight tile into two code tiles
  (even and odd columns) and runs two ``tl.dot`` per step against the even and odd input columns,
  accumulating in float32. fp16 inputs use fp16 tensor cores (T4 sm75 and later); bf16 uses bf16 on
  sm80+ and is upcast to float32 on older GPUs and under the interpreter (whose bf16 ``tl.dot``
  gives wrong results in Triton 3.9); float32 uses exact IEEE float32 products.

Triton is imported only when a kernel is first needed, so this module imports without it;
:func:`int4_matmul` raises RuntimeError saying what is missing when it cannot run. On a CPU-only
machine the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before the first call), which is how the tests check them.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from types import SimpleNamespace

import torch

GEMV_MAX_ROWS = 4
"""Inputs with at most this many rows use the GEMV kernel; a ``tl.dot`` tile has at least 16 rows."""

_GEMV_BLOCK_N = 32
_GEMV_BLOCK_KH = 128
_TILE_M = 32
_TILE_N = 64
_TILE_KH = 32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpret_mode() -> bool:
    """Whether Triton would build interpreted kernels now. Triton >= 3.4 exposes the setting as
    ``triton.knobs.runtime.interpret``; older releases read ``TRITON_INTERPRET`` from the environment."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """True when Triton is importable and there is a CUDA GPU or ``TRITON_INTERPRET=1`` is set."""
    if not _triton_importable():
        return False
    return torch.cuda.is_available() or _interpret_mode()


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    """Build the jitted kernels; cached per mode because ``triton.jit`` picks the mode when applied."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, KH, stride_xm, stride_wn, stride_ym,
                    BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
        m = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_KH), dtype=tl.float32)
        for k0 in range(0, KH, BLOCK_KH):
            kk = k0 + tl.arange(0, BLOCK_KH)
            k_mask = kk < KH
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0).to(tl.int32)
            x_even = tl.load(x_ptr + m * stride_xm + 2 * kk, mask=k_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + m * stride_xm + 2 * kk + 1, mask=k_mask, other=0.0).to(tl.float32)
            high = (w >> 4).to(tl.float32)
            low = (((w & 15) ^ 8) - 8).to(tl.float32)
            acc += high * x_even[None, :] + low * x_odd[None, :]
        scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        out = tl.sum(acc, axis=1) * scale
        tl.store(y_ptr + m * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def tiled_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, KH, stride_xm, stride_wn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr,
                     UPCAST: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, KH, BLOCK_KH):
            kk = k0 + tl.arange(0, BLOCK_KH)
            k_mask = kk < KH
            x_mask = m_mask[:, None] & k_mask[None, :]
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kk[None, :], mask=x_mask, other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kk[None, :] + 1, mask=x_mask, other=0.0)
            if UPCAST:
                x_even = x_even.to(tl.float32)
                x_odd = x_odd.to(tl.float32)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0).to(tl.int32)
            high = (w >> 4).to(x_even.dtype)
            low = (((w & 15) ^ 8) - 8).to(x_even.dtype)
            acc += tl.dot(x_even, high, input_precision="ieee")
            acc += tl.dot(x_odd, low, input_precision="ieee")
        scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    return SimpleNamespace(cdiv=triton.cdiv, gemv=gemv_kernel, tiled=tiled_kernel)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"int4_matmul needs x as a 2-D fp16/bf16/fp32 tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(
            f"int4_matmul needs the official int8 [N, K/2] weight, got {weight.dtype} {tuple(weight.shape)}"
        )
    if x.shape[1] != 2 * weight.shape[1]:
        raise ValueError(
            f"int4_matmul: x has {x.shape[1]} columns but the packed weight holds {2 * weight.shape[1]} "
            "inputs per row; check which layer's weight is used"
        )
    if scale.dim() != 1 or scale.shape[0] != weight.shape[0] or not scale.is_floating_point():
        raise ValueError(
            f"int4_matmul needs one float scale per weight row ([{weight.shape[0]}]), got "
            f"{scale.dtype} {tuple(scale.shape)}"
        )
    if not (x.device == weight.device == scale.device):
        raise ValueError(
            f"int4_matmul: x, weight and scale must share a device, got {x.device}, {weight.device}, {scale.device}"
        )


def _check_runnable(device: torch.device) -> bool:
    """Raise RuntimeError when the kernels cannot run on ``device``; return the interpreter mode."""
    if not _triton_importable():
        raise RuntimeError("int4_matmul needs Triton, which is not installed: pip install triton")
    interpret = _interpret_mode()
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return interpret
    raise RuntimeError(
        f"int4_matmul cannot run on {device} tensors here (CUDA available: {torch.cuda.is_available()}, "
        f"TRITON_INTERPRET={int(interpret)}): move the tensors to a CUDA GPU, or for CPU tensors set "
        "TRITON_INTERPRET=1 before the first call (slow; for tests)"
    )


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (code * scale[:, None]).T`` for ``x [M, K]`` fp16/bf16/fp32, ``weight`` int8 ``[N, K/2]``
    and ``scale [N]``; returns ``[M, N]`` in ``x.dtype``, accumulated in float32."""
    _check_inputs(x, weight, scale)
    interpret = _check_runnable(x.device)
    k = _kernels(interpret)
    x = x.contiguous()
    weight = weight.contiguous()
    scale = scale.contiguous()
    m, n, kh = x.shape[0], weight.shape[0], weight.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if kh == 0:
        return y.zero_()
    if m <= GEMV_MAX_ROWS:
        grid = (m, k.cdiv(n, _GEMV_BLOCK_N))
        k.gemv[grid](x, weight, scale, y, n, kh, x.stride(0), weight.stride(0), y.stride(0),
                     BLOCK_N=_GEMV_BLOCK_N, BLOCK_KH=_GEMV_BLOCK_KH)
        return y
    upcast = x.dtype == torch.bfloat16 and (interpret or torch.cuda.get_device_capability(x.device)[0] < 8)
    grid = (k.cdiv(m, _TILE_M), k.cdiv(n, _TILE_N))
    k.tiled[grid](x, weight, scale, y, m, n, kh, x.stride(0), weight.stride(0), y.stride(0),
                  BLOCK_M=_TILE_M, BLOCK_N=_TILE_N, BLOCK_KH=_TILE_KH, UPCAST=upcast)
    return y
