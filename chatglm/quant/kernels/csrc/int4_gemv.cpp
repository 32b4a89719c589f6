// Int4 GEMV/GEMM for M = 1..8 activation rows, straight from the official ChatGLM int4 layout:
// weight int8 [N, K/2], byte j of a row holding the signed code of column 2j in its high nibble and
// of column 2j+1 in its low nibble; one fp16 scale per row. The weights are read once for all rows.
//
// Each activation row is split into two int8 terms, x ~= s * (a + b / 254) with one scale s per row
// (about 16 bits relative to the row's largest value, finer than bfloat16), stored per block of 128
// columns de-interleaved (the 64 even columns, then the 64 odd ones) so that the high and low nibbles
// of one 64-byte weight chunk meet their activations without shuffles. A nibble n is read as
// u = n ^ 8 = code + 8 (unsigned, for u8 x s8 dot products); the 8 is taken off once per row with
// the sums of a and b. Products accumulate exactly in int32 over the whole row.
//
// One build runs everywhere: each ISA path has its own target attribute and is chosen at run time
// (`best_isa`), or forced by the caller (tests force every path the CPU can run).
#include "common.h"

namespace chatglm_kernels {
namespace {

constexpr float SPLIT = 254.f;        // b is the remainder of a in units of 1 / SPLIT
constexpr int64_t MAX_K = 1 << 20;    // keeps |sum u * a| < 2^31
constexpr int64_t SLAB_BYTES = 16384;  // activation bytes (M rows, two terms) per column slab: half of L1

struct RowSplit {
  int64_t m = 0, kpad = 0, stride = 0;  // kpad: K rounded up to whole blocks; stride: padded_row_stride
  std::vector<int8_t> q;             // [m][2][stride]: term a, then term b, per block even then odd columns
  std::vector<float> s;              // [m]
  std::vector<int32_t> sum_a, sum_b; // [m]
};

void split_block_scalar(const float* x, int64_t len, float inv, int8_t* qa, int8_t* qb, int32_t& sa, int32_t& sb) {
  for (int64_t i = 0; i < len; ++i) {
    const float u = x[i] * inv, a = round_even(u);
    const float b = std::max(-127.f, std::min(127.f, round_even((u - a) * SPLIT)));
    const int64_t pos = (i & 1) * CHUNK + (i >> 1);
    qa[pos] = static_cast<int8_t>(a);
    qb[pos] = static_cast<int8_t>(b);
    sa += qa[pos];
    sb += qb[pos];
  }
}

// A whole block on AVX512: even and odd columns separated by two permutes per 32 values, rounded by
// the conversions (nearest-even), narrowed with saturation.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void split_block_avx512(const float* x, float inv, int8_t* qa,
                                                                             int8_t* qb, int32_t& sa, int32_t& sb) {
  const __m512 vinv = _mm512_set1_ps(inv), split = _mm512_set1_ps(SPLIT);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512i suma = _mm512_setzero_si512(), sumb = _mm512_setzero_si512();
  for (int64_t j = 0; j < QBLOCK / 32; ++j) {
    const __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(x + 32 * j), vinv);
    const __m512 v1 = _mm512_mul_ps(_mm512_loadu_ps(x + 32 * j + 16), vinv);
    const __m512 parts[2] = {_mm512_permutex2var_ps(v0, even, v1), _mm512_permutex2var_ps(v0, odd, v1)};
    for (int h = 0; h < 2; ++h) {
      const __m512i a = _mm512_cvtps_epi32(parts[h]);
      const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(parts[h], _mm512_cvtepi32_ps(a)), split));
      suma = _mm512_add_epi32(suma, a);
      sumb = _mm512_add_epi32(sumb, b);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qa + h * CHUNK + 16 * j), _mm512_cvtsepi32_epi8(a));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + h * CHUNK + 16 * j), _mm512_cvtsepi32_epi8(b));
    }
  }
  sa += _mm512_reduce_add_epi32(suma);
  sb += _mm512_reduce_add_epi32(sumb);
}

RowSplit split_rows(const at::Tensor& x32, bool avx512) {
  RowSplit a;
  a.m = x32.size(0);
  const int64_t k = x32.size(1);
  a.kpad = (k + QBLOCK - 1) / QBLOCK * QBLOCK;
  a.stride = padded_row_stride(a.kpad);
  a.q.assign(a.m * 2 * a.stride, 0);
  a.s.assign(a.m, 0.f);
  a.sum_a.assign(a.m, 0);
  a.sum_b.assign(a.m, 0);
  const float* x = x32.data_ptr<float>();
  for (int64_t r = 0; r < a.m; ++r) {
    const float* xr = x + r * k;
    const float amax = avx512 ? block_amax_avx512(xr, k) : amax_scalar(xr, k);
    // An all-zero row gets scale 0; one holding inf or NaN scale NaN, so that its outputs are NaN
    // as with any float matmul (never silently finite).
    a.s[r] = amax / 127.f;
    const float inv = amax > 0.f && std::isfinite(amax) ? 127.f / amax : 0.f;
    int8_t* qa = a.q.data() + 2 * r * a.stride;
    int8_t* qb = qa + a.stride;
    for (int64_t b = 0; b < k; b += QBLOCK) {
      const int64_t len = std::min(QBLOCK, k - b);
      if (avx512 && len == QBLOCK) split_block_avx512(xr + b, inv, qa + b, qb + b, a.sum_a[r], a.sum_b[r]);
      else split_block_scalar(xr + b, len, inv, qa + b, qb + b, a.sum_a[r], a.sum_b[r]);
    }
  }
  return a;
}

struct Int4Args {
  const uint8_t* w; int64_t row_bytes; const at::Half* scale; const RowSplit* a; float* y; int64_t n_total;
};

// Always inlined, so that it is compiled with each kernel's own target: called out of line from the
// 2- and 3-row AVX512 kernels, as GCC chose to, it ran as SSE code between AVX512 code, and those
// kernels took 2-3x the 4-row one's time on the AMX Xeon (68 against 40 ms for M = 2 on the 6B
// shapes; inlined: 35 ms). The AMD EPYC showed no such cost.
__attribute__((always_inline)) inline float finish(const Int4Args& p, int64_t n, int r, int64_t dot_a, int64_t dot_b) {
  const RowSplit& a = *p.a;
  const float ta = static_cast<float>(dot_a - 8 * static_cast<int64_t>(a.sum_a[r]));
  const float tb = static_cast<float>(dot_b - 8 * static_cast<int64_t>(a.sum_b[r]));
  return static_cast<float>(p.scale[n]) * a.s[r] * (ta + tb / SPLIT);
}

// A row's last, partial chunk is copied into a zeroed buffer (its padding meets zero activations).
__attribute__((always_inline)) inline const uint8_t* chunk_ptr(const uint8_t* row, int64_t b, int64_t row_bytes,
                                                              uint8_t* tail) {
  const int64_t off = b * CHUNK;
  if (off + CHUNK <= row_bytes) return row + off;
  std::memset(tail, 0, CHUNK);
  std::memcpy(tail, row + off, row_bytes - off);
  return tail;
}

template <int M>
void int4_scalar(const Int4Args& p, int64_t n0, int64_t n1) {
  const RowSplit& a = *p.a;
  const int64_t nblk = a.kpad / QBLOCK;
  uint8_t tail[CHUNK];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.w + n * p.row_bytes;
    int64_t dot[2][M] = {};
    for (int64_t b = 0; b < nblk; ++b) {
      const uint8_t* c = chunk_ptr(row, b, p.row_bytes, tail);
      for (int r = 0; r < M; ++r)
        for (int t = 0; t < 2; ++t) {
          const int8_t* q = a.q.data() + (2 * r + t) * a.stride + b * QBLOCK;
          int32_t d = 0;
          for (int64_t j = 0; j < CHUNK; ++j) d += ((c[j] ^ 0x88) >> 4) * q[j] + ((c[j] ^ 0x88) & 15) * q[CHUNK + j];
          dot[t][r] += d;
        }
    }
    for (int r = 0; r < M; ++r) p.y[r * p.n_total + n] = finish(p, n, r, dot[0][r], dot[1][r]);
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
    const uint8_t* c, const int8_t* q, int64_t stride, __m512i* acc_a, __m512i* acc_b) {
  const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(c), _mm512_set1_epi8(static_cast<char>(0x88)));
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(u, 4), m0f), lo = _mm512_and_si512(u, m0f);
  for (int r = 0; r < M; ++r) {
    const int8_t* qa = q + 2 * r * stride;
    const int8_t* qb = qa + stride;
    acc_a[r] = _mm512_dpbusd_epi32(acc_a[r], hi, _mm512_loadu_si512(qa));
    acc_b[r] = _mm512_dpbusd_epi32(acc_b[r], hi, _mm512_loadu_si512(qb));
    acc_a[r] = _mm512_dpbusd_epi32(acc_a[r], lo, _mm512_loadu_si512(qa + CHUNK));
    acc_b[r] = _mm512_dpbusd_epi32(acc_b[r], lo, _mm512_loadu_si512(qb + CHUNK));
  }
}

// One row at a time: the rows the slab kernel leaves (a range's last rows, rows that are not whole
// 64-byte chunks). U accumulator sets (for few rows) break the dependency chains of the dot products;
// the software prefetch runs ahead across the 4 KiB pages where the hardware prefetcher stops.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int4_avx512(const Int4Args& p, int64_t n0,
                                                                                 int64_t n1) {
  constexpr int U = M == 1 ? 4 : (M == 2 ? 2 : 1);
  constexpr bool to_l2 = M >= 2 && M <= 6;
  constexpr int64_t ahead = to_l2 ? 4 * PREFETCH : PREFETCH;
  const RowSplit& a = *p.a;
  const int64_t kpad = a.kpad, nblk = kpad / QBLOCK, full = p.row_bytes / CHUNK;
  const int8_t* q = a.q.data();
  alignas(64) uint8_t tail[CHUNK];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.w + n * p.row_bytes;
    __m512i acc_a[U][M], acc_b[U][M];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < M; ++r) acc_a[u][r] = acc_b[u][r] = _mm512_setzero_si512();
    int64_t b = 0;
    for (; b + U <= full; b += U)
      for (int u = 0; u < U; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(row + (b + u) * CHUNK + ahead), to_l2 ? _MM_HINT_T1 : _MM_HINT_T0);
        int4_chunk_avx512<M>(row + (b + u) * CHUNK, q + (b + u) * QBLOCK, a.stride, acc_a[u], acc_b[u]);
      }
    for (; b < nblk; ++b)
      int4_chunk_avx512<M>(chunk_ptr(row, b, p.row_bytes, tail), q + b * QBLOCK, a.stride, acc_a[0], acc_b[0]);
    for (int r = 0; r < M; ++r) {
      for (int u = 1; u < U; ++u) {
        acc_a[0][r] = _mm512_add_epi32(acc_a[0][r], acc_a[u][r]);
        acc_b[0][r] = _mm512_add_epi32(acc_b[0][r], acc_b[u][r]);
      }
      p.y[r * p.n_total + n] =
          finish(p, n, r, _mm512_reduce_add_epi32(acc_a[0][r]), _mm512_reduce_add_epi32(acc_b[0][r]));
    }
  }
}

// Lane j of the result: the sum of v[j]'s 16 lanes, by a transposed reduction tree (about 3
// instructions a vector, where reducing each one alone takes 9). Integer sums: the order is free.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512i sum16(const __m512i* v) {
  __m512i t[8], u[4];
  for (int j = 0; j < 8; ++j)
    t[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)
    u[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * j], t[2 * j + 1]), _mm512_unpackhi_epi64(t[2 * j], t[2 * j + 1]));
  const __m512i w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xdd));
  const __m512i w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0xdd));
}

// `finish` for G (16 or 8) consecutive output rows at once: lane by lane the same float operations in
// the same order, so the outputs are bit-equal to the other paths'. The int32 differences are exact:
// |sum of code * a| <= 8 * 127 * MAX_K < 2^31.
template <int M, int G>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void finish_group(
    const Int4Args& p, int64_t n, const __m512i (*part)[2][M]) {
  const RowSplit& a = *p.a;
  const __mmask16 keep = G == 16 ? 0xFFFF : static_cast<__mmask16>((1u << G) - 1);
  const __m512 scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, p.scale + n));
  const __m512 split = _mm512_set1_ps(SPLIT);
  for (int r = 0; r < M; ++r) {
    __m512i dots[2][16];
    for (int t = 0; t < 2; ++t)
      for (int i = 0; i < 16; ++i) dots[t][i] = i < G ? part[i][t][r] : _mm512_setzero_si512();
    const __m512 ta = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum16(dots[0]), _mm512_set1_epi32(8 * a.sum_a[r])));
    const __m512 tb = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum16(dots[1]), _mm512_set1_epi32(8 * a.sum_b[r])));
    const __m512 y = _mm512_mul_ps(_mm512_mul_ps(scale, _mm512_set1_ps(a.s[r])), _mm512_add_ps(ta, _mm512_div_ps(tb, split)));
    _mm512_mask_storeu_ps(p.y + r * p.n_total + n, keep, y);
  }
}

// The main AVX512 kernel. Output rows in groups of G, columns in slabs whose activations (M rows,
// both terms) stay in L1 beside the weight stream: each slab is swept over the group's rows in tiles
// of R rows, so that one activation load serves R rows and the tile gives 2RM independent chains; the
// partial sums wait in `part` between slabs and are reduced for the whole group at once at the end
// (`finish_group`). The weights are prefetched into L2, PF_ROWS rows ahead at the same offset.
// Measured on the 6B layers from DRAM, 2 threads, AMD EPYC, interleaved rounds against the
// row-at-a-time kernel: M = 2 / 4 / 8 take 97 / 192-204 / 565 ms against 133 / 275 / 602,
// and M = 1 the same 88 ms as tiles of 4 rows prefetched into L2 (with the earlier L1 prefetch 2 KiB
// ahead, 131 ms). Without the slabs, M = 4 on the 13696-column layer ran 1.4x slower per byte. The
// group-wide reduction in place of one reduction per row and slab: M = 2 / 4 / 8 in 62 / 130 / 420
// against 76 / 172 / 507 ms with the weights in L2, and M = 4 in 165-195 against 212-268 ms from DRAM.
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int4_slab_avx512(const Int4Args& p, int64_t n0,
                                                                                      int64_t n1) {
  constexpr int G = M > 4 ? 8 : 16;
  constexpr int64_t SLAB = std::max<int64_t>(1, SLAB_BYTES / (2 * M) / QBLOCK);  // blocks per slab
  constexpr int64_t PF_ROWS = 16;
  const RowSplit& a = *p.a;
  const int64_t stride = a.stride, nblk = a.kpad / QBLOCK, rb = p.row_bytes;
  const int8_t* q = a.q.data();
  const __m512i m0f = _mm512_set1_epi8(0x0f), x08 = _mm512_set1_epi8(0x08);
  alignas(64) __m512i part[G][2][M];
  int64_t n = n0;
  for (; n + G <= n1; n += G) {
    for (int64_t b0 = 0; b0 < nblk; b0 += SLAB) {
      const int64_t b1 = std::min(nblk, b0 + SLAB);
      for (int t = 0; t < G; t += R) {
        __m512i acc_a[R][M], acc_b[R][M];
        for (int i = 0; i < R; ++i)
          for (int r = 0; r < M; ++r) {
            acc_a[i][r] = _mm512_setzero_si512();
            acc_b[i][r] = _mm512_setzero_si512();
          }
        const uint8_t* tile = p.w + (n + t) * rb;
        for (int64_t b = b0; b < b1; ++b) {
          __m512i hi[R], lo[R];
          for (int i = 0; i < R; ++i) {
            const uint8_t* c = tile + i * rb + b * CHUNK;
            _mm_prefetch(reinterpret_cast<const char*>(c + PF_ROWS * rb), _MM_HINT_T1);
            const __m512i v = _mm512_loadu_si512(c);
            hi[i] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), m0f, x08, 0x6a);  // (A & B) ^ C: (n & 15) ^ 8
            lo[i] = _mm512_ternarylogic_epi32(v, m0f, x08, 0x6a);
          }
          for (int r = 0; r < M; ++r) {
            const int8_t* qa = q + 2 * r * stride + b * QBLOCK;
            __m512i ae = _mm512_loadu_si512(qa), ao = _mm512_loadu_si512(qa + CHUNK);
            __m512i be = _mm512_loadu_si512(qa + stride), bo = _mm512_loadu_si512(qa + stride + CHUNK);
            // In registers: GCC would otherwise fold each load into every dot product, R loads for one.
            if (R > 1) asm volatile("" : "+v"(ae), "+v"(ao), "+v"(be), "+v"(bo));
            for (int i = 0; i < R; ++i) {
              acc_a[i][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_a[i][r], hi[i], ae), lo[i], ao);
              acc_b[i][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_b[i][r], hi[i], be), lo[i], bo);
            }
          }
        }
        for (int i = 0; i < R; ++i)
          for (int r = 0; r < M; ++r) {
            part[t + i][0][r] = b0 == 0 ? acc_a[i][r] : _mm512_add_epi32(acc_a[i][r], part[t + i][0][r]);
            part[t + i][1][r] = b0 == 0 ? acc_b[i][r] : _mm512_add_epi32(acc_b[i][r], part[t + i][1][r]);
          }
      }
    }
    finish_group<M, G>(p, n, part);
  }
  if (n < n1) int4_avx512<M>(p, n, n1);
}

// R = 4 rows a tile up to M = 2, 2 up to M = 4, then 1 (the accumulators, nibbles and activations of
// a tile fit the 32 vector registers).
template <int M>
void int4_slabs(const Int4Args& p, int64_t n0, int64_t n1) {
  if (p.row_bytes % CHUNK != 0) return int4_avx512<M>(p, n0, n1);
  int4_slab_avx512<M, (M <= 2 ? 4 : (M <= 4 ? 2 : 1))>(p, n0, n1);
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.device().is_cpu(),
              "int4 kernel: weight must be a contiguous int8 [N, K/2] CPU tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == weight.size(0) && scale.scalar_type() == at::kHalf &&
                  scale.is_contiguous(), "int4 kernel: scale must be a contiguous fp16 [N] tensor");
  const int64_t n = weight.size(0), k = weight.size(1) * 2;
  TORCH_CHECK(k <= MAX_K, "int4 kernel: K must be at most ", MAX_K, ", got ", k);
  const at::Tensor x32 = check_input(x, k);
  const int64_t path = checked_isa(isa);
  const RowSplit a = split_rows(x32, path == AVX512_VNNI);
  at::Tensor y = at::empty({a.m, n}, x32.options());
  const Int4Args args{reinterpret_cast<const uint8_t*>(weight.data_ptr<int8_t>()), k / 2, scale.data_ptr<at::Half>(),
                      &a, y.data_ptr<float>(), n};
  if (path == AVX512_VNNI) {
    CHATGLM_BY_ROWS(a.m, int4_slabs)
  } else if (path == AVX_VNNI) {
    CHATGLM_BY_ROWS(a.m, int4_avxvnni)
  } else if (path == AVX2) {
    CHATGLM_BY_ROWS(a.m, int4_avx2)
  } else {
    CHATGLM_BY_ROWS(a.m, int4_scalar)
  }
  return y.to(x.scalar_type());
}

}  // namespace
}  // namespace chatglm_kernels

TORCH_LIBRARY(chatglm, m) {
  m.def("int4_gemv(Tensor x, Tensor weight, Tensor scale, int isa=-1) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor scale, int isa=-1) -> Tensor");
  m.def("quantize_rows_int8(Tensor weight) -> (Tensor, Tensor)");
  m.def("isa_supported(int isa) -> bool", &chatglm_kernels::isa_supported);
  m.def("best_isa() -> int", &chatglm_kernels::best_isa);
}

TORCH_LIBRARY_IMPL(chatglm, CPU, m) {
  m.impl("int4_gemv", chatglm_kernels::int4_gemv);
}
