// The int8 output layer: GEMV/GEMM for M = 1..8 rows over int8 [N, K] weights with float32 row
// scales; activations quantized to int8 per block of QBLOCK values (one float scale per block).
#include "common.h"

namespace chatglm_kernels {
namespace {

constexpr int64_t HEAD_PREFETCH = 16384;

// Activations of M rows quantized per block of QBLOCK columns, `stride` (padded_row_stride) apart.
struct QAct {
  int64_t m = 0, nblk = 0, stride = 0;
  std::vector<int8_t> q;     // [m][stride], zero-padded past K
  std::vector<float> s;      // [m][nblk]
};

// Portable quantization of one block of `len` values into `qb` (zeroed).
void quantize_block_scalar(const float* xb, int64_t len, float inv, int8_t* qb) {
  for (int64_t i = 0; i < len; ++i) qb[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, round_even(xb[i] * inv))));
}

// A whole block (QBLOCK values) on AVX512: rounded by the conversion (nearest-even), narrowed with saturation.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_block_avx512(const float* xb, float inv, int8_t* qb) {
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t j = 0; j < QBLOCK; j += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + j),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + j), vinv))));
}

QAct quantize(const at::Tensor& x32, bool avx512) {
  QAct a;
  a.m = x32.size(0);
  const int64_t k = x32.size(1);
  a.nblk = (k + QBLOCK - 1) / QBLOCK;
  a.stride = padded_row_stride(a.nblk * QBLOCK);
  a.q.assign(a.m * a.stride, 0);
  a.s.assign(a.m * a.nblk, 0.f);
  const float* x = x32.data_ptr<float>();
  for (int64_t r = 0; r < a.m; ++r) {
    for (int64_t b = 0; b < a.nblk; ++b) {
      const float* xb = x + r * k + b * QBLOCK;
      const int64_t len = std::min(QBLOCK, k - b * QBLOCK);
      const float amax = avx512 ? block_amax_avx512(xb, len) : amax_scalar(xb, len);
      // An all-zero block gets scale 0; one holding inf or NaN gets scale NaN, so that the outputs
      // are NaN as with any float matmul (never silently finite).
      const float s = amax / 127.f, inv = amax > 0.f && std::isfinite(amax) ? 127.f / amax : 0.f;
      int8_t* qb = a.q.data() + r * a.stride + b * QBLOCK;
      if (avx512 && len == QBLOCK) quantize_block_avx512(xb, inv, qb);
      else quantize_block_scalar(xb, len, inv, qb);
      a.s[r * a.nblk + b] = s;
    }
  }
  return a;
}

// ---- int8 rows (the output layer): y[r][n] = scale[n] * sum_b s_b * dot(w_b, q_b) ----

struct Int8Args {
  const int8_t* w; int64_t k; const float* scale; const QAct* a; float* y; int64_t n_total;
};

template <int M>
void int8_scalar(const Int8Args& p, int64_t n0, int64_t n1) {
  const QAct& a = *p.a;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = p.w + n * p.k;
    float acc[M] = {};
    for (int64_t b = 0; b < a.nblk; ++b) {
      const int64_t len = std::min(QBLOCK, p.k - b * QBLOCK);
      for (int r = 0; r < M; ++r) {
        const int8_t* q = a.q.data() + r * a.stride + b * QBLOCK;
        int32_t dot = 0;
        for (int64_t j = 0; j < len; ++j) dot += row[b * QBLOCK + j] * q[j];
        acc[r] += a.s[r * a.nblk + b] * static_cast<float>(dot);
      }
    }
    for (int r = 0; r < M; ++r) p.y[r * p.n_total + n] = p.scale[n] * acc[r];
  }
}

// w * q as u8 x s8: |w| times q with w's sign moved onto q (weights are clamped to -127..127).
// A tile of R weight rows shares each activation load and gives R independent chains and R memory
// streams; the software prefetch runs HEAD_PREFETCH bytes ahead in each row, into L2. Measured on the
// 65024 x 4096 layer from DRAM, 2 threads, AMD EPYC, against the earlier L1 prefetch 2 KiB ahead (with
// the padded activation rows): M = 1 8.8 against 11.6 ms, M = 4 10.1 against 15.5 ms; 8-64 KiB ahead
// within 10 % of each other, 16-32 KiB best.
template <int M>
constexpr int head_tile_rows() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline void int8_tile_avx512(const Int8Args& p,
                                                                                             int64_t n) {
  const QAct& a = *p.a;
  const __m512i zero = _mm512_setzero_si512();
  const int8_t* rows[R];
  __m512 acc[R][M];
  for (int i = 0; i < R; ++i) {
    rows[i] = p.w + (n + i) * p.k;
    for (int r = 0; r < M; ++r) acc[i][r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < a.nblk; ++b) {
    const int64_t len = std::min(QBLOCK, p.k - b * QBLOCK);
    __m512i dot[R][M];
    for (int i = 0; i < R; ++i)
      for (int r = 0; r < M; ++r) dot[i][r] = zero;
    for (int64_t h = 0; h < len; h += 64) {
      const __mmask64 keep = len - h >= 64 ? ~0ULL : (1ULL << (len - h)) - 1;
      __m512i q[M];
      for (int r = 0; r < M; ++r) q[r] = _mm512_loadu_si512(a.q.data() + r * a.stride + b * QBLOCK + h);
      for (int i = 0; i < R; ++i) {
        const int8_t* c = rows[i] + b * QBLOCK + h;
        _mm_prefetch(reinterpret_cast<const char*>(c + HEAD_PREFETCH), _MM_HINT_T1);
        const __m512i w = _mm512_maskz_loadu_epi8(keep, c);
        const __mmask64 neg = _mm512_movepi8_mask(w);
        const __m512i aw = _mm512_abs_epi8(w);
        for (int r = 0; r < M; ++r) dot[i][r] = _mm512_dpbusd_epi32(dot[i][r], aw, _mm512_mask_sub_epi8(q[r], neg, zero, q[r]));
      }
    }
    for (int r = 0; r < M; ++r) {
      const __m512 s = _mm512_set1_ps(a.s[r * a.nblk + b]);
      for (int i = 0; i < R; ++i) acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][r]), s, acc[i][r]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) p.y[r * p.n_total + n + i] = p.scale[n + i] * _mm512_reduce_add_ps(acc[i][r]);
}

template <int M>
void int8_avx512(const Int8Args& p, int64_t n0, int64_t n1) {
  constexpr int R = head_tile_rows<M>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) int8_tile_avx512<M, R>(p, n);
  for (; n < n1; ++n) int8_tile_avx512<M, 1>(p, n);
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.device().is_cpu(),
              "int8 kernel: weight must be a contiguous int8 [N, K] CPU tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == weight.size(0) && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous(), "int8 kernel: scale must be a contiguous float32 [N] tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor x32 = check_input(x, k);
  const int64_t path = checked_isa(isa) == AVX512_VNNI ? AVX512_VNNI : SCALAR;
  const QAct a = quantize(x32, path == AVX512_VNNI);
  at::Tensor y = at::empty({a.m, n}, x32.options());
  const Int8Args args{weight.data_ptr<int8_t>(), k, scale.data_ptr<float>(), &a, y.data_ptr<float>(), n};
  if (path == AVX512_VNNI) {
    CHATGLM_BY_ROWS(a.m, int8_avx512)
  } else {
    CHATGLM_BY_ROWS(a.m, int8_scalar)
  }
  return y.to(x.scalar_type());
}

// 16 values as float32 (exactly: every bfloat16 and float16 is a float32): bfloat16 by a 16-bit
// shift, float16 by the F16C conversion.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const at::BFloat16* p, __mmask16 keep) {
  const __m256i bits = _mm256_maskz_loadu_epi16(keep, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const at::Half* p, __mmask16 keep) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, p));
}

// One bfloat16 or float16 row quantized on AVX512, 16 values per step, with the scalar path's
// arithmetic (float32 |max|, one multiply, clamp, nearest-even): the same codes and scale.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) float quantize_row_avx512(const T* src, int64_t k, int8_t* dst) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 keep = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    m = _mm512_max_ps(m, _mm512_abs_ps(load16(src + i, keep)));
  }
  const float amax = _mm512_reduce_max_ps(m);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512 lim = _mm512_set1_ps(127.f);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 keep = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    const __m512 v = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(load16(src + i, keep), inv), lim), _mm512_sub_ps(_mm512_setzero_ps(), lim));
    _mm_mask_storeu_epi8(dst + i, keep, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  return amax;
}

template <typename T>
float quantize_row_scalar(const T* src, int64_t k, int8_t* dst) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(static_cast<float>(src[i])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t i = 0; i < k; ++i)
    dst[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, round_even(static_cast<float>(src[i]) * inv))));
  return amax;
}

// Per-row symmetric int8 quantization of a float weight [N, K] (the output layer): scale =
// absmax / 127, codes in -127..127 (the int8 kernel moves signs onto the activations, so -128 is
// never used). Returns (codes, float32 scale). The weight must be finite.
std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_floating_point() && weight.device().is_cpu(),
              "quantize_rows_int8: weight must be a floating-point [N, K] CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor codes = at::empty({n, k}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({n}, w.options().dtype(at::kFloat));
  const bool avx512 = isa_supported(AVX512_VNNI);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "quantize_rows_int8", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    int8_t* dst = codes.data_ptr<int8_t>();
    float* sc = scale.data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float amax;
        if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
          amax = avx512 ? quantize_row_avx512(src + r * k, k, dst + r * k) : quantize_row_scalar(src + r * k, k, dst + r * k);
        } else {
          amax = quantize_row_scalar(src + r * k, k, dst + r * k);
        }
        sc[r] = amax / 127.f;
      }
    });
  });
  return {codes, scale};
}

}  // namespace
}  // namespace chatglm_kernels

TORCH_LIBRARY_IMPL(chatglm, CPU, m) {
  m.impl("int8_gemv", chatglm_kernels::int8_gemv);
  m.impl("quantize_rows_int8", chatglm_kernels::quantize_rows_int8);
}
