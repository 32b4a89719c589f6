"""The Triton int4 kernels under Triton's CPU interpreter against the reference dequantization.

``triton.jit`` reads ``TRITON_INTERPRET`` when it is applied, and ``triton_int4`` applies it at the
first call (cached per mode), so setting the variable per test is enough. The interpreter is ~1000x
slower than a GPU: shapes stay small. Tolerances (largest element error over the reference's largest
magnitude): float32 inputs 1e-5 (float32 accumulation of exact products); fp16 2e-3 (the output's
fp16 rounding, 2^-11); bf16 1e-2 (the interpreter truncates float32 to bf16: up to 2^-8).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from chatglm.quant.kernels import triton_int4
from chatglm.quant.int4 import dequantize_int4, pack_int4

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton); its kernels are checked under TRITON_INTERPRET=1",
)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) * 0.05 + 0.001).to(torch.float16)
    return pack_int4(codes), scale


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", [(32, 32), (64, 64), (48, 72)])
def test_int4_matmul_matches_reference(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    assert triton_int4.is_available()
    weight, scale = make_weight(n, k, seed=m * 100 + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = triton_int4.int4_matmul(x, weight, scale)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = x.double() @ dequantize_int4(weight, scale, torch.float64).T
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} for M={m} N={n} K={k} {dtype}"


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_long_k_tiles_and_fp32_scale() -> None:
    """K spanning several tiles of both kernels with a ragged tail, and a float32 scale."""
    n, k = 40, 2 * (2 * 128 + 20)
    weight, scale = make_weight(n, k, seed=9)
    scale32 = scale.float()
    ref_w = dequantize_int4(weight, scale32, torch.float64)
    for m in (2, 20):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = triton_int4.int4_matmul(x, weight, scale32)
        ref = x.double() @ ref_w.T
        assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 1e-5


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_non_contiguous_input_and_zero_rows() -> None:
    weight, scale = make_weight(32, 64, seed=5)
    x = torch.randn(64, 6)[:, ::2].T  # [3, 64], not contiguous
    ref = x.double() @ dequantize_int4(weight, scale, torch.float64).T
    y = triton_int4.int4_matmul(x, weight, scale)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert triton_int4.int4_matmul(torch.randn(0, 64), weight, scale).shape == (0, 32)


def test_input_errors_say_what_was_found() -> None:
    weight, scale = make_weight(32, 64, seed=1)
    with pytest.raises(ValueError, match="x has 32 columns but the packed weight holds 64"):
        triton_int4.int4_matmul(torch.randn(2, 32), weight, scale)
    with pytest.raises(ValueError, match="int8"):
        triton_int4.int4_matmul(torch.randn(2, 64), weight.to(torch.uint8), scale)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        triton_int4.int4_matmul(torch.randn(2, 64, dtype=torch.float64), weight, scale)
    with pytest.raises(ValueError, match="one float scale per weight row"):
        triton_int4.int4_matmul(torch.randn(2, 64), weight, scale[:4])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal; this machine has CUDA")
def test_cpu_tensors_without_interpreter_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    weight, scale = make_weight(32, 64, seed=1)
    if importlib.util.find_spec("triton") is not None:
        assert not triton_int4.is_available()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|not installed"):
        triton_int4.int4_matmul(torch.randn(2, 64), weight, scale)


def test_import_does_not_load_triton() -> None:
    """The module alone (loaded from its file, apart from the package) must not import Triton."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('triton_int4', {triton_int4.__file__!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
