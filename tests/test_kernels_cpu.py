"""torch's CPU int4 kernel path and the int8-GEMM prefill path against the reference dequantization.

Tolerances (relative error, Frobenius norm of the difference over the reference's norm, and the
largest element error over the reference's largest magnitude):
* int4 kernel path: activations, scales and outputs are rounded to bfloat16 (2^-9 each), so
  1.5e-2 on the norm and 3e-2 on the largest element (measured ~3e-3 and ~7e-3);
* int8-GEMM path with float32 inputs: activations keep ~16 bits relative to the row maximum and the
  products are exact, so 2e-4 and 5e-4 (measured ~3e-5);
* any path with bf16 / fp16 inputs: the output's own rounding, as for the int4 kernel path.
"""
from __future__ import annotations

import pytest
import torch

from chatglm.kernels import cpu_int4
from chatglm.quant import dequantize_int4, pack_int4

pytestmark = pytest.mark.skipif(
    not cpu_int4.is_available(),
    reason=f"torch {torch.__version__} has no working CPU int4 kernel (_weight_int4pack_mm_for_cpu)",
)

KERNEL = 10**9  # prefill_min_rows that keeps every input on the int4 kernel
PREFILL = 1  # prefill_min_rows that sends every input to the int8-GEMM path
SHAPES = [(64, 32), (144, 32), (32, 72), (37, 64), (80, 200), (130, 384), (16, 13696 // 16)]
ROWS = [1, 3, 17, 64, 70]


def make_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random official int4 weight using the full code range -8..7, with fp16 row scales."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) * 0.05 + 0.001).to(torch.float16)
    return pack_int4(codes), scale


def assert_close_rel(y: torch.Tensor, ref: torch.Tensor, norm_tol: float, max_tol: float) -> None:
    diff = (y.double() - ref.double())
    norm_err = float(diff.norm() / ref.double().norm())
    max_err = float(diff.abs().max() / ref.double().abs().max())
    assert norm_err <= norm_tol and max_err <= max_tol, f"relative errors: norm {norm_err:.2e}, max {max_err:.2e}"


def tolerances(path: int, dtype: torch.dtype) -> tuple[float, float]:
    if path == PREFILL and dtype == torch.float32:
        return 2e-4, 5e-4
    return 1.5e-2, 3e-2


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("path", [KERNEL, PREFILL], ids=["kernel", "prefill"])
def test_matmul_matches_reference(n: int, k: int, path: int) -> None:
    weight, scale = make_weight(n, k, seed=n * 1000 + k)
    packed = cpu_int4.pack(weight, scale)
    assert packed.in_features == k and packed.out_features == n
    assert packed.padded_in % 32 == 0 and packed.padded_out % 16 == 0
    assert packed.padded_in % packed.group_size == 0
    w_ref = dequantize_int4(weight, scale)
    gen = torch.Generator().manual_seed(k)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen)
        y = cpu_int4.matmul(x, packed, prefill_min_rows=path)
        assert y.shape == (m, n) and y.dtype == torch.float32 and y.is_contiguous()
        assert_close_rel(y, x @ w_ref.T, *tolerances(path, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", [KERNEL, PREFILL], ids=["kernel", "prefill"])
def test_batched_input_and_dtypes(dtype: torch.dtype, path: int) -> None:
    n, k = 144, 96
    weight, scale = make_weight(n, k, seed=7)
    packed = cpu_int4.pack(weight, scale)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = cpu_int4.matmul(x, packed, prefill_min_rows=path)
    assert y.shape == (2, 5, n) and y.dtype == dtype
    ref = x.double() @ dequantize_int4(weight, scale, torch.float64).T
    assert_close_rel(y, ref, *tolerances(path, dtype))


def test_default_threshold_and_layout_probe() -> None:
    """Large inputs take the int8 path by default: its float32 accuracy shows which path ran."""
    assert cpu_int4._split_block() in (64, 32), "the packed layout probe failed on this CPU"
    n, k = 64, 128
    weight, scale = make_weight(n, k, seed=11)
    packed = cpu_int4.pack(weight, scale)
    x = torch.randn(cpu_int4.PREFILL_MIN_ROWS, k, generator=torch.Generator().manual_seed(5))
    assert_close_rel(cpu_int4.matmul(x, packed), x @ dequantize_int4(weight, scale).T, 2e-4, 5e-4)


def test_non_finite_input_falls_back_to_kernel() -> None:
    weight, scale = make_weight(64, 32, seed=2)
    packed = cpu_int4.pack(weight, scale)
    x = torch.randn(40, 32)
    x[3, 5] = float("inf")
    y = cpu_int4.matmul(x, packed, prefill_min_rows=PREFILL)
    assert not torch.isfinite(y[3]).all()
    assert torch.isfinite(y[torch.arange(40) != 3]).all()


def test_zero_rows_and_zero_scale() -> None:
    weight, scale = make_weight(48, 64, seed=4)
    scale[:5] = 0
    packed = cpu_int4.pack(weight, scale)
    assert cpu_int4.matmul(torch.randn(0, 64), packed).shape == (0, 48)
    for path in (KERNEL, PREFILL):
        y = cpu_int4.matmul(torch.randn(4, 64), packed, prefill_min_rows=path)
        assert torch.equal(y[:, :5], torch.zeros(4, 5))


def test_errors_say_what_was_found() -> None:
    weight, scale = make_weight(32, 64, seed=1)
    packed = cpu_int4.pack(weight, scale)
    with pytest.raises(ValueError, match="has 32 features but the weight expects 64"):
        cpu_int4.matmul(torch.randn(2, 32), packed)
    with pytest.raises(TypeError, match="floating-point"):
        cpu_int4.matmul(torch.ones(2, 64, dtype=torch.int32), packed)
    with pytest.raises(ValueError, match="int8"):
        cpu_int4.pack(weight.to(torch.int16), scale)
    with pytest.raises(ValueError, match=r"one scale per output row \(\[32\]\)"):
        cpu_int4.pack(weight, scale[:8])
