"""CPU int4 matmul with our C++ kernels (:mod:`.native`) on the official weight bytes: no repacking.

* Up to :data:`~.native.MAX_ROWS` input rows (decode, batched decode): one ``int4_gemv`` call reads
  the weight once for all rows (each activation row split into two int8 terms, q4 x q8 dot products
  summed exactly in int32).
* Up to :data:`GEMV_MAX_ROWS` rows: the same kernel on groups of 8 rows.
* More rows (prefill): blocks of :data:`PREFILL_BLOCK_ROWS` weight rows are unpacked by the C++ op and
  multiplied by oneDNN, either dequantized to bfloat16 (fast where the CPU has AMX or avx512_bf16) or
  as exact int8 codes with ``torch._int_mm`` on a two-term int8 split of the activations (VNNI). The
  faster of the two is measured once per process (:func:`prefill_path`).
"""
from __future__ import annotations

import logging
import threading
import time

import torch
import torch.nn.functional as F

from . import native

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 16
"""Inputs of up to this many rows run the GEMV kernel in groups of 8. Measured on a 27392 x 4096
layer (2 threads, AMX Xeon): 16 rows take 22 ms that way against 25 ms unpacked into a GEMM, 32 rows
46 ms against 26 ms."""
PREFILL_BLOCK_ROWS = 1024
"""Weight rows unpacked per GEMM: bounds the temporary (8 MiB of bfloat16 at K = 4096)."""
PREFILL_PATHS = ("bf16", "int8")

FORCED_ISA: str | None = None
"""An ISA path name (see :data:`native.ISA_PATHS`) that every call takes; None: the best one here."""
_prefill: dict[str, str] = {}
_scratch = threading.local()  # per thread: {(k, dtype): buffer of PREFILL_BLOCK_ROWS rows}


def _buffer(k: int, dtype: torch.dtype) -> torch.Tensor:
    """A block buffer kept between calls: a fresh multi-MiB tensor per layer call costs page faults."""
    cache = _scratch.__dict__.setdefault("buffers", {})
    if (k, dtype) not in cache:
        cache[k, dtype] = torch.empty(PREFILL_BLOCK_ROWS, k, dtype=dtype)
    return cache[k, dtype]


def _blocks(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """``(r0, r1, rows r0:r1 unpacked)`` for each block of weight rows, in one reused buffer."""
    n, k = weight.shape[0], weight.shape[1] * 2
    buf = _buffer(k, dtype)
    for r0 in range(0, n, PREFILL_BLOCK_ROWS):
        r1 = min(n, r0 + PREFILL_BLOCK_ROWS)
        yield r0, r1, native.int4_unpack(weight, scale, r0, buf[: r1 - r0])


def _prefill_bf16(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xb = x2.to(torch.bfloat16)
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x2.dtype)
    for r0, r1, block in _blocks(weight, scale, torch.bfloat16):
        y[:, r0:r1] = F.linear(xb, block)
    return y


def _split_int8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x ~= s * (a + b / 254)`` per row with int8 ``a``, ``b`` stacked as ``[2m, K]`` (~16 bits of
    the row's largest value); None when the input holds inf or NaN."""
    xf = x2.to(torch.float32)
    amax = xf.abs().amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(amax).all()):
        return None
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    u = xf / s
    a = torch.round(u)
    ab = torch.empty(2 * x2.shape[0], x2.shape[1], dtype=torch.int8)
    ab[: x2.shape[0]] = a
    ab[x2.shape[0]:] = u.sub_(a).mul_(254).round_()
    return ab, s


def _prefill_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    split = _split_int8(x2)
    if split is None:
        return _prefill_bf16(x2, weight, scale)
    ab, s = split
    m = x2.shape[0]
    row_scale = scale.to(torch.float32)
    y = torch.empty(m, weight.shape[0], dtype=x2.dtype)
    for r0, r1, block in _blocks(weight, scale, torch.int8):
        acc = torch._int_mm(ab, block.t())  # [2m, rows], exact
        y[:, r0:r1] = acc[m:].to(torch.float32).div_(254).add_(acc[:m]).mul_(s).mul_(row_scale[r0:r1])
    return y


def _time(fn, repeats: int = 2) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_prefill(m: int = 128, k: int = 4096, n: int = PREFILL_BLOCK_ROWS) -> dict[str, float]:
    """FLOP/s of each prefill path on one ``[m, k] x [n, k]`` block (unpacking included)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (n, k // 2), generator=gen, dtype=torch.int8)
    sc = (torch.rand(n, generator=gen) * 0.02).to(torch.float16)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    fns = {"bf16": _prefill_bf16, "int8": _prefill_int8}
    return {name: 2 * m * k * n / _time(lambda f=fns[name]: f(x, w, sc)) for name in PREFILL_PATHS}


def prefill_path() -> str:
    """The faster prefill path on this machine: measured once per process (0.1-0.3 s), then cached."""
    if "path" not in _prefill:
        rates = measure_prefill()
        _prefill["path"] = max(rates, key=rates.get)
        log.info("int4 prefill path: %s (%s)", _prefill["path"],
                 ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    return _prefill["path"]


def set_prefill_path(path: str | None) -> None:
    """Force a prefill path (tests, benchmarks); None measures again on the next prefill."""
    if path is not None and path not in PREFILL_PATHS:
        raise ValueError(f"prefill path must be one of {', '.join(PREFILL_PATHS)}, got {path!r}")
    _prefill.clear()
    if path is not None:
        _prefill["path"] = path


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ W.T`` for the official int4 ``weight [N, K/2]``, fp16 ``scale [N]``; ``x.dtype`` out."""
    k = weight.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"int4 matmul: input has {x.shape[-1]} features but the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, weight.shape[0])
    if m <= native.MAX_ROWS:
        y = native.int4_gemv(x2, weight, scale, FORCED_ISA)
    elif m <= GEMV_MAX_ROWS:
        y = torch.cat([native.int4_gemv(x2[i:i + native.MAX_ROWS], weight, scale, FORCED_ISA)
                       for i in range(0, m, native.MAX_ROWS)])
    elif prefill_path() == "bf16":
        y = _prefill_bf16(x2, weight, scale)
    else:
        y = _prefill_int8(x2, weight, scale)
    return y.reshape(*lead, weight.shape[0])
