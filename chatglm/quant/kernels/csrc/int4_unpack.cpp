// Rows of the official int4 weight (see int4_gemv.cpp) unpacked for prefill: int8 codes, or
// dequantized (code * row scale) in bfloat16 / float32, into a buffer the caller reuses.
#include "common.h"

namespace chatglm_kernels {
namespace {

// One row dequantized to bfloat16 on AVX512 (16 bytes -> 32 values per step), rounded to nearest
// even like at::BFloat16; the scalar tail handles K/2 not a multiple of 16.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i to_bf16_bits(__m512 f) {
  const __m512i b = _mm512_castps_si512(f);  // finite values: round to nearest even, keep the high half
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void dequant_row_bf16_avx512(const int8_t* src, int64_t half,
                                                                                  float s, at::BFloat16* dst) {
  const __m512 vs = _mm512_set1_ps(s);
  int64_t j = 0;
  for (; j + 16 <= half; j += 16) {
    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
    const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 4)), vs);
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28)), vs);
    const __m512i pair = _mm512_or_si512(to_bf16_bits(hi), _mm512_slli_epi32(to_bf16_bits(lo), 16));
    _mm512_storeu_si512(dst + 2 * j, pair);
  }
  for (; j < half; ++j) {
    dst[2 * j] = static_cast<at::BFloat16>(static_cast<float>(src[j] >> 4) * s);
    dst[2 * j + 1] = static_cast<at::BFloat16>(static_cast<float>(static_cast<int8_t>(src[j] << 4) >> 4) * s);
  }
}

// Rows [r0, r0 + out.size(0)) of the official weight into `out` [rows, K]: int8 codes, or
// dequantized (code * scale) in bfloat16 / float32. The caller reuses `out` between calls: a fresh
// multi-MiB tensor per call would cost more in page faults than the unpacking itself.
at::Tensor& int4_unpack(const at::Tensor& weight, const at::Tensor& scale, int64_t r0, at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "int4_unpack: weight must be a contiguous int8 [N, K/2] tensor");
  const int64_t half = weight.size(1), r1 = r0 + out.size(0);
  const at::ScalarType dtype = out.scalar_type();
  TORCH_CHECK(out.dim() == 2 && out.size(1) == 2 * half && out.is_contiguous(), "int4_unpack: out must be a contiguous [rows, ", 2 * half, "] tensor");
  TORCH_CHECK(0 <= r0 && r1 <= weight.size(0), "int4_unpack: rows ", r0, "..", r1, " are outside the weight's ", weight.size(0));
  TORCH_CHECK(dtype == at::kChar || dtype == at::kBFloat16 || dtype == at::kFloat, "int4_unpack: out must be int8, bfloat16 or float32");
  const int8_t* w = weight.data_ptr<int8_t>();
  const at::Half* sc = scale.data_ptr<at::Half>();
  const bool avx512 = isa_supported(AVX512_VNNI);
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const int8_t* src = w + r * half;
      if (dtype == at::kChar) {
        int8_t* dst = out.data_ptr<int8_t>() + (r - r0) * 2 * half;
        for (int64_t j = 0; j < half; ++j) {
          dst[2 * j] = static_cast<int8_t>(src[j] >> 4);
          dst[2 * j + 1] = static_cast<int8_t>(static_cast<int8_t>(src[j] << 4) >> 4);
        }
      } else {
        const float s = static_cast<float>(sc[r]);
        auto fill = [&](auto* dst) {
          using T = std::remove_pointer_t<decltype(dst)>;
          for (int64_t j = 0; j < half; ++j) {
            dst[2 * j] = static_cast<T>(static_cast<float>(src[j] >> 4) * s);
            dst[2 * j + 1] = static_cast<T>(static_cast<float>(static_cast<int8_t>(src[j] << 4) >> 4) * s);
          }
        };
        if (dtype == at::kBFloat16 && avx512) dequant_row_bf16_avx512(src, half, s, out.data_ptr<at::BFloat16>() + (r - r0) * 2 * half);
        else if (dtype == at::kBFloat16) fill(out.data_ptr<at::BFloat16>() + (r - r0) * 2 * half);
        else fill(out.data_ptr<float>() + (r - r0) * 2 * half);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace chatglm_kernels

TORCH_LIBRARY_FRAGMENT(chatglm, m) {
  m.def("int4_unpack(Tensor weight, Tensor scale, int r0, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(chatglm, CPU, m) {
  m.impl("int4_unpack", chatglm_kernels::int4_unpack);
}
