"""Our C++ CPU kernels (``chatglm.quant.kernels.native``) against the reference dequantization, on
every ISA path this machine can run (each one forced).

Tolerances (relative L2 error against float32 products of the same inputs): the int4 kernel splits
each activation row into two int8 terms (~16 bits of the row's largest value) and sums exactly in
int32, so float32 outputs are within 2e-4 (measured ~2e-5); bfloat16 / float16 outputs add their own
rounding (2^-9 / 2^-11). Every ISA path computes the same integers and the same float epilogue, so
their outputs are equal bit for bit. The int8 output layer quantizes activations per block of 128
(~0.5 % each), so 1.5e-2 there.
"""
from __future__ import annotations

import logging

import pytest
import torch

from chatglm.quant.int4 import dequantize_int4, pack_int4
from chatglm.quant.kernels import cpu_native, native

pytestmark = pytest.mark.skipif(native.toolchain_missing() is not None,
                                reason=f"the C++ extension cannot be built here: {native.toolchain_missing()}")


def test_the_extension_builds_where_a_toolchain_exists() -> None:
    assert native.load(), native.unavailable_reason()  # a build error fails here, never skips

SHAPES = [(37, 4096), (5, 13696), (41, 13696), (3, 66), (17, 200), (9, 2), (16, 130)]
"""The 6B models' K (4096, 13696) with few rows, and with enough rows for the AVX512 kernel's groups of
rows (its column slabs at every M, and a range's last rows one at a time); odd N; K below one block,
with partial chunks."""
OUT_TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-3, torch.float16: 2e-3}


def make_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    return pack_int4(codes), (torch.rand(n, generator=gen) * 0.05 + 0.001).to(torch.float16)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_gemv_matches_reference_on_every_isa_path(n: int, k: int, dtype: torch.dtype) -> None:
    w, s = make_weight(n, k, seed=n * 7 + k)
    ref_w = dequantize_int4(w, s)
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    for m in range(1, 9):
        want = x[:m].float() @ ref_w.T
        outs = {isa: native.int4_gemv(x[:m], w, s, isa) for isa in native.supported_isas()}
        for isa, y in outs.items():
            assert y.dtype == dtype and y.shape == (m, n)
            assert rel_err(y, want) <= OUT_TOL[dtype], f"{isa} at M={m}: {rel_err(y, want):.2e}"
            assert torch.equal(y, outs["scalar"]), f"{isa} differs from the scalar path at M={m}"


def test_default_path_is_the_best_isa_and_rows_are_independent() -> None:
    w, s = make_weight(64, 4096, seed=1)
    x = torch.randn(8, 4096)
    assert torch.equal(native.int4_gemv(x, w, s), native.int4_gemv(x, w, s, native.best_isa()))
    one_by_one = torch.cat([native.int4_gemv(x[i:i + 1], w, s) for i in range(8)])
    assert torch.equal(native.int4_gemv(x, w, s), one_by_one)  # a row's result does not depend on the others


def test_non_finite_rows_give_nan_and_zero_rows_give_zero() -> None:
    w, s = make_weight(20, 256, seed=2)
    x = torch.randn(4, 256)
    x[1, 3], x[2, 200] = float("nan"), float("inf")
    x[3] = 0
    for isa in native.supported_isas():
        y = native.int4_gemv(x, w, s, isa)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
        assert torch.equal(y[3], torch.zeros(20))


def test_int4_unpack_gives_codes_and_dequantized_rows() -> None:
    codes = torch.randint(-8, 8, (11, 70), dtype=torch.int8)
    w, s = pack_int4(codes), torch.rand(11).half()
    assert torch.equal(native.int4_unpack(w, s, 2, torch.empty(7, 70, dtype=torch.int8)), codes[2:9])
    ref = dequantize_int4(w, s)
    assert torch.equal(native.int4_unpack(w, s, 0, torch.empty(11, 70)), ref)
    assert torch.equal(native.int4_unpack(w, s, 0, torch.empty(11, 70, dtype=torch.bfloat16)), ref.bfloat16())
    big = torch.randint(-8, 8, (3, 4096), dtype=torch.int8)  # whole AVX512 steps and a tail
    wb, sb = pack_int4(big), torch.rand(3).half()
    for k in (4096, 4066):
        wk = wb[:, : k // 2].contiguous()
        got = native.int4_unpack(wk, sb, 0, torch.empty(3, k, dtype=torch.bfloat16))
        assert torch.equal(got, dequantize_int4(wk, sb).bfloat16())
    with pytest.raises(RuntimeError, match="outside the weight"):
        native.int4_unpack(w, s, 5, torch.empty(7, 70, dtype=torch.int8))


@pytest.mark.parametrize("n,k", [(37, 4096), (9, 200), (5, 64)])
def test_int8_head_kernel_and_quantizer(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    wf = torch.randn(n, k, generator=gen) * 0.03
    codes, scale = native.quantize_rows_int8(wf.bfloat16())
    wb = wf.bfloat16().float()
    assert [torch.equal(a, b) for a, b in zip(native.quantize_rows_int8(wb), (codes, scale))] == [True, True]
    amax = wb.abs().amax(1)
    assert torch.allclose(scale, amax / 127)
    ref = torch.round(wb * (127 / amax)[:, None]).clamp(-127, 127)
    off = (codes.float() - ref).abs()  # values within float rounding of a half may round either way
    assert codes.dtype == torch.int8 and off.max() <= 1 and int((off > 0).sum()) <= max(2, off.numel() // 1000)
    x = torch.randn(8, k, generator=gen)
    for m in (1, 3, 8):
        want = x[:m] @ (codes.float() * scale[:, None]).T
        for isa in ("scalar", native.best_isa()):
            assert rel_err(native.int8_gemv(x[:m], codes, scale, isa), want) <= 1.5e-2


def test_bad_inputs_are_refused_with_a_reason() -> None:
    w, s = make_weight(8, 64, seed=3)
    with pytest.raises(RuntimeError, match="M must be 1..8"):
        native.int4_gemv(torch.randn(9, 64), w, s)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        native.int4_gemv(torch.randn(1, 66), w, s)
    with pytest.raises(RuntimeError, match="scale must be a contiguous fp16"):
        native.int4_gemv(torch.randn(1, 64), w, s.float())
    with pytest.raises(ValueError, match="isa must be one of"):
        native.int4_gemv(torch.randn(1, 64), w, s, "sse9")
    missing = [isa for isa in native.ISA_PATHS if isa not in native.supported_isas()]
    if missing:
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            native.int4_gemv(torch.randn(1, 64), w, s, missing[0])


@pytest.mark.parametrize("path", cpu_native.PREFILL_PATHS)
def test_matmul_routes_every_row_count(path: str) -> None:
    cpu_native.set_prefill_path(path)
    try:
        w, s = make_weight(70, 4096, seed=4)
        ref_w = dequantize_int4(w, s)
        for m in (1, 8, 9, 24, 25, 40):
            x = torch.randn(2, m, 4096).to(torch.bfloat16)
            y = cpu_native.matmul(x, w, s)
            assert y.shape == (2, m, 70) and y.dtype == torch.bfloat16
            assert rel_err(y, x.float() @ ref_w.T) <= 1e-2, (path, m)
    finally:
        cpu_native.set_prefill_path(None)


def test_prefill_path_is_measured_once_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_native.set_prefill_path(None)
    calls = []
    monkeypatch.setattr(cpu_native, "measure_prefill", lambda: calls.append(1) or {"bf16": 1.0, "int8": 2.0})
    assert cpu_native.prefill_path() == "int8" and cpu_native.prefill_path() == "int8" and len(calls) == 1
    cpu_native.set_prefill_path(None)
    with pytest.raises(ValueError, match="prefill path must be one of"):
        cpu_native.set_prefill_path("fp8")


def test_without_a_compiler_the_backend_steps_aside_with_one_logged_line(monkeypatch, caplog) -> None:
    """A machine without a compiler, simulated: the load fails once, logged once, and the CPU
    candidates start at torch's int4 kernel; with the compiler back the extension loads again."""
    from chatglm.quant.dispatch import candidates
    native.forget()
    monkeypatch.setenv("CXX", "no-such-compiler-anywhere")
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert not native.load() and not native.load()
            assert candidates(torch.device("cpu"), torch.bfloat16)[0] == "cpu-int4"
        lines = [r for r in caplog.records if r.name == native.__name__]
        assert len(lines) == 1 and "no C++ compiler" in lines[0].getMessage()
    finally:
        monkeypatch.delenv("CXX")
        native.forget()
    assert native.load() and candidates(torch.device("cpu"), torch.bfloat16)[0] == "cpu-native"
