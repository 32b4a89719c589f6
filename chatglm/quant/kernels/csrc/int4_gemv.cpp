// Int4 (and int8) GEMV/GEMM for M = 1..8 activation rows, straight from the official ChatGLM int4
// layout: weight int8 [N, K/2], byte j of a row holding the signed code of column 2j in its high
// nibble and of column 2j+1 in its low nibble; one fp16 scale per row.
//
// Activations are quantized to int8 per block of QBLOCK columns (one float scale per block), stored
// de-interleaved (per block: the 64 even columns, then the 64 odd ones) so that the high and low
// nibbles of one 64-byte weight chunk meet their activations without shuffles. A nibble n is read as
// u = n ^ 8 = code + 8 (unsigned, for the u8 x s8 dot products); the "+8" is removed once per
// activation row through `corr` = 8 * sum_b s_b * sum(q_b). The weights are read once for all M rows.
//
// One build runs everywhere: each ISA path is compiled with its own target attribute and chosen at
// run time (`best_isa`), or forced by the caller (tests force every path this CPU can run).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QBLOCK = 128;      // activation columns per scale: one 64-byte int4 weight chunk
constexpr int64_t CHUNK = QBLOCK / 2;  // weight bytes per block
constexpr int64_t MAX_ROWS = 8;
constexpr int64_t GRAIN_ROWS = 16;   // output rows per parallel task at least
constexpr int64_t PREFETCH = 2048;   // bytes ahead of the int4 read (measured: 2-4 KiB best, +25 % over none)

enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX_VNNI = 2, AVX512_VNNI = 3 };

bool isa_supported(int64_t isa) {
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

int64_t best_isa() {
  for (int64_t isa : {AVX512_VNNI, AVX_VNNI, AVX2})
    if (isa_supported(isa)) return isa;
  return SCALAR;
}

// Activations of M rows quantized per block; `interleaved` orders each block as the int4 nibbles
// (even columns, then odd), otherwise columns keep their order (int8 weights).
struct QAct {
  int64_t m = 0, nblk = 0;
  std::vector<int8_t> q;     // [m][nblk][QBLOCK], zero-padded past K
  std::vector<float> s;      // [m][nblk]
  std::vector<float> corr;   // [m]: 8 * sum_b s_b * sum(q_b) (int4 path)
};

inline float round_even(float v) {  // nearest, ties to even (default rounding), for |v| < 2^22
  constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23
  return (v + MAGIC) - MAGIC;
}

// Portable quantization of one block of `len` values into `qb` (zeroed) and its sum of codes.
int32_t quantize_block_scalar(const float* xb, int64_t len, float inv, bool interleaved, int8_t* qb) {
  int32_t sum = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float v = std::max(-127.f, std::min(127.f, round_even(xb[i] * inv)));
    const int64_t pos = interleaved ? (i & 1) * CHUNK + (i >> 1) : i;
    qb[pos] = static_cast<int8_t>(v);
    sum += qb[pos];
  }
  return sum;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) float block_amax_avx512(const float* xb, int64_t len) {
  __m512 m = _mm512_setzero_ps(), bad = _mm512_setzero_ps();  // bad: x - x, NaN where x is inf or NaN
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 keep = len - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(keep, xb + i);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
    bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));
  }
  return _mm512_reduce_add_ps(bad) == 0.f ? _mm512_reduce_max_ps(m) : NAN;
}

// A whole block (QBLOCK values) on AVX512: even and odd columns separated by two permutes per
// 32 values, rounded by the conversion (nearest-even) and narrowed with saturation.
__attribute__((target("avx512f,avx512bw,avx512vl"))) int32_t quantize_block_avx512(const float* xb, float inv,
                                                                                   bool interleaved, int8_t* qb) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512i sum = _mm512_setzero_si512();
  for (int64_t j = 0; j < QBLOCK / 32; ++j) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(xb + 32 * j), vinv);
    __m512 b = _mm512_mul_ps(_mm512_loadu_ps(xb + 32 * j + 16), vinv);
    if (interleaved) {
      const __m512 e = _mm512_permutex2var_ps(a, even, b), o = _mm512_permutex2var_ps(a, odd, b);
      a = e;
      b = o;
    }
    const __m512i qa = _mm512_cvtps_epi32(a), qb2 = _mm512_cvtps_epi32(b);
    sum = _mm512_add_epi32(sum, _mm512_add_epi32(qa, qb2));
    int8_t* da = interleaved ? qb + 16 * j : qb + 32 * j;
    int8_t* db = interleaved ? qb + CHUNK + 16 * j : qb + 32 * j + 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(da), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(db), _mm512_cvtsepi32_epi8(qb2));
  }
  return _mm512_reduce_add_epi32(sum);
}

QAct quantize(const at::Tensor& x32, bool interleaved, bool avx512) {
  QAct a;
  a.m = x32.size(0);
  const int64_t k = x32.size(1);
  a.nblk = (k + QBLOCK - 1) / QBLOCK;
  a.q.assign(a.m * a.nblk * QBLOCK, 0);
  a.s.assign(a.m * a.nblk, 0.f);
  a.corr.assign(a.m, 0.f);
  const float* x = x32.data_ptr<float>();
  for (int64_t r = 0; r < a.m; ++r) {
    double corr = 0;
    for (int64_t b = 0; b < a.nblk; ++b) {
      const float* xb = x + r * k + b * QBLOCK;
      const int64_t len = std::min(QBLOCK, k - b * QBLOCK);
      float amax = 0.f;
      if (avx512) {
        amax = block_amax_avx512(xb, len);
      } else {
        for (int64_t i = 0; i < len; ++i) amax = std::isfinite(xb[i]) ? std::max(amax, std::fabs(xb[i])) : NAN;
      }
      // An all-zero block gets scale 0; one holding inf or NaN gets scale NaN, so that the outputs
      // are NaN as with any float matmul (never silently finite).
      const float s = amax / 127.f, inv = amax > 0.f && std::isfinite(amax) ? 127.f / amax : 0.f;
      int8_t* qb = a.q.data() + (r * a.nblk + b) * QBLOCK;
      const int32_t sum = avx512 && len == QBLOCK ? quantize_block_avx512(xb, inv, interleaved, qb)
                                                  : quantize_block_scalar(xb, len, inv, interleaved, qb);
      a.s[r * a.nblk + b] = s;
      corr += 8.0 * s * sum;
    }
    a.corr[r] = static_cast<float>(corr);
  }
  return a;
}

// ---- int4 rows: y[r][n] = scale[n] * (sum_b s_b * dot(u_b, q_b) - corr[r]) ----

struct Int4Args {
  const uint8_t* w; int64_t row_bytes; const at::Half* scale; const QAct* a; float* y; int64_t n_total;
};

// A row's last, partial chunk is copied into a zeroed buffer (its padding meets zero activations).
inline const uint8_t* chunk_ptr(const uint8_t* row, int64_t b, int64_t row_bytes, uint8_t* tail) {
  const int64_t off = b * CHUNK;
  if (off + CHUNK <= row_bytes) return row + off;
  std::memset(tail, 0, CHUNK);
  std::memcpy(tail, row + off, row_bytes - off);
  return tail;
}

template <int M>
void int4_scalar(const Int4Args& p, int64_t n0, int64_t n1) {
  const QAct& a = *p.a;
  uint8_t tail[CHUNK];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.w + n * p.row_bytes;
    float acc[M] = {};
    for (int64_t b = 0; b < a.nblk; ++b) {
      const uint8_t* c = chunk_ptr(row, b, p.row_bytes, tail);
      for (int r = 0; r < M; ++r) {
        const int8_t* q = a.q.data() + (r * a.nblk + b) * QBLOCK;
        int32_t dot = 0;
        for (int64_t j = 0; j < CHUNK; ++j) {
          const int u = c[j] ^ 0x88;
          dot += (u >> 4) * q[j] + (u & 15) * q[CHUNK + j];
        }
        acc[r] += a.s[r * a.nblk + b] * static_cast<float>(dot);
      }
    }
    const float sc = static_cast<float>(p.scale[n]);
    for (int r = 0; r < M; ++r) p.y[r * p.n_total + n] = sc * (acc[r] - a.corr[r]);
  }
}

// The AVX2 body twice: with maddubs (AVX2 + FMA) and with AVX-VNNI dot products. Separate
// functions, so the compiler never places VNNI instructions in the plain AVX2 path.
#define CHATGLM_AVX2_NAME int4_avx2
#define CHATGLM_AVX2_TARGET "avx2,fma"
#define CHATGLM_AVX2_VNNI 0
#include "int4_avx2.inc"
#define CHATGLM_AVX2_NAME int4_avxvnni
#define CHATGLM_AVX2_TARGET "avx2,fma,avxvnni"
#define CHATGLM_AVX2_VNNI 1
#include "int4_avx2.inc"

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline void int4_chunk_avx512(
    const uint8_t* c, const int8_t* q, const float* s, int64_t nblk, __m512* acc) {
  const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(c), _mm512_set1_epi8(static_cast<char>(0x88)));
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(u, 4), m0f), lo = _mm512_and_si512(u, m0f);
  for (int r = 0; r < M; ++r) {
    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(q + r * nblk * QBLOCK));
    dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(q + r * nblk * QBLOCK + CHUNK));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s[r * nblk]), acc[r]);
  }
}

// Two accumulator sets (even and odd blocks) halve the dependency chain of the float sums; the
// software prefetch runs PREFETCH bytes ahead, across 4 KiB pages where the hardware stops.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int4_avx512(const Int4Args& p, int64_t n0,
                                                                                 int64_t n1) {
  const QAct& a = *p.a;
  const int64_t nblk = a.nblk, full = p.row_bytes / CHUNK;
  const int8_t* q = a.q.data();
  const float* s = a.s.data();
  alignas(64) uint8_t tail[CHUNK];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.w + n * p.row_bytes;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < full; b += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * CHUNK + PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + b * CHUNK + PREFETCH + CHUNK), _MM_HINT_T0);
      int4_chunk_avx512<M>(row + b * CHUNK, q + b * QBLOCK, s + b, nblk, acc0);
      int4_chunk_avx512<M>(row + (b + 1) * CHUNK, q + (b + 1) * QBLOCK, s + b + 1, nblk, acc1);
    }
    for (; b < nblk; ++b)
      int4_chunk_avx512<M>(chunk_ptr(row, b, p.row_bytes, tail), q + b * QBLOCK, s + b, nblk, acc0);
    const float sc = static_cast<float>(p.scale[n]);
    for (int r = 0; r < M; ++r)
      p.y[r * p.n_total + n] = sc * (_mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) - a.corr[r]);
  }
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
        const int8_t* q = a.q.data() + (r * a.nblk + b) * QBLOCK;
        int32_t dot = 0;
        for (int64_t j = 0; j < len; ++j) dot += row[b * QBLOCK + j] * q[j];
        acc[r] += a.s[r * a.nblk + b] * static_cast<float>(dot);
      }
    }
    for (int r = 0; r < M; ++r) p.y[r * p.n_total + n] = p.scale[n] * acc[r];
  }
}

// w * q as u8 x s8: |w| times q with w's sign moved onto q (weights are clamped to -127..127).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int8_avx512(const Int8Args& p, int64_t n0,
                                                                                 int64_t n1) {
  const QAct& a = *p.a;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = p.w + n * p.k;
    __m512 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a.nblk; ++b) {
      const int64_t len = std::min(QBLOCK, p.k - b * QBLOCK);
      __m512i dot[M];
      for (int r = 0; r < M; ++r) dot[r] = zero;
      for (int64_t h = 0; h < len; h += 64) {
        const __mmask64 keep = len - h >= 64 ? ~0ULL : (1ULL << (len - h)) - 1;
        const __m512i w = _mm512_maskz_loadu_epi8(keep, row + b * QBLOCK + h);
        const __mmask64 neg = _mm512_movepi8_mask(w);
        const __m512i aw = _mm512_abs_epi8(w);
        for (int r = 0; r < M; ++r) {
          const __m512i q = _mm512_loadu_si512(a.q.data() + (r * a.nblk + b) * QBLOCK + h);
          dot[r] = _mm512_dpbusd_epi32(dot[r], aw, _mm512_mask_sub_epi8(q, neg, zero, q));
        }
      }
      for (int r = 0; r < M; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(a.s[r * a.nblk + b]), acc[r]);
    }
    for (int r = 0; r < M; ++r) p.y[r * p.n_total + n] = p.scale[n] * _mm512_reduce_add_ps(acc[r]);
  }
}

template <typename Args, typename Fn>
void run_rows(const Args& args, int64_t n, Fn fn) {
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

int64_t checked_isa(int64_t isa) {
  const int64_t chosen = isa < 0 ? best_isa() : isa;
  TORCH_CHECK(isa_supported(chosen), "int4 kernel: ISA path ", chosen, " is not supported by this CPU");
  return chosen;
}

at::Tensor check_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "int4 kernel: x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= MAX_ROWS, "int4 kernel: M must be 1..", MAX_ROWS, ", got ", x.size(0));
  TORCH_CHECK(x.is_floating_point() && x.device().is_cpu(), "int4 kernel: x must be a floating-point CPU tensor");
  return x.to(at::kFloat).contiguous();
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.device().is_cpu(),
              "int4 kernel: weight must be a contiguous int8 [N, K/2] CPU tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == weight.size(0) && scale.scalar_type() == at::kHalf &&
                  scale.is_contiguous(), "int4 kernel: scale must be a contiguous fp16 [N] tensor");
  const int64_t n = weight.size(0), k = weight.size(1) * 2;
  const at::Tensor x32 = check_input(x, k);
  const int64_t path = checked_isa(isa);
  const QAct a = quantize(x32, true, path == AVX512_VNNI);
  at::Tensor y = at::empty({a.m, n}, x32.options());
  const Int4Args args{reinterpret_cast<const uint8_t*>(weight.data_ptr<int8_t>()), k / 2, scale.data_ptr<at::Half>(),
                      &a, y.data_ptr<float>(), n};
  if (path == AVX512_VNNI) {
    CHATGLM_BY_ROWS(a.m, int4_avx512)
  } else if (path == AVX_VNNI) {
    CHATGLM_BY_ROWS(a.m, int4_avxvnni)
  } else if (path == AVX2) {
    CHATGLM_BY_ROWS(a.m, int4_avx2)
  } else {
    CHATGLM_BY_ROWS(a.m, int4_scalar)
  }
  return y.to(x.scalar_type());
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.device().is_cpu(),
              "int8 kernel: weight must be a contiguous int8 [N, K] CPU tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == weight.size(0) && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous(), "int8 kernel: scale must be a contiguous float32 [N] tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor x32 = check_input(x, k);
  const int64_t path = checked_isa(isa) == AVX512_VNNI ? AVX512_VNNI : SCALAR;
  const QAct a = quantize(x32, false, path == AVX512_VNNI);
  at::Tensor y = at::empty({a.m, n}, x32.options());
  const Int8Args args{weight.data_ptr<int8_t>(), k, scale.data_ptr<float>(), &a, y.data_ptr<float>(), n};
  if (path == AVX512_VNNI) {
    CHATGLM_BY_ROWS(a.m, int8_avx512)
  } else {
    CHATGLM_BY_ROWS(a.m, int8_scalar)
  }
  return y.to(x.scalar_type());
}

// Rows [r0, r1) of the official weight as int8 codes, or dequantized (code * scale) in `dtype`.
at::Tensor int4_unpack(const at::Tensor& weight, const at::Tensor& scale, int64_t r0, int64_t r1,
                       at::ScalarType dtype) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "int4_unpack: weight must be a contiguous int8 [N, K/2] tensor");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= weight.size(0), "int4_unpack: bad row range");
  TORCH_CHECK(dtype == at::kChar || dtype == at::kBFloat16 || dtype == at::kFloat, "int4_unpack: dtype must be int8, bfloat16 or float32");
  const int64_t half = weight.size(1);
  at::Tensor out = at::empty({r1 - r0, 2 * half}, weight.options().dtype(dtype));
  const int8_t* w = weight.data_ptr<int8_t>();
  const at::Half* sc = scale.data_ptr<at::Half>();
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
        if (dtype == at::kBFloat16) fill(out.data_ptr<at::BFloat16>() + (r - r0) * 2 * half);
        else fill(out.data_ptr<float>() + (r - r0) * 2 * half);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(chatglm, m) {
  m.def("int4_gemv(Tensor x, Tensor weight, Tensor scale, int isa=-1) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor scale, int isa=-1) -> Tensor");
  m.def("int4_unpack(Tensor weight, Tensor scale, int r0, int r1, ScalarType dtype) -> Tensor");
  m.def("isa_supported(int isa) -> bool", &isa_supported);
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(chatglm, CPU, m) {
  m.impl("int4_gemv", int4_gemv);
  m.impl("int8_gemv", int8_gemv);
  m.impl("int4_unpack", int4_unpack);
}

