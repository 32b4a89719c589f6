// A memory-bandwidth probe for the benchmark: every byte of a large buffer read once with the widest
// loads this CPU has (the loads the int4 kernels use), split over the threads as the kernels split
// their rows, so that its rate is what these kernels could at best stream here.
#include "common.h"

namespace chatglm_kernels {
namespace {

constexpr int64_t LINE = 64;
constexpr int64_t GRAIN_LINES = 1 << 14;  // 1 MiB per parallel task at least

// XOR of 64-byte lines [l0, l1), four independent chains; `prefetch` bytes ahead when > 0.
__attribute__((target("avx512f"))) uint64_t xor_lines_avx512(const uint8_t* p, int64_t l0, int64_t l1,
                                                             int64_t prefetch) {
  __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  int64_t l = l0;
  for (; l + 4 <= l1; l += 4)
    for (int u = 0; u < 4; ++u) {
      const uint8_t* line = p + (l + u) * LINE;
      if (prefetch > 0) _mm_prefetch(reinterpret_cast<const char*>(line + prefetch), _MM_HINT_T0);
      acc[u] = _mm512_xor_si512(acc[u], _mm512_load_si512(line));
    }
  for (; l < l1; ++l) acc[0] = _mm512_xor_si512(acc[0], _mm512_load_si512(p + l * LINE));
  const __m512i x = _mm512_xor_si512(_mm512_xor_si512(acc[0], acc[1]), _mm512_xor_si512(acc[2], acc[3]));
  alignas(64) uint64_t w[8];
  _mm512_store_si512(w, x);
  return w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4] ^ w[5] ^ w[6] ^ w[7];
}

__attribute__((target("avx2"))) uint64_t xor_lines_avx2(const uint8_t* p, int64_t l0, int64_t l1, int64_t prefetch) {
  __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
  for (int64_t l = l0; l < l1; ++l) {
    const uint8_t* line = p + l * LINE;
    if (prefetch > 0) _mm_prefetch(reinterpret_cast<const char*>(line + prefetch), _MM_HINT_T0);
    a = _mm256_xor_si256(a, _mm256_load_si256(reinterpret_cast<const __m256i*>(line)));
    b = _mm256_xor_si256(b, _mm256_load_si256(reinterpret_cast<const __m256i*>(line + 32)));
  }
  alignas(32) uint64_t w[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_xor_si256(a, b));
  return w[0] ^ w[1] ^ w[2] ^ w[3];
}

uint64_t xor_lines_scalar(const uint8_t* p, int64_t l0, int64_t l1) {
  uint64_t acc = 0;
  for (int64_t l = l0; l < l1; ++l)
    for (int64_t j = 0; j < LINE; j += 8) {
      uint64_t v;
      std::memcpy(&v, p + l * LINE + j, 8);
      acc ^= v;
    }
  return acc;
}

// The XOR of all 64-bit words of `buf` (a whole number of 64-byte lines, 64-byte aligned), so
// that no load can be dropped; each thread XORs a contiguous range of lines.
int64_t stream_read(const at::Tensor& buf, int64_t prefetch) {
  TORCH_CHECK(buf.is_contiguous() && buf.device().is_cpu(), "stream_read: buf must be a contiguous CPU tensor");
  const int64_t nbytes = buf.numel() * buf.element_size();
  const auto* p = static_cast<const uint8_t*>(buf.data_ptr());
  TORCH_CHECK(nbytes % LINE == 0 && reinterpret_cast<uintptr_t>(p) % LINE == 0,
              "stream_read: buf must be 64-byte aligned and a whole number of 64-byte lines, got ", nbytes, " bytes");
  TORCH_CHECK(prefetch >= 0, "stream_read: prefetch must be >= 0 bytes, got ", prefetch);
  const int64_t isa = best_isa();
  const int64_t lines = nbytes / LINE;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), lines / GRAIN_LINES));
  std::vector<uint64_t> part(tasks, 0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t l0 = lines * t / tasks, l1 = lines * (t + 1) / tasks;
      part[t] = isa == AVX512_VNNI ? xor_lines_avx512(p, l0, l1, prefetch)
                : isa == SCALAR   ? xor_lines_scalar(p, l0, l1)
                                  : xor_lines_avx2(p, l0, l1, prefetch);
    }
  });
  uint64_t acc = 0;
  for (uint64_t v : part) acc ^= v;
  return static_cast<int64_t>(acc);
}

}  // namespace
}  // namespace chatglm_kernels

TORCH_LIBRARY_FRAGMENT(chatglm, m) {
  m.def("stream_read(Tensor buf, int prefetch=0) -> int", &chatglm_kernels::stream_read);
}
