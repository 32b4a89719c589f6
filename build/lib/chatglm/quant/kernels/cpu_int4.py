"""Fast CPU int4 matmul from the official ChatGLM int4 format (see ``chatglm.quant``).

Two paths share one packed weight:

* Few input rows (decode): torch's weight-only int4 kernel ``_weight_int4pack_mm_for_cpu`` on
  bfloat16 activations. The official signed code ``c`` becomes ``q = c + 8`` with the row scale
  repeated for every group and zero 0: the codes map losslessly, only the scale is rounded to
  bfloat16 (the kernel takes scales in the activation dtype).
* Many input rows (prefill, ``M >= PREFILL_MIN_ROWS``): that kernel's cost grows linearly in ``M``,
  so instead each block of weight rows is decoded from the packed layout into int8 (``16 * c``,
  exact) and multiplied with ``torch._int_mm`` (oneDNN VNNI / AMX int8). The activations are split
  into two int8 terms per row, ``x ~= s * (a + b / 254)``, which keeps ~16 bits relative to the
  row's largest value; products accumulate exactly in int32 and the fp16 row scale is applied in
  float32. This is more accurate than the bfloat16 kernel path.

The packed layout depends on the CPU's instruction set, so packing happens at load time and the
packed tensors are never saved. :mod:`chatglm.kernels.cpu_pack` builds it straight from the official
bytes once a probe has shown that it matches torch's converter here; otherwise the converter runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..int4 import unpack_int4
from . import cpu_pack

PREFILL_MIN_ROWS = 64
"""Inputs with at least this many rows take the int8-GEMM path. Measured on 2 cores (AVX512-VNNI, no
AMX), the int8 path wins from about 32-48 rows on a quiet machine; 64 keeps a margin because its
many small parallel ops lose more than the single int4 op when other processes compete for cores."""

_GROUP_SIZES = (256, 128, 64, 32)
_ROW_ALIGN = 64  # padded_out is a multiple of this: whole kernel blocks on AVX512 (64) and AVX2 (32)
_PACK_CHUNK_ROWS = 4096  # rows converted at a time by torch's converter, bounds its int32 temporary
_PREFILL_BLOCK_ROWS = 1024  # weight rows decoded per int8 GEMM
_XOR_OFFSET = -120  # 0x88 as int8: turns both nibbles q = c + 8 into two's complement c

_available: bool | None = None
_block: int | None = None
_block_probed = False
_direct_block: int | None = None
_direct_probed = False


@dataclass(frozen=True)
class CpuInt4Weight:
    """An int4 weight packed for this CPU: build with :func:`pack`, use with :func:`matmul`."""

    packed: torch.Tensor
    """uint8 ``[padded_out, padded_in // 2]`` in the layout of ``_convert_weight_to_int4pack_for_cpu``."""
    scales_and_zeros: torch.Tensor
    """bfloat16 ``[padded_in // group_size, padded_out, 2]``: the row scale per group, zero 0."""
    scale: torch.Tensor
    """float32 ``[padded_out]``: the exact fp16 row scale (0 for padding rows), for the prefill path."""
    group_size: int
    in_features: int
    out_features: int
    padded_in: int
    padded_out: int


def _has_ops() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


def is_available() -> bool:
    """True when torch's CPU int4 kernel exists and gives correct results on this machine (cached)."""
    global _available
    if _available is None:
        _available = _check_kernel()
    return _available


def _check_kernel() -> bool:
    if not _has_ops():
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 64), generator=gen, dtype=torch.int32)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    sz = torch.zeros(2, 64, 2, dtype=torch.bfloat16)
    sz[..., 0] = 0.5
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    except (RuntimeError, NotImplementedError):
        return False
    ref = x.float() @ ((q - 8).float() * 0.5).T
    return bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())))


def _decode_block(packed_rows: torch.Tensor, block: int, out: torch.Tensor) -> None:
    """Decode packed rows (a multiple of ``block``) into ``out`` int8 ``[K, rows]`` = ``16 * code``.

    In a full kernel block of ``block`` rows the bytes form ``[K, block / 2]``; the low nibbles hold
    rows ``0 .. block/2 - 1`` and the high nibbles rows ``block/2 .. block - 1`` (checked at runtime
    by :func:`_split_block`)."""
    rows, half_k = packed_rows.shape
    k = half_k * 2
    t = packed_rows.view(torch.int8).view(rows // block, k, block // 2) ^ _XOR_OFFSET
    dst = out.view(k, rows // block, 2, block // 2)
    dst[:, :, 0, :].copy_((t << 4).permute(1, 0, 2))
    dst[:, :, 1, :].copy_((t & -16).permute(1, 0, 2))


def _split_block() -> int | None:
    """The kernel's row-block size for which :func:`_decode_block` inverts the packing on this
    machine, or None (then the prefill path is disabled and the int4 kernel handles every input)."""
    global _block, _block_probed
    if not _block_probed:
        _block_probed = True
        if is_available() and hasattr(torch, "_int_mm"):
            _block = _probe_block()
    return _block


def _probe_block() -> int | None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (2 * _ROW_ALIGN, 64), generator=gen, dtype=torch.int32)
    want = ((q - 8) * 16).to(torch.int8).T
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        a = torch.randint(-127, 128, (3, 64), generator=gen, dtype=torch.int8)
        if not torch.equal(torch._int_mm(a, want.contiguous()), a.int() @ want.int()):
            return None
        for block in (64, 32):
            got = torch.empty(64, q.shape[0], dtype=torch.int8)
            _decode_block(packed, block, got)
            if torch.equal(got, want):
                return block
    except (RuntimeError, NotImplementedError):
        return None
    return None


def _pack_block() -> int | None:
    """The row-block size for which :func:`cpu_pack.pack_direct` reproduces torch's converter byte for
    byte on this machine (probed once, on a matrix that needs row and column padding), or None."""
    global _direct_block, _direct_probed
    if not _direct_probed:
        _direct_probed = True
        gen = torch.Generator().manual_seed(2)
        weight = torch.randint(-128, 128, (100, 36), generator=gen, dtype=torch.int8)
        want = _pack_with_converter(weight, 128, 96)
        for block in (64, 32):
            try:
                if torch.equal(cpu_pack.pack_direct(weight, 128, 96, block), want):
                    _direct_block = block
                    break
            except RuntimeError:
                break
    return _direct_block


def _pack_with_converter(weight: torch.Tensor, padded_out: int, padded_in: int) -> torch.Tensor:
    """Pack with torch's converter: int32 codes ``q = c + 8``, converted ``_PACK_CHUNK_ROWS`` at a time."""
    n, k = weight.shape[0], weight.shape[1] * 2
    chunks = []
    for r0 in range(0, padded_out, _PACK_CHUNK_ROWS):
        r1 = min(r0 + _PACK_CHUNK_ROWS, padded_out)
        q = torch.full((r1 - r0, padded_in), 8, dtype=torch.int32)
        if r0 < n:
            q[: min(r1, n) - r0, :k] = unpack_int4(weight[r0:r1]).to(torch.int32) + 8
        chunks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def pack(weight: torch.Tensor, scale: torch.Tensor, *, inplace: bool = False) -> CpuInt4Weight:
    """Pack an official int4 weight (int8 ``[out, in/2]``, scale ``[out]``) for :func:`matmul`.

    Pads ``in`` to a multiple of 32 with code 0 and ``out`` to a multiple of 64 with zero rows.
    ``inplace=True`` lets the packed bytes take over ``weight``'s memory where the layouts allow (no
    padding, ``in`` of at most 16368), which saves allocating (and page-faulting) a second copy;
    ``weight`` may then be overwritten, so pass it only for a weight that is dropped afterwards."""
    if not is_available():
        raise RuntimeError(
            f"torch {torch.__version__} has no working CPU int4 kernel (_weight_int4pack_mm_for_cpu); "
            "install torch >= 2.6 for CPU or use the reference dequantization path"
        )
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"pack needs the official int8 [out, in/2] weight, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[1] * 2
    if scale.dim() != 1 or scale.shape[0] != n:
        raise ValueError(f"pack needs one scale per output row ([{n}]), got scale of shape {tuple(scale.shape)}")
    padded_in = math.ceil(k / 32) * 32
    padded_out = math.ceil(n / _ROW_ALIGN) * _ROW_ALIGN
    group_size = next(g for g in _GROUP_SIZES if padded_in % g == 0)
    weight = weight.cpu()
    block = _pack_block()
    if block is None:
        packed = _pack_with_converter(weight, padded_out, padded_in)
    else:
        packed = cpu_pack.pack_direct(weight, padded_out, padded_in, block, inplace=inplace)
    scale32 = torch.zeros(padded_out, dtype=torch.float32)
    scale32[:n] = scale.detach().cpu().to(torch.float32)
    sz = torch.zeros(padded_in // group_size, padded_out, 2, dtype=torch.bfloat16)
    sz[:, :, 0] = scale32.to(torch.bfloat16)
    return CpuInt4Weight(
        packed=packed,
        scales_and_zeros=sz,
        scale=scale32,
        group_size=group_size,
        in_features=k,
        out_features=n,
        padded_in=padded_in,
        padded_out=padded_out,
    )


def matmul(x: torch.Tensor, w: CpuInt4Weight, prefill_min_rows: int | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x [..., in]`` of any float dtype; returns ``[..., out]`` in ``x.dtype``.

    Inputs with at least ``prefill_min_rows`` rows (default :data:`PREFILL_MIN_ROWS`) take the
    int8-GEMM path when this machine supports it, the others the bfloat16 int4 kernel."""
    if not x.is_floating_point():
        raise TypeError(f"matmul needs a floating-point input, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise ValueError(
            f"matmul: input has {x.shape[-1]} features but the weight expects {w.in_features}; "
            "check which layer's weight is used"
        )
    if x.device.type != "cpu":
        raise ValueError(f"cpu_int4.matmul runs on CPU tensors, got a tensor on {x.device}; move it with .cpu()")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, w.out_features)
    threshold = PREFILL_MIN_ROWS if prefill_min_rows is None else prefill_min_rows
    y = None
    if m >= threshold and _split_block() is not None:
        y = _int8_matmul(x2, w)
    if y is None:
        y = _kernel_matmul(x2, w)
    return y.reshape(*lead, w.out_features)


def _kernel_matmul(x2: torch.Tensor, w: CpuInt4Weight) -> torch.Tensor:
    xb = x2.to(torch.bfloat16)
    if w.padded_in != w.in_features:
        xb = F.pad(xb, (0, w.padded_in - w.in_features))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), w.packed, w.group_size, w.scales_and_zeros)
    return y[:, : w.out_features].to(x2.dtype).contiguous()


def _int8_matmul(x2: torch.Tensor, w: CpuInt4Weight) -> torch.Tensor | None:
    """The prefill path; None when the input holds inf or NaN (the kernel path then handles it)."""
    xf = x2.to(torch.float32)
    if w.padded_in != w.in_features:
        xf = F.pad(xf, (0, w.padded_in - w.in_features))
    amax = xf.abs().amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(amax).all()):
        return None
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    m = x2.shape[0]
    u = xf.div(s) if xf.data_ptr() == x2.data_ptr() else xf.div_(s)  # never overwrite the caller's input
    ab = torch.empty(2 * m, u.shape[1], dtype=torch.int8)
    a = torch.round(u)
    ab[:m] = a
    ab[m:] = u.sub_(a).mul_(254).round_()  # b: the remainder in units of 1/254
    del a, u, xf
    block = _split_block()
    y = torch.empty(m, w.out_features, dtype=x2.dtype)
    scale = w.scale / 16
    buf = torch.empty(w.padded_in, _PREFILL_BLOCK_ROWS, dtype=torch.int8)
    for r0 in range(0, w.padded_out, _PREFILL_BLOCK_ROWS):  # temporaries stay one block of rows wide
        rows = min(_PREFILL_BLOCK_ROWS, w.padded_out - r0)
        if rows != buf.shape[1]:
            buf = torch.empty(w.padded_in, rows, dtype=torch.int8)
        _decode_block(w.packed[r0 : r0 + rows], block, buf)
        acc = torch._int_mm(ab, buf)  # [2m, rows]
        yb = acc[m:].to(torch.float32).div_(254).add_(acc[:m]).mul_(s).mul_(scale[r0 : r0 + rows])
        valid = min(rows, w.out_features - r0)
        if valid > 0:
            y[:, r0 : r0 + valid] = yb[:, :valid]
    return y
