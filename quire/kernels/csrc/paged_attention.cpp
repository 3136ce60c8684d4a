// Paged attention kernels over the KV cache, called from quire/worker/attention.py and from
// decode_layer.cpp. The cache's elements are fp32 or bf16 (kv_cache_element.h); queries, outputs
// and all arithmetic are fp32.
//
// paged_decode_attention: single-token decode attention that reads K/V straight out of the
// paged cache ([num_blocks, block_size, kv_heads, head_dim]) through each sequence's block
// table. The pure-torch path must first gather every sequence's whole context into a padded
// copy and then run SDPA over it; here each K/V row is read once, in place.
//
// A work item is a span of one sequence's cache blocks, all heads together: a block is one
// contiguous run of memory, loaded once for every query head. With few sequences (one user's long
// context) a sequence is split into several spans that the threads take in parallel, each leaving
// its softmax max, sum and unnormalised output, merged at the end (flash-decoding); with many,
// spans are whole sequences. Threads take spans from a shared counter. Accumulation is fp32.

#include <torch/extension.h>

#include "kv_cache_element.h"
#include "layer_kernels.h"
#include "simd_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#ifdef QUIRE_AVX2
using quire_kv::load8;
using quire_simd::exp_nonpositive;
using quire_simd::horizontal_sum;
#endif
using quire_kv::to_float;

// a . b for an fp32 query a and a cached key b.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef QUIRE_AVX2
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  }
  sum = horizontal_sum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

// scores[i] = exp(scores[i] - max); returns the sum.
inline float exp_and_sum(float* scores, int64_t n, float max) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef QUIRE_AVX2
  const __m256 m = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + i), m));
    _mm256_storeu_ps(scores + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = horizontal_sum(acc);
#endif
  for (; i < n; ++i) {
    scores[i] = std::exp(scores[i] - max);
    sum += scores[i];
  }
  return sum;
}

#ifdef QUIRE_AVX2
// [sum(a[0]), ..., sum(a[7])]: eight horizontal sums in one register.
inline __m256 horizontal_sums8(const __m256* a) {
  const __m256 pairs01 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 pairs23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 pairs45 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 pairs67 = _mm256_hadd_ps(a[6], a[7]);
  // Each 128-bit lane now holds four partial sums of rows 0-3 (resp. 4-7): add the two lanes.
  const __m256 quads0123 = _mm256_hadd_ps(pairs01, pairs23);
  const __m256 quads4567 = _mm256_hadd_ps(pairs45, pairs67);
  return _mm256_add_ps(_mm256_permute2f128_ps(quads0123, quads4567, 0x20),
                       _mm256_permute2f128_ps(quads0123, quads4567, 0x31));
}

// The dot products of one query with 8 cached keys `token_stride` apart, for a head_dim fixed at
// compile time: the query stays in registers and the loop unrolls.
template <int64_t HEAD_DIM, typename T>
inline __m256 dot_8_keys_fixed(const float* query, const T* keys, int64_t token_stride) {
  __m256 q[HEAD_DIM / 8];
  for (int64_t c = 0; c < HEAD_DIM / 8; ++c) q[c] = _mm256_loadu_ps(query + 8 * c);
  __m256 sums[8];
  for (int j = 0; j < 8; ++j) {
    const T* key = keys + j * token_stride;
    __m256 even = _mm256_mul_ps(q[0], load8(key));
    __m256 odd = _mm256_mul_ps(q[1], load8(key + 8));
    for (int64_t c = 2; c < HEAD_DIM / 8; c += 2) {
      even = _mm256_fmadd_ps(q[c], load8(key + 8 * c), even);
      odd = _mm256_fmadd_ps(q[c + 1], load8(key + 8 * c + 8), odd);
    }
    sums[j] = _mm256_add_ps(even, odd);
  }
  return horizontal_sums8(sums);
}

// The same for any head_dim % 16 == 0 (the common sizes take the unrolled version).
template <typename T>
inline __m256 dot_8_keys(const float* query, const T* keys, int64_t token_stride, int64_t head_dim) {
  if (head_dim == 64) return dot_8_keys_fixed<64>(query, keys, token_stride);
  if (head_dim == 128) return dot_8_keys_fixed<128>(query, keys, token_stride);
  __m256 sums[8];
  for (int j = 0; j < 8; ++j) {
    const T* key = keys + j * token_stride;
    __m256 even = _mm256_setzero_ps();
    __m256 odd = _mm256_setzero_ps();
    for (int64_t c = 0; c < head_dim; c += 16) {
      even = _mm256_fmadd_ps(_mm256_loadu_ps(query + c), load8(key + c), even);
      odd = _mm256_fmadd_ps(_mm256_loadu_ps(query + c + 8), load8(key + c + 8), odd);
    }
    sums[j] = _mm256_add_ps(even, odd);
  }
  return horizontal_sums8(sums);
}
#endif

// Asks for `bytes` bytes from `start` to be brought into cache: the next block of a sequence lies
// anywhere in the pool, out of the hardware prefetcher's sight.
inline void prefetch_bytes(const void* start, int64_t bytes) {
#ifdef QUIRE_AVX2
  const char* first = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(first + offset, _MM_HINT_T0);
#else
  (void)start, (void)bytes;
#endif
}

// The largest of n floats.
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float best = -INFINITY;
#ifdef QUIRE_AVX2
  if (n >= 8) {
    __m256 m = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    best = _mm_cvtss_f32(m4);
  }
#endif
  for (; i < n; ++i) best = std::max(best, x[i]);
  return best;
}

constexpr int64_t kValueSlice = 64;

// out[0:width] += sum_{t < n} weights[t] * values[t * token_stride + 0:width]; width <= kValueSlice.
template <typename T>
inline void accumulate_values(const T* values, int64_t token_stride, const float* weights, int64_t n,
                              int64_t width, float* out) {
#ifdef QUIRE_AVX2
  if (width == kValueSlice) {
    // The running sums stay in registers for the whole block.
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(out + 8 * i);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 w = _mm256_set1_ps(weights[t]);
      const T* value = values + t * token_stride;
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(w, load8(value + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    const float w = weights[t];
    const T* value = values + t * token_stride;
    for (int64_t d = 0; d < width; ++d) out[d] += w * to_float(value[d]);
  }
}

// Both caches on the CPU, contiguous, and of one element type that the kernels read (the list is
// quire_kv::with_cache_element's, whose refusal names the dtype), checked before anything else.
void check_caches(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const char* kernel) {
  for (const torch::Tensor* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), kernel, ": the caches must be contiguous CPU tensors");
  }
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), kernel, ": the K and V caches' dtypes differ");
  quire_kv::with_cache_element(k_cache, [](auto) {});
}

void check_inputs(const torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                  const torch::Tensor& seq_lens) {
  for (const torch::Tensor* t : {&out, &q}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "paged_decode_attention: q and out must be contiguous float32 on CPU");
  }
  check_caches(k_cache, v_cache, "paged_decode_attention");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
                  block_tables.dim() == 2,
              "block_tables must be a contiguous int64 [num_seqs, max_blocks] tensor");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt64 && seq_lens.is_contiguous() && seq_lens.dim() == 1,
              "seq_lens must be a contiguous int64 [num_seqs] tensor");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [num_seqs, num_heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "caches must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q and the caches differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0),
              "one block table row and one length per sequence");
}

// Where rows sit in a paged cache [num_blocks, block_size, num_kv_heads, head_dim].
struct CacheLayout {
  int64_t num_blocks, block_size, num_kv_heads, head_dim, token_stride, block_stride;
  explicit CacheLayout(const torch::Tensor& cache)
      : num_blocks(cache.size(0)),
        block_size(cache.size(1)),
        num_kv_heads(cache.size(2)),
        head_dim(cache.size(3)),
        token_stride(num_kv_heads * head_dim),
        block_stride(block_size * token_stride) {}
};

// The block table row of a context of `context` tokens must name blocks of the cache.
void check_block_ids(const int64_t* row, int64_t context, const CacheLayout& cache) {
  for (int64_t j = 0; j < (context + cache.block_size - 1) / cache.block_size; ++j) {
    TORCH_CHECK(row[j] >= 0 && row[j] < cache.num_blocks, "block id out of range");
  }
}

// A decode attention work item: blocks [first_block, first_block + num_blocks) of one sequence.
struct DecodeSpan {
  int64_t seq, first_block, num_blocks, partial;  // partial: its slot in the split scratch, or -1
};

// Blocks per work item: whole sequences when there are enough of them to keep every thread busy;
// otherwise sequences are split (flash-decoding) into spans of at least kMinSpanBlocks, so that a
// single long sequence is read by all threads at once, and the spans' partial results are merged.
constexpr int64_t kMinSpanBlocks = 4;
constexpr int64_t kSpansPerThread = 4;

// One sequence's output rows [num_heads, head_dim] from its `count` spans' partial results
// [count, num_heads, head_dim + 2] (unnormalised sums, then max and sum of exp(score - max)):
// each span rescaled to the largest max, then normalised.
void merge_partials(const float* parts, int64_t count, int64_t num_heads, int64_t head_dim, float* out) {
  const int64_t width = head_dim + 2, span_stride = num_heads * width;
  for (int64_t h = 0; h < num_heads; ++h) {
    float max = -INFINITY;
    for (int64_t p = 0; p < count; ++p) max = std::max(max, parts[p * span_stride + h * width + head_dim]);
    float* row = out + h * head_dim;
    std::fill(row, row + head_dim, 0.0f);
    float sum = 0.0f;
    for (int64_t p = 0; p < count; ++p) {
      const float* part = parts + p * span_stride + h * width;
      const float weight = std::exp(part[head_dim] - max);
      sum += weight * part[head_dim + 1];
      for (int64_t d = 0; d < head_dim; ++d) row[d] += weight * part[d];
    }
    const float inverse = 1.0f / sum;
    for (int64_t d = 0; d < head_dim; ++d) row[d] *= inverse;
  }
}

template <typename T>
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  const CacheLayout cache(k_cache);
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = cache.head_dim;
  const int64_t block_size = cache.block_size, num_kv_heads = cache.num_kv_heads;
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t token_stride = cache.token_stride, block_stride = cache.block_stride;

  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  int64_t total_blocks = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size,
                "sequence length out of range of its block table");
    check_block_ids(tables + s * max_blocks, lens[s], cache);
    total_blocks += (lens[s] + block_size - 1) / block_size;
  }
  const float* q_data = q.data_ptr<float>();
  const T* k_data = static_cast<const T*>(k_cache.data_ptr());
  const T* v_data = static_cast<const T*>(v_cache.data_ptr());
  float* out_data = out.data_ptr<float>();
  const float softmax_scale = static_cast<float>(scale);

  // Work items. A sequence's span reads each of its cache blocks as one contiguous run of
  // block_size * kv_heads * head_dim cache elements, all heads together.
  const int64_t threads = at::get_num_threads();
  const int64_t span_blocks =
      num_seqs >= kSpansPerThread * threads
          ? max_blocks
          : std::max(kMinSpanBlocks, (total_blocks + kSpansPerThread * threads - 1) / (kSpansPerThread * threads));
  std::vector<DecodeSpan> spans;
  std::vector<int64_t> first_partial(static_cast<size_t>(num_seqs), -1), num_partials(static_cast<size_t>(num_seqs), 0);
  int64_t partials = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t blocks = (lens[s] + block_size - 1) / block_size;
    if (blocks <= span_blocks) {
      spans.push_back({s, 0, blocks, -1});
      continue;
    }
    first_partial[s] = partials;
    for (int64_t b = 0; b < blocks; b += span_blocks) {
      spans.push_back({s, b, std::min(span_blocks, blocks - b), partials++});
      ++num_partials[s];
    }
  }
  // Split spans leave, per query head, their max score, their sum of exp(score - max) and their
  // unnormalised weighted sum of values: [partials, num_heads, head_dim + 2].
  const int64_t partial_width = head_dim + 2;
  std::vector<float> partial_data(static_cast<size_t>(partials * num_heads * partial_width));

  const int64_t block_bytes = block_stride * static_cast<int64_t>(sizeof(T));
#ifdef QUIRE_AVX2
  // Eight keys at a time when a block holds whole tiles of 8 rows (rows past a sequence's length
  // inside its last block are scored too, into padding that is never read).
  const bool key_tiles = head_dim % 16 == 0 && block_size % 8 == 0;
#endif

  std::atomic<int64_t> next_span{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scores;  // [num_heads, padded span length]
    std::vector<float> maxes(static_cast<size_t>(num_heads)), sums(static_cast<size_t>(num_heads));
    for (int64_t i = next_span.fetch_add(1); i < static_cast<int64_t>(spans.size()); i = next_span.fetch_add(1)) {
      const DecodeSpan& span = spans[static_cast<size_t>(i)];
      const int64_t seq = span.seq, len = lens[seq];
      const int64_t start0 = span.first_block * block_size;
      const int64_t span_len = std::min(span.num_blocks * block_size, len - start0);
      const int64_t padded_len = (span_len + 7) / 8 * 8;
      const int64_t* table = tables + seq * max_blocks + span.first_block;
      const float* q_rows = q_data + seq * num_heads * head_dim;
      scores.resize(static_cast<size_t>(num_heads * padded_len));
      // The span's block b of `cache_data` (all heads); block b + 1 is requested ahead, since it
      // lies anywhere in the pool, out of the hardware prefetcher's sight.
      auto block_rows = [&](const T* cache_data, int64_t b) {
        if (b + 1 < span.num_blocks) {
          prefetch_bytes(cache_data + table[b + 1] * block_stride, block_bytes);
        }
        return cache_data + table[b] * block_stride;
      };

      // Scores: every cached key of the block against its kv head's group of queries, so a block
      // is loaded once for all the query heads that share it.
      for (int64_t b = 0; b < span.num_blocks; ++b) {
        const int64_t start = b * block_size;
        const int64_t n = std::min(block_size, span_len - start);
        const T* block = block_rows(k_data, b);
        for (int64_t h = 0; h < num_heads; ++h) {
          const T* keys = block + (h / group) * head_dim;
          const float* query = q_rows + h * head_dim;
          float* row = scores.data() + h * padded_len + start;
          int64_t t = 0;
#ifdef QUIRE_AVX2
          if (key_tiles) {
            const __m256 scale8 = _mm256_set1_ps(softmax_scale);
            for (; t < n; t += 8) {
              _mm256_storeu_ps(row + t,
                               _mm256_mul_ps(dot_8_keys(query, keys + t * token_stride, token_stride, head_dim), scale8));
            }
          }
#endif
          for (; t < n; ++t) row[t] = dot(query, keys + t * token_stride, head_dim) * softmax_scale;
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        float* row = scores.data() + h * padded_len;
        maxes[h] = max_of(row, span_len);
        sums[h] = exp_and_sum(row, span_len, maxes[h]);
      }
      // Weighted sum of the cached values into the output rows, or the span's partial rows.
      float* acc_rows;
      int64_t acc_stride;
      if (span.partial < 0) {
        acc_rows = out_data + seq * num_heads * head_dim;
        acc_stride = head_dim;
      } else {
        acc_rows = partial_data.data() + span.partial * num_heads * partial_width;
        acc_stride = partial_width;
      }
      for (int64_t h = 0; h < num_heads; ++h) std::fill(acc_rows + h * acc_stride, acc_rows + h * acc_stride + head_dim, 0.0f);
      for (int64_t b = 0; b < span.num_blocks; ++b) {
        const int64_t start = b * block_size;
        const int64_t n = std::min(block_size, span_len - start);
        const T* block = block_rows(v_data, b);
        for (int64_t h = 0; h < num_heads; ++h) {
          const T* values = block + (h / group) * head_dim;
          const float* weights = scores.data() + h * padded_len + start;
          for (int64_t d0 = 0; d0 < head_dim; d0 += kValueSlice) {
            accumulate_values(values + d0, token_stride, weights, n, std::min(kValueSlice, head_dim - d0),
                              acc_rows + h * acc_stride + d0);
          }
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        float* row = acc_rows + h * acc_stride;
        if (span.partial < 0) {
          const float inverse = 1.0f / sums[h];
          for (int64_t d = 0; d < head_dim; ++d) row[d] *= inverse;
        } else {
          row[head_dim] = maxes[h];
          row[head_dim + 1] = sums[h];
        }
      }
    }
  });

  for (int64_t s = 0; s < num_seqs; ++s) {
    if (first_partial[s] >= 0) {
      merge_partials(partial_data.data() + first_partial[s] * num_heads * partial_width, num_partials[s], num_heads,
                     head_dim, out_data + s * num_heads * head_dim);
    }
  }
}

}  // namespace

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  check_inputs(out, q, k_cache, v_cache, block_tables, seq_lens);
  quire_kv::with_cache_element(k_cache, [&](auto element) {
    decode_attention<decltype(element)>(out, q, k_cache, v_cache, block_tables, seq_lens, scale);
  });
}
// ---------------------------------------------------------------------------------------------
// paged_prefill_attention: causal attention for the prefill chunks of a step, reading K/V from the
// paged cache (the step's own K/V is written there first), so a chunk that continues a cached
// prefix (chunked prefill, prefix-cache hits, recompute) is handled like a fresh prompt and no
// context is gathered into a copy.
//
// A work item is (chunk, kv head, tile of up to kPrefillTile query tokens); its rows are the tile's
// tokens times the `group` query heads of that kv head, so each key block is transposed once for
// all of them. Keys go 16 at a time (block_size is a multiple of 16, so a group of keys never
// straddles two cache blocks) with an online softmax (running max and sum per row, the output
// rescaled when the max grows). Items are taken from a shared counter, longest
// first, because causal tiles late in a long chunk cost many times more than early ones.

namespace {

constexpr int64_t kPrefillTile = 16;  // query tokens per work item
constexpr int64_t kKeyWidth = 16;     // keys scored per microkernel pass (two AVX2 vectors)

struct PrefillItem {
  int64_t chunk, kv_head, first_token, num_tokens, cost;
};

#ifdef QUIRE_AVX2
// scores[r][0:16] = queries[r] . keys_t[:, 0:16] for ROWS consecutive rows of `queries`
// (row stride head_dim); keys_t is [head_dim][16], the key block transposed.
template <int ROWS>
inline void score_rows(const float* queries, int64_t head_dim, const float* keys_t, float* scores) {
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < head_dim; ++d) {
    const __m256 k0 = _mm256_loadu_ps(keys_t + d * kKeyWidth);
    const __m256 k1 = _mm256_loadu_ps(keys_t + d * kKeyWidth + 8);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 qv = _mm256_broadcast_ss(queries + r * head_dim + d);
      acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm256_storeu_ps(scores + r * kKeyWidth, acc[r][0]);
    _mm256_storeu_ps(scores + r * kKeyWidth + 8, acc[r][1]);
  }
}
#endif

// scores[r][0:16] for all `rows` rows; keys past the block's end are zero columns of keys_t.
void score_block(const float* queries, int64_t rows, int64_t head_dim, const float* keys_t, float* scores) {
  int64_t r = 0;
#ifdef QUIRE_AVX2
  for (; r + 6 <= rows; r += 6) score_rows<6>(queries + r * head_dim, head_dim, keys_t, scores + r * kKeyWidth);
  switch (rows - r) {
    case 5: score_rows<5>(queries + r * head_dim, head_dim, keys_t, scores + r * kKeyWidth); return;
    case 4: score_rows<4>(queries + r * head_dim, head_dim, keys_t, scores + r * kKeyWidth); return;
    case 3: score_rows<3>(queries + r * head_dim, head_dim, keys_t, scores + r * kKeyWidth); return;
    case 2: score_rows<2>(queries + r * head_dim, head_dim, keys_t, scores + r * kKeyWidth); return;
    case 1: score_rows<1>(queries + r * head_dim, head_dim, keys_t, scores + r * kKeyWidth); return;
    default: return;
  }
#endif
  for (; r < rows; ++r) {
    for (int64_t j = 0; j < kKeyWidth; ++j) {
      float sum = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) sum += queries[r * head_dim + d] * keys_t[d * kKeyWidth + j];
      scores[r * kKeyWidth + j] = sum;
    }
  }
}

template <typename T>
void prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor chunks, torch::Tensor block_tables, double scale) {
  const CacheLayout cache(k_cache);
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = cache.head_dim;
  const int64_t q_token_stride = q.stride(0), block_size = cache.block_size;
  const int64_t num_kv_heads = cache.num_kv_heads, group = num_heads / num_kv_heads;
  const int64_t token_stride = cache.token_stride, block_stride = cache.block_stride;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* info = chunks.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();

  std::vector<PrefillItem> items;
  for (int64_t c = 0; c < chunks.size(0); ++c) {
    const int64_t start = info[3 * c], len = info[3 * c + 1], computed = info[3 * c + 2];
    TORCH_CHECK(start >= 0 && len >= 0 && start + len <= num_tokens && computed >= 0,
                "chunk rows out of range of q");
    const int64_t context = computed + len;
    TORCH_CHECK(context <= max_blocks * block_size, "chunk context longer than its block table");
    check_block_ids(tables + c * max_blocks, context, cache);
    for (int64_t first = 0; first < len; first += kPrefillTile) {
      const int64_t n = std::min(kPrefillTile, len - first);
      for (int64_t h = 0; h < num_kv_heads; ++h) items.push_back({c, h, first, n, n * (computed + first + n)});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const PrefillItem& a, const PrefillItem& b) { return a.cost > b.cost; });

  const float* q_data = q.data_ptr<float>();
  const T* k_data = static_cast<const T*>(k_cache.data_ptr());
  const T* v_data = static_cast<const T*>(v_cache.data_ptr());
  float* out_data = out.data_ptr<float>();
  const float softmax_scale = static_cast<float>(scale);
  const int64_t max_rows = kPrefillTile * group;
  std::atomic<int64_t> next_item{0};
  const int64_t num_items = static_cast<int64_t>(items.size());

  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_items), 1, [&](int64_t, int64_t) {
    std::vector<float> queries(max_rows * head_dim), acc(max_rows * head_dim), keys_t(head_dim * kKeyWidth);
    std::vector<float> scores(max_rows * kKeyWidth), row_max(max_rows), row_sum(max_rows);
    for (int64_t i = next_item++; i < num_items; i = next_item++) {
      const PrefillItem& item = items[i];
      const int64_t start = info[3 * item.chunk], computed = info[3 * item.chunk + 2];
      const int64_t* table = tables + item.chunk * max_blocks;
      const int64_t rows = item.num_tokens * group;  // row r: token r / group, query head r % group
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = q_data + (start + item.first_token + r / group) * q_token_stride +
                           (item.kv_head * group + r % group) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) queries[r * head_dim + d] = src[d] * softmax_scale;
      }
      std::fill(acc.begin(), acc.begin() + rows * head_dim, 0.0f);
      std::fill(row_max.begin(), row_max.begin() + rows, -INFINITY);
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.0f);
      const int64_t first_pos = computed + item.first_token;  // absolute position of the tile's first token
      const int64_t num_keys = first_pos + item.num_tokens;  // the last token sees keys 0 .. num_keys - 1
      for (int64_t key0 = 0; key0 < num_keys; key0 += kKeyWidth) {
        const int64_t n = std::min(kKeyWidth, num_keys - key0);
        const int64_t block = table[key0 / block_size];
        const int64_t offset = key0 % block_size;
        const T* keys = k_data + block * block_stride + offset * token_stride + item.kv_head * head_dim;
        const T* values = v_data + block * block_stride + offset * token_stride + item.kv_head * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          for (int64_t j = 0; j < kKeyWidth; ++j) keys_t[d * kKeyWidth + j] = j < n ? to_float(keys[j * token_stride + d]) : 0.0f;
        }
        score_block(queries.data(), rows, head_dim, keys_t.data(), scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          // Causal: this row's token sees keys up to its own position.
          const int64_t visible = std::min(n, first_pos + r / group - key0 + 1);
          if (visible <= 0) continue;
          float* row_scores = scores.data() + r * kKeyWidth;
          const float block_max = *std::max_element(row_scores, row_scores + visible);
          const float new_max = std::max(row_max[r], block_max);
          float* row_acc = acc.data() + r * head_dim;
          if (new_max > row_max[r] && row_sum[r] > 0.0f) {
            const float rescale = std::exp(row_max[r] - new_max);
            row_sum[r] *= rescale;
            for (int64_t d = 0; d < head_dim; ++d) row_acc[d] *= rescale;
          }
          row_max[r] = new_max;
          row_sum[r] += exp_and_sum(row_scores, visible, new_max);
          for (int64_t d0 = 0; d0 < head_dim; d0 += kValueSlice) {
            accumulate_values(values + d0, token_stride, row_scores, visible, std::min(kValueSlice, head_dim - d0),
                              row_acc + d0);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = out_data + (start + item.first_token + r / group) * num_heads * head_dim +
                     (item.kv_head * group + r % group) * head_dim;
        const float inverse = 1.0f / row_sum[r];
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = acc[r * head_dim + d] * inverse;
      }
    }
  });
}

}  // namespace

void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor chunks, torch::Tensor block_tables, double scale) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat32 && out.is_contiguous(),
              "paged_prefill_attention: out must be a contiguous float32 CPU tensor");
  check_caches(k_cache, v_cache, "paged_prefill_attention");
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat32 && q.dim() == 3 && q.stride(2) == 1 &&
                  q.stride(1) == q.size(2),
              "q must be a float32 [tokens, num_heads, head_dim] CPU tensor with contiguous heads");
  TORCH_CHECK(out.sizes() == q.sizes(), "out and q shapes differ");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(2),
              "caches must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(k_cache.size(1) % kKeyWidth == 0, "block_size must be a multiple of 16");
  TORCH_CHECK(chunks.scalar_type() == torch::kInt64 && chunks.is_contiguous() && chunks.dim() == 2 &&
                  chunks.size(1) == 3,
              "chunks must be a contiguous int64 [num_chunks, 3] tensor (query_start, query_len, num_computed)");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.size(0) == chunks.size(0),
              "block_tables must be a contiguous int64 [num_chunks, max_blocks] tensor");
  quire_kv::with_cache_element(k_cache, [&](auto element) {
    prefill_attention<decltype(element)>(out, q, k_cache, v_cache, chunks, block_tables, scale);
  });
}
