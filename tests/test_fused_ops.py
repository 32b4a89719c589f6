"""The fused bfloat16 row ops (RMSNorm, SwiGLU) of the CPU decode step: against the torch formulas,
scalar path == AVX512 path bit for bit, a batch == each row alone, and where the model uses them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatglm.quant.kernels import cpu_fused, native

pytestmark = pytest.mark.skipif(not native.load(), reason="the C++ extension cannot be built here")

BF16_ULP = 2.0 ** -7
"""bfloat16's relative rounding step: fused and torch results may differ by one rounding of each."""


def _isas() -> list[str]:
    return [i for i in ("scalar", "avx512-vnni") if i in native.supported_isas()]


def _rms_torch(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _rows(n: int, d: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * scale).bfloat16()


@pytest.mark.parametrize("d", [4096, 4099, 7])
@pytest.mark.parametrize("isa", _isas())
def test_rms_norm_matches_torch_within_one_bf16_rounding(d, isa):
    x, w = _rows(5, d, 3.0, 0), _rows(1, d, 1.0, 1)[0]
    want = _rms_torch(x, w, 1e-5)
    for weight in (w, w.float()):
        got = cpu_fused.rms_norm(x, weight, 1e-5, isa)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=BF16_ULP, atol=1e-6)


@pytest.mark.parametrize("f", [13696, 13699, 5])
@pytest.mark.parametrize("isa", _isas())
def test_swiglu_matches_torch_within_one_bf16_rounding(f, isa):
    h = _rows(3, 2 * f, 4.0, 2)
    gate, up = h.chunk(2, dim=-1)
    got, want = cpu_fused.swiglu(h, isa), F.silu(gate) * up
    assert got.dtype == torch.bfloat16 and got.shape == (3, f)
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_ULP, atol=1e-6)


def test_swiglu_keeps_extremes_and_nan():
    h = torch.tensor([[-100.0, 100.0, 0.0, float("nan"), 2.0, 2.0, 2.0, 2.0]]).bfloat16()
    for isa in _isas():
        got = cpu_fused.swiglu(h, isa).float()[0]
        # exp is clamped at e^-87 (no subnormals), so silu(-100) is -100 e^-87 rather than -100 e^-100
        assert abs(got[0].item()) < 1e-30 and got[1].item() == 200.0 and got[2].item() == 0.0
        assert torch.isnan(got[3])


@pytest.mark.skipif("avx512-vnni" not in native.supported_isas(), reason="this CPU has no AVX512-VNNI")
def test_scalar_and_avx512_paths_agree_bit_for_bit():
    x, w = _rows(4, 4100, 5.0, 3), _rows(1, 4100, 1.0, 4)[0]
    for weight in (w, w.float()):  # the model's bfloat16 weight, and a float32 one
        assert torch.equal(cpu_fused.rms_norm(x, weight, 1e-5, "scalar"),
                           cpu_fused.rms_norm(x, weight, 1e-5, "avx512-vnni"))
    h = _rows(4, 2 * 13699, 6.0, 5)
    assert torch.equal(cpu_fused.swiglu(h, "scalar"), cpu_fused.swiglu(h, "avx512-vnni"))


def test_a_batch_gives_each_rows_bits():
    x, w, h = _rows(6, 4096, 2.0, 6), _rows(1, 4096, 1.0, 7)[0], _rows(6, 27392, 3.0, 8)
    batch_r, batch_s = cpu_fused.rms_norm(x, w, 1e-5), cpu_fused.swiglu(h)
    for i in range(6):
        assert torch.equal(batch_r[i:i + 1], cpu_fused.rms_norm(x[i:i + 1], w, 1e-5))
        assert torch.equal(batch_s[i:i + 1], cpu_fused.swiglu(h[i:i + 1]))


def test_bad_inputs_are_refused_with_the_rule():
    with pytest.raises(RuntimeError, match="CPU bfloat16"):
        cpu_fused.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        cpu_fused.rms_norm(torch.ones(2, 8).bfloat16(), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="must be even"):
        cpu_fused.swiglu(torch.ones(2, 7).bfloat16())


def test_used_only_for_cpu_bfloat16():
    assert cpu_fused.applies(torch.ones(2, dtype=torch.bfloat16))
    assert not cpu_fused.applies(torch.ones(2))
    assert not cpu_fused.applies(torch.ones(2, dtype=torch.float16))
    assert not cpu_fused.applies(torch.ones(2, dtype=torch.bfloat16, device="meta"))


def test_fake_kernels_give_the_output_shapes():
    assert cpu_fused.applies(torch.ones(2, dtype=torch.bfloat16))  # registers the fakes
    x = torch.empty(2, 3, 4096, dtype=torch.bfloat16, device="meta")
    assert torch.ops.chatglm.rms_norm(x, torch.empty(4096, device="meta"), 1e-5).shape == x.shape
    assert torch.ops.chatglm.swiglu(torch.empty(2, 3, 20, dtype=torch.bfloat16, device="meta")).shape == (2, 3, 10)
