// Fused bfloat16 row ops of the CPU decode step: RMSNorm and SwiGLU. Each row is computed alone (a batch
// gives the bits of each row by itself); the scalar and AVX512 paths do the same float operations in
// the same order (16 lanes, then lane 0..15), so they agree bit for bit.
#include "common.h"

namespace chatglm_kernels {
namespace {

constexpr int64_t LANES = 16;

inline uint16_t bf16_bits(float f) {  // nearest even, like at::BFloat16 (NaN stays a quiet NaN)
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

inline float bf16_float(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_bf16(const uint16_t* p, __mmask16 keep) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, p)), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store_bf16(uint16_t* p, __m512 f, __mmask16 keep) {
  const __m512i b = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, keep, _mm512_cvtepi32_epi16(r));
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= LANES ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
}

inline float rms_scale(const float* lanes, int64_t d, double eps) {
  float sum = 0.f;
  for (int64_t l = 0; l < LANES; ++l) sum += lanes[l];
  return 1.f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
}

inline float weight_at(const float* w, int64_t i) { return w[i]; }
inline float weight_at(const uint16_t* w, int64_t i) { return bf16_float(w[i]); }

template <typename W>
void rms_row_scalar(const uint16_t* x, const W* w, uint16_t* y, int64_t d, double eps) {
  float lanes[LANES] = {};
  for (int64_t i = 0; i < d; ++i) {
    const float v = bf16_float(x[i]);
    lanes[i % LANES] += v * v;
  }
  const float s = rms_scale(lanes, d, eps);
  for (int64_t i = 0; i < d; ++i) y[i] = bf16_bits(weight_at(w, i) * (bf16_float(x[i]) * s));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_weight(const float* w, __mmask16 keep) {
  return _mm512_maskz_loadu_ps(keep, w);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_weight(const uint16_t* w, __mmask16 keep) {
  return load_bf16(w, keep);
}

template <typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rms_row_avx512(const uint16_t* x, const W* w,
                                                                        uint16_t* y, int64_t d, double eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += LANES) {
    const __m512 v = load_bf16(x + i, tail_mask(d - i));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  float lanes[LANES];
  _mm512_storeu_ps(lanes, acc);
  const __m512 s = _mm512_set1_ps(rms_scale(lanes, d, eps));
  for (int64_t i = 0; i < d; i += LANES) {
    const __mmask16 keep = tail_mask(d - i);
    const __m512 v = _mm512_mul_ps(load_weight(w + i, keep), _mm512_mul_ps(load_bf16(x + i, keep), s));
    store_bf16(y + i, v, keep);
  }
}

// exp(v) for v <= 0 (silu needs exp(-|g|)): 2^n * p(r), r = v - n ln2 in [-ln2/2, ln2/2], degree-6
// Taylor in Horner form (relative error < 2e-7, below bfloat16's 4e-3). Underflows to 0 below -87.
constexpr float LOG2E = 1.44269504f, LN2_HI = 0.693145752f, LN2_LO = 1.42860677e-6f, EXP_MIN = -87.f;
constexpr float C[7] = {1.f, 1.f, 0.5f, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720};

inline float exp_neg(float v) {
  if (std::isnan(v)) return v;
  v = std::max(v, EXP_MIN);
  const float n = round_even(v * LOG2E);
  const float r = (v - n * LN2_HI) - n * LN2_LO;
  float p = C[6];
  for (int k = 5; k >= 0; --k) p = p * r + C[k];
  const uint32_t e = (static_cast<uint32_t>(static_cast<int32_t>(n)) + 127u) << 23;
  float two_n;
  std::memcpy(&two_n, &e, 4);
  return p * two_n;
}

// silu(g) = g * sigmoid(g), sigmoid by exp(-|g|) so nothing overflows; rounded to bfloat16 before the
// product like torch's silu-then-mul of bfloat16 tensors.
inline float silu(float g) {
  const float e = exp_neg(-std::fabs(g));
  const float sig = g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
  return g * sig;
}

constexpr int64_t SWIGLU_PIECE = 4096;  // values per parallel task (a multiple of 16)

void swiglu_scalar(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_bits(bf16_float(bf16_bits(silu(bf16_float(gate[i])))) * bf16_float(up[i]));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void swiglu_avx512(const uint16_t* gate, const uint16_t* up,
                                                                       uint16_t* y, int64_t f) {
  const __m512 one = _mm512_set1_ps(1.f), magic = _mm512_set1_ps(12582912.0f);
  for (int64_t i = 0; i < f; i += LANES) {
    const __mmask16 keep = tail_mask(f - i);
    const __m512 g = load_bf16(gate + i, keep), u = load_bf16(up + i, keep);
    // max_ps returns its second operand when one is NaN: a NaN gate stays NaN, as in the scalar path.
    const __m512 v = _mm512_max_ps(_mm512_set1_ps(EXP_MIN), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(LOG2E)), magic), magic);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(v, _mm512_mul_ps(n, _mm512_set1_ps(LN2_HI))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(LN2_LO)));
    __m512 p = _mm512_set1_ps(C[6]);
    for (int k = 5; k >= 0; --k) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(C[k]));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 ex = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    const __m512 den = _mm512_add_ps(one, ex);
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_div_ps(_mm512_mask_mov_ps(one, neg, ex), den);
    __m512 s = _mm512_mul_ps(g, sig);
    uint16_t tmp[LANES];
    store_bf16(tmp, s, 0xFFFF);
    s = load_bf16(tmp, 0xFFFF);
    store_bf16(y + i, _mm512_mul_ps(s, u), keep);
  }
}

bool use_avx512(int64_t isa) {
  const int64_t path = isa < 0 ? best_isa() : isa;
  TORCH_CHECK(isa_supported(path), "isa ", path, " is not supported on this CPU");
  return path == AVX512_VNNI;
}

void check_bf16(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16,
              name, " must be a CPU bfloat16 tensor, got ", x.scalar_type(), " on ", x.device());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t isa) {
  check_bf16(x, "rms_norm: x");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "rms_norm: weight must be [", d, "], got ", weight.sizes());
  // A bfloat16 weight (the model's) is read as it is; any other dtype once converted to float32.
  const bool w16 = weight.scalar_type() == at::kBFloat16;
  const at::Tensor xc = x.contiguous(), w = (w16 ? weight : weight.to(at::kFloat)).contiguous();
  at::Tensor y = at::empty_like(xc);
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const bool avx512 = use_avx512(isa);
  auto rows_with = [&](const auto* wp) {
    for (int64_t r = 0, rows = d ? xc.numel() / d : 0; r < rows; ++r) {
      if (avx512) rms_row_avx512(xp + r * d, wp, yp + r * d, d, eps);
      else rms_row_scalar(xp + r * d, wp, yp + r * d, d, eps);
    }
  };
  if (w16) rows_with(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  else rows_with(w.data_ptr<float>());
  return y;
}

at::Tensor swiglu(const at::Tensor& x, int64_t isa) {
  check_bf16(x, "swiglu: x");
  const int64_t two_f = x.size(-1), f = two_f / 2;
  TORCH_CHECK(two_f % 2 == 0, "swiglu: the last dimension must be even (gate, up halves), got ", two_f);
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(xc.sizes().begin(), xc.sizes().end());
  shape.back() = f;
  at::Tensor y = at::empty(shape, xc.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const bool avx512 = use_avx512(isa);
  // Elementwise, so the work splits into pieces of a row (one decode row is 13696 values) without
  // changing any bit; pieces are whole 16-lane vectors except each row's last.
  const int64_t rows = f ? xc.numel() / two_f : 0, pieces = (f + SWIGLU_PIECE - 1) / SWIGLU_PIECE;
  at::parallel_for(0, rows * pieces, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / pieces, c0 = (t % pieces) * SWIGLU_PIECE, len = std::min(SWIGLU_PIECE, f - c0);
      const uint16_t* g = xp + r * two_f + c0;
      if (avx512) swiglu_avx512(g, g + f, yp + r * f + c0, len);
      else swiglu_scalar(g, g + f, yp + r * f + c0, len);
    }
  });
  return y;
}

}  // namespace
}  // namespace chatglm_kernels

TORCH_LIBRARY_FRAGMENT(chatglm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, int isa=-1) -> Tensor");
  m.def("swiglu(Tensor x, int isa=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatglm, CPU, m) {
  m.impl("rms_norm", chatglm_kernels::rms_norm);
  m.impl("swiglu", chatglm_kernels::swiglu);
}
