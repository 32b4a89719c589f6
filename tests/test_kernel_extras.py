"""The extension's helpers beside the GEMV kernels: the output layer's int8 quantizer on float16 and
bfloat16 weights (its AVX512 paths against the scalar one), the streaming-read bandwidth probe, and the
benchmark's floor figures from both bandwidth readings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatglm.bench.report import _stream_floor
from chatglm.quant.kernels import native

pytestmark = pytest.mark.skipif(native.toolchain_missing() is not None,
                                reason=f"the C++ extension cannot be built here: {native.toolchain_missing()}")


def _awkward_weight(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values, values at exact code half-way points, subnormals, zero rows and a lone maximum."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.03).to(dtype)
    w[0] = 0
    w[1, : k // 2] = torch.finfo(dtype).tiny / 4  # subnormal in both float16 and bfloat16
    w[1, k // 2:] = -torch.finfo(dtype).tiny
    if n > 2:
        w[2] = torch.arange(k).remainder(254).sub(127).add(0.5).to(dtype)  # with scale 1: ties between two codes
        w[2, k - 1] = 127.0
    return w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(65, 4096), (7, 130), (3, 15), (5, 1)])
def test_quantize_rows_int8_vector_paths_equal_the_scalar_path(dtype: torch.dtype, n: int, k: int) -> None:
    """float16 / bfloat16 take the AVX512 path where the CPU has it; their float32 upcast (exact) takes the
    scalar loop: codes and scales must be equal bit for bit."""
    w = _awkward_weight(n, k, dtype, seed=n * k)
    codes, scale = native.quantize_rows_int8(w)
    want_codes, want_scale = native.quantize_rows_int8(w.float())
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    assert int(codes.abs().max()) <= 127 and torch.equal(codes[0], torch.zeros(k, dtype=torch.int8))


def test_quantize_rows_int8_of_a_non_contiguous_float16_weight() -> None:
    w = _awkward_weight(40, 256, torch.float16, seed=3)
    got = native.quantize_rows_int8(w.t().contiguous().t())
    assert all(torch.equal(a, b) for a, b in zip(got, native.quantize_rows_int8(w)))


def test_stream_read_xors_every_word() -> None:
    gen = torch.Generator().manual_seed(0)
    for nbytes in (64, 64 * 7, 1 << 22):  # below one line per thread, a few lines, many parallel tasks
        buf = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
        want = int(np.bitwise_xor.reduce(buf.numpy().view(np.int64)))
        for pf in (0, 2048):
            assert native.stream_read(buf, pf) == want


def test_stream_read_refuses_partial_lines() -> None:
    with pytest.raises(RuntimeError, match="whole number of 64-byte lines"):
        native.stream_read(torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="prefetch must be >= 0"):
        native.stream_read(torch.zeros(64, dtype=torch.uint8), -1)


def test_floor_figures_name_each_reading() -> None:
    r = {"ours": {"decode_bytes_per_token": 3_000_000_000},
         "bandwidth_bytes_per_s": [20e9, 19e9], "stream_read": [{"bytes_per_s": 24e9, "prefetch": 2048}]}
    s: dict = {}
    _stream_floor(r, s, decode=0.2)
    assert s["floor_ms_stream"] == pytest.approx(125.0) and s["decode_pct_of_floor_stream"] == pytest.approx(62.5)
    assert s["best_bandwidth_gb_per_s"] == pytest.approx(24.0) and s["floor_ms_best"] == pytest.approx(125.0)
    r["stream_read"] = []
    s = {}
    _stream_floor(r, s, decode=0.2)
    assert "floor_ms_stream" not in s and s["floor_ms_best"] == pytest.approx(150.0)
