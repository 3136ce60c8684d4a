// The element types a paged KV cache holds, and how the kernels read and write them: fp32, or
// bf16 (--kv-cache-dtype bfloat16: half the memory, half the bytes attention reads per step).
// Reads widen bf16 to fp32 exactly; all arithmetic stays fp32. Writes round to nearest even, as
// torch's .to(torch.bfloat16) does, so a row stored by the compiled decode step and one stored by
// the torch path hold the same bits.
#pragma once

#include <torch/extension.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "simd_math.h"

namespace quire_kv {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// n values from fp32 into a cache row.
inline void store_row(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, int64_t n, c10::BFloat16* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);  // round to nearest even
}

#ifdef QUIRE_AVX2
// Eight consecutive cache elements as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
#endif

// Calls fn(T{}) with T the element type of `cache` (float or c10::BFloat16); any other dtype is
// an error that names it.
template <typename Fn>
void with_cache_element(const torch::Tensor& cache, Fn&& fn) {
  switch (cache.scalar_type()) {
    case torch::kFloat32: fn(float{}); return;
    case torch::kBFloat16: fn(c10::BFloat16{}); return;
    default: TORCH_CHECK(false, "KV caches must be float32 or bfloat16, got ", cache.scalar_type());
  }
}

}  // namespace quire_kv
