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

import math

import pytest
import torch

from chatglm.quant.kernels import cpu_int4
from chatglm.quant.kernels import cpu_pack
from chatglm.quant.int4 import dequantize_int4, pack_int4, unpack_int4

pytestmark = pytest.mark.skipif(
    not cpu_int4.is_available(),
    reason=f"torch {torch.__version__} has no working CPU int4 kernel (_weight_int4pack_mm_for_cpu)",
)

KERNEL = 10**9  # prefill_min_rows that keeps every input on the int4 kernel
PREFILL = 1  # prefill_min_rows that sends every input to the int8-GEMM path
SHAPES = [(64, 32), (144, 32), (32, 72), (37, 64), (80, 200), (130, 384), (16, 13696 // 16)]
PACK_SHAPES = [(1, 2), (37, 2), (64, 32), (100, 70), (257, 96), (130, 384), (192, 4128), (64, 13696),
               (70, 13702), (64, 16416)]
"""Row and column padding, K a multiple of 32 but not of 64 (4128) or of 256 (13696), one 64-row block
per chunk (13696), rows too long for one chunk (16416: column windows)."""
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


def padded(n: int, k: int) -> tuple[int, int]:
    return math.ceil(n / 64) * 64, math.ceil(k / 32) * 32


@pytest.fixture
def block() -> int:
    """The kernel's row-block size when the direct packer applies here."""
    found = cpu_int4._pack_block()
    if found is None:
        pytest.skip("the direct packer does not match torch's converter on this CPU (see the probe test)")
    return found


def test_layout_probe_finds_the_direct_packer() -> None:
    assert cpu_int4._pack_block() in (64, 32), "the direct packer does not match torch's converter on this CPU"


@pytest.mark.parametrize("n,k", PACK_SHAPES)
def test_direct_pack_equals_torch_converter(n: int, k: int, block: int) -> None:
    weight, scale = make_weight(n, k, seed=n + k)
    po, pi = padded(n, k)
    want = cpu_int4._pack_with_converter(weight, po, pi)
    assert torch.equal(cpu_pack.pack_direct(weight, po, pi, block), want)
    packed = cpu_int4.pack(weight, scale)
    assert packed.packed.dtype == torch.uint8 and torch.equal(packed.packed, want)


@pytest.mark.parametrize("limit", [64, 1000, 6000])
@pytest.mark.parametrize("workers", [1, 3])
def test_chunks_windows_and_threads_give_the_same_bytes(limit: int, workers: int, block: int) -> None:
    """Small chunk limits split rows into several chunks and wide rows into column windows."""
    for n, k in [(100, 70), (192, 4128), (70, 13702)]:
        weight, _ = make_weight(n, k, seed=k)
        po, pi = padded(n, k)
        got = cpu_pack.pack_direct(weight, po, pi, block, workers=workers, limit=limit)
        assert torch.equal(got, cpu_int4._pack_with_converter(weight, po, pi)), (n, k)


@pytest.mark.parametrize("block", [64, 32])
def test_both_block_layouts_invert_through_the_decoder(block: int) -> None:
    """The AVX2 layout (32-row blocks) cannot be compared with torch's converter on an AVX512 CPU;
    the prefill decoder reads both layouts, so decoding must give back ``16 * code`` exactly."""
    n, k = 100, 200
    weight, _ = make_weight(n, k, seed=block)
    po, pi = padded(n, k)
    codes = torch.zeros(po, pi, dtype=torch.int8)
    codes[:n, :k] = unpack_int4(weight)
    got = torch.empty(pi, po, dtype=torch.int8)
    cpu_int4._decode_block(cpu_pack.pack_direct(weight, po, pi, block, limit=500), block, got)
    assert torch.equal(got, (16 * codes).T)


@pytest.mark.usefixtures("block")
def test_inplace_pack_reuses_the_weight_memory() -> None:
    weight, scale = make_weight(128, 256, seed=3)
    w_ref = dequantize_int4(weight, scale)
    want = cpu_int4._pack_with_converter(weight, 128, 256)
    packed = cpu_int4.pack(weight, scale, inplace=True)
    assert packed.packed.data_ptr() == weight.data_ptr() and torch.equal(packed.packed, want)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    assert_close_rel(cpu_int4.matmul(x, packed, prefill_min_rows=KERNEL), x @ w_ref.T, *tolerances(KERNEL, x.dtype))


@pytest.mark.parametrize("n,k,limit", [(100, 256, 65534), (128, 250, 65534), (128, 256, 1000)])
def test_inplace_pack_leaves_the_weight_where_it_cannot(n: int, k: int, limit: int, block: int) -> None:
    """Padding (rows or columns) or column windows need a fresh output; the weight stays intact."""
    weight, _ = make_weight(n, k, seed=5)
    original = weight.clone()
    po, pi = padded(n, k)
    got = cpu_pack.pack_direct(weight, po, pi, block, inplace=True, limit=limit)
    assert got.data_ptr() != weight.data_ptr() and torch.equal(weight, original)
    assert torch.equal(got, cpu_int4._pack_with_converter(original, po, pi))


def test_unaligned_and_strided_weights() -> None:
    weight, _ = make_weight(96, 512, seed=6)
    base = torch.zeros(weight.numel() + 3, dtype=torch.int8)
    unaligned = base[3:].view(96, 256)
    unaligned.copy_(weight)
    strided = torch.zeros(96, 300, dtype=torch.int8)[:, :256]
    strided.copy_(weight)
    want = cpu_int4._pack_with_converter(weight, 128, 512)
    for w in (unaligned, strided):
        assert torch.equal(cpu_int4.pack(w, torch.ones(96, dtype=torch.float16), inplace=True).packed, want)
    assert torch.equal(strided, weight)


@pytest.mark.parametrize("inplace", [False, True])
def test_pack_under_inference_mode_with_threads(inplace: bool, block: int) -> None:
    """Worker threads do not inherit inference mode, yet write inference tensors made by the caller."""
    weight, _ = make_weight(256, 2048, seed=9)
    want = cpu_int4._pack_with_converter(weight, 256, 2048)
    with torch.inference_mode():
        w = weight.clone()
        got = cpu_pack.pack_direct(w, 256, 2048, block, inplace=inplace, workers=2, limit=20000)
    assert torch.equal(got, want) and (got.data_ptr() == w.data_ptr()) == inplace


def test_inference_tensor_is_not_overwritten_outside_inference_mode(block: int) -> None:
    weight, _ = make_weight(256, 2048, seed=10)
    with torch.inference_mode():
        w = weight.clone()
    got = cpu_pack.pack_direct(w, 256, 2048, block, inplace=True, workers=2, limit=20000)
    assert got.data_ptr() != w.data_ptr() and torch.equal(w, weight)
    assert torch.equal(got, cpu_int4._pack_with_converter(weight, 256, 2048))


def test_converter_fallback_gives_the_same_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    weight, scale = make_weight(100, 70, seed=8)
    direct = cpu_int4.pack(weight, scale)
    monkeypatch.setattr(cpu_int4, "_direct_probed", True)
    monkeypatch.setattr(cpu_int4, "_direct_block", None)
    fallback = cpu_int4.pack(weight, scale)
    assert torch.equal(direct.packed, fallback.packed)
    assert torch.equal(direct.scales_and_zeros, fallback.scales_and_zeros) and torch.equal(direct.scale, fallback.scale)


def test_chunks_keep_every_op_below_the_parallel_grain() -> None:
    for words in (1, 2, 256, 856, 1023, 1024, 5000):
        rows, width = cpu_pack.chunk_shape(64, words)
        assert rows % 64 == 0 and rows * width // 2 < cpu_pack.GRAIN and (rows == 64 or width == words)


def test_tinygemm_bytes_keep_the_official_nibble_order_with_unsigned_codes() -> None:
    from chatglm.quant.kernels import cuda_int4pack
    from chatglm.quant.int4 import pack_int4, unpack_int4
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    got = cuda_int4pack.tinygemm_bytes(pack_int4(codes))
    assert got.dtype == torch.uint8 and got.shape == (3, 16)
    q = codes.to(torch.int16) + 8
    assert torch.equal(got.to(torch.int16), (q[:, 0::2] << 4) | q[:, 1::2])  # even column high, q = code + 8
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert cuda_int4pack.supports_shape(4608, 4096) and cuda_int4pack.supports_shape(4096, 13696)
    assert not cuda_int4pack.supports_shape(4, 4096) and not cuda_int4pack.supports_shape(64, 100)


def test_cuda_backends_are_never_candidates_or_usable_without_a_cuda_gpu(tmp_path) -> None:
    from chatglm.quant import dispatch
    from chatglm.quant.kernels import cuda_int4pack
    from chatglm.quant.linear import Int4Linear
    cpu = torch.device("cpu")
    assert cuda_int4pack.unavailable(cpu) == "needs a CUDA GPU"
    assert not {"cuda-int4pack", "triton"} & set(dispatch.candidates(cpu, torch.bfloat16))
    assert dispatch.candidates(cpu, torch.float32) == ["reference"]
    assert dispatch.default_dtype(cpu) == torch.bfloat16
    layer = Int4Linear(64, 64, bias=False)
    layer.weight.zero_()
    layer.weight_scale.fill_(1)
    with pytest.raises(ValueError, match="unknown int4 backend 'nope'"):
        dispatch.prepare_layer(layer, "nope")
    dispatch.prepare_layer(layer, "cpu-int4")
    assert layer.backend == "cpu-int4" and layer.weight is None
    assert {"packed_weight", "packed_scales_and_zeros", "packed_row_scale"} <= set(dict(layer.named_buffers()))
    dispatch.prepare_layer(layer, "cpu-int4")  # already packed: a no-op
    with pytest.raises(ValueError, match="packed for cpu-int4"):
        dispatch.prepare_layer(layer, "reference")
