// Shared by the CPU kernels: block sizes, run-time ISA detection, rounding, the row-parallel driver.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace chatglm_kernels {

constexpr int64_t QBLOCK = 128;      // columns per block: one 64-byte int4 weight chunk, one int8 head scale
constexpr int64_t CHUNK = QBLOCK / 2;  // weight bytes per block
constexpr int64_t MAX_ROWS = 8;
constexpr int64_t GRAIN_ROWS = 16;   // output rows per parallel task at least
constexpr int64_t PREFETCH = 2048;   // bytes ahead of the int4 read (measured: 2-4 KiB best, +25 % over none)

// Distance between the rows of quantized activations for `kpad` columns (a whole number of blocks):
// one block more, so that at a power-of-two K (4096) the rows do not all fall into the same L1 sets,
// more than its ways (8 on the AMD EPYC); the 8-row int4 kernel took 2.6x its time there (4 rows: 1.3x).
inline int64_t padded_row_stride(int64_t kpad) { return kpad + QBLOCK; }

enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX_VNNI = 2, AVX512_VNNI = 3 };

inline bool isa_supported(int64_t isa) {
  __builtin_cpu_init();
  switch (isa) {
    case SCALAR: return true;
    case AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case AVX_VNNI: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("avxvnni");
    case AVX512_VNNI: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
}

inline int64_t best_isa() {
  for (int64_t isa : {AVX512_VNNI, AVX_VNNI, AVX2})
    if (isa_supported(isa)) return isa;
  return SCALAR;
}

inline float round_even(float v) {  // nearest, ties to even (default rounding), for |v| < 2^22
  constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23
  return (v + MAGIC) - MAGIC;
}

// The largest |x| of `len` values, or NaN when one of them is inf or NaN (x - x is NaN exactly then).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float block_amax_avx512(const float* xb, int64_t len) {
  __m512 m = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 keep = len - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(keep, xb + i);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
    bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));
  }
  return _mm512_reduce_add_ps(bad) == 0.f ? _mm512_reduce_max_ps(m) : NAN;
}

inline float amax_scalar(const float* x, int64_t len) {
  float amax = 0.f;
  for (int64_t i = 0; i < len; ++i) amax = std::isfinite(x[i]) ? std::max(amax, std::fabs(x[i])) : NAN;
  return amax;
}

template <typename Args, typename Fn>
inline void run_rows(const Args& args, int64_t n, Fn fn) {
  at::parallel_for(0, n, GRAIN_ROWS, [&](int64_t n0, int64_t n1) { fn(args, n0, n1); });
}

#define CHATGLM_BY_ROWS(M_VALUE, KERNEL) \
  switch (M_VALUE) { \
    case 1: run_rows(args, n, KERNEL<1>); break; \
    case 2: run_rows(args, n, KERNEL<2>); break; \
    case 3: run_rows(args, n, KERNEL<3>); break; \
    case 4: run_rows(args, n, KERNEL<4>); break; \
    case 5: run_rows(args, n, KERNEL<5>); break; \
    case 6: run_rows(args, n, KERNEL<6>); break; \
    case 7: run_rows(args, n, KERNEL<7>); break; \
    default: run_rows(args, n, KERNEL<8>); break; \
  }

inline int64_t checked_isa(int64_t isa) {
  const int64_t chosen = isa < 0 ? best_isa() : isa;
  TORCH_CHECK(isa_supported(chosen), "int4 kernel: ISA path ", chosen, " is not supported by this CPU");
  return chosen;
}

inline at::Tensor check_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "int4 kernel: x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= MAX_ROWS, "int4 kernel: M must be 1..", MAX_ROWS, ", got ", x.size(0));
  TORCH_CHECK(x.is_floating_point() && x.device().is_cpu(), "int4 kernel: x must be a floating-point CPU tensor");
  return x.to(at::kFloat).contiguous();
}

}  // namespace chatglm_kernels
