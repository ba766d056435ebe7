// Decode attention straight over the paged KV cache: one query token per request attends to its
// context through the block table, reading each key and value once from the cache.
//
// Why: the plain-torch path gathers every request's blocks into a dense [B, L, H, D] copy
// (index_select) before scaled_dot_product_attention. Decode attention is memory bound, and the
// gather reads and writes the whole context again: on this CPU it was ~45% of the attention
// time and attention ~25% of a mixed-length step. Here each request (or, with few requests and
// several threads, each (request, KV head) pair) is one task: scores for all its query heads in
// one pass over the keys (rows prefetched ahead, eight keys per vector reduction), a float32
// softmax, then one pass over the values (a block's worth of keys per register-held
// accumulator). Numerics: float32 accumulation whatever the cache dtype (as SDPA).
//
// Layout contract (checked below): the layer view is
// [num_blocks, 2, block_size, kv_heads, head_dim] with a unit stride on head_dim; q and out are
// contiguous [B, q_heads, head_dim]; block_table is int64 [B, W]; seq_lens int64 [B] with
// 1 <= seq_lens[b] <= W * block_size.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "block_table.h"
#include "dtypes.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using fdpd::to_float;

#ifdef __AVX2__
// 8 elements of a key/value row as float32 lanes.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// q (float32) . k; four independent accumulators keep the FMA units busy.
template <typename T>
inline float dot(const float* __restrict q, const T* __restrict k, int64_t d) {
  int64_t i = 0;
  float s = 0.f;
#ifdef __AVX2__
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= d; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), load8(k + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), load8(k + i + 24), a3);
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  s = fdpd::hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; i < d; ++i) s += q[i] * to_float(k[i]);
  return s;
}

// acc += a * v
template <typename T>
inline void axpy(float a, const T* __restrict v, float* __restrict acc, int64_t d) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(av, load8(v + i), _mm256_loadu_ps(acc + i)));
#endif
  for (; i < d; ++i) acc[i] += a * to_float(v[i]);
}

// Rows of one head are 512 B apart from the next token's (the other heads sit between) and
// blocks are scattered: the hardware prefetchers did not follow, and the kernel waited on DRAM
// for every row (5 GB/s against 17 for a plain stream). Rows are fetched kAhead keys early.
constexpr int64_t kAhead = 8;
constexpr int64_t kValueTile = 16;      // keys whose values are summed with acc in registers

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

#ifdef __AVX2__
// Scores of keys t0 .. t0 + 8 for the task's nq query heads (query head j reads KV head
// j / group, at offset (j / group) * s_head of each key row): per head, eight FMA chains (one per
// key) over head_dim, then one transpose-and-add turns the eight into a vector of eight scores
// (instead of a horizontal sum per key). head_dim is a multiple of 8.
template <typename T>
inline void scores8(const T* const* k, const float* qf, int64_t nq, int64_t group,
                    int64_t head_dim, int64_t s_head, float* scores, int64_t len) {
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t off = j / group * s_head;
    const float* qj = qf + j * head_dim;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    for (int64_t d = 0; d < head_dim; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qj + d);
      a0 = _mm256_fmadd_ps(qv, load8(k[0] + off + d), a0);
      a1 = _mm256_fmadd_ps(qv, load8(k[1] + off + d), a1);
      a2 = _mm256_fmadd_ps(qv, load8(k[2] + off + d), a2);
      a3 = _mm256_fmadd_ps(qv, load8(k[3] + off + d), a3);
      a4 = _mm256_fmadd_ps(qv, load8(k[4] + off + d), a4);
      a5 = _mm256_fmadd_ps(qv, load8(k[5] + off + d), a5);
      a6 = _mm256_fmadd_ps(qv, load8(k[6] + off + d), a6);
      a7 = _mm256_fmadd_ps(qv, load8(k[7] + off + d), a7);
    }
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    _mm256_storeu_ps(scores + j * len,
                     _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                   _mm256_permute2f128_ps(s0123, s4567, 0x31)));
  }
}

// acc[j] += sum over the n keys of p[j][t] * v[t] for the task's query heads, 32 columns at a
// time held in registers across the keys (instead of a load and store of acc per key).
template <typename T>
inline void accumulate_values(const T* const* v, int64_t n, const float* probs, int64_t len,
                              int64_t nq, int64_t group, int64_t head_dim, int64_t s_head,
                              float* acc) {
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t off = j / group * s_head;
    const float* p = probs + j * len;
    float* out = acc + j * head_dim;
    int64_t d = 0;
    for (; d + 32 <= head_dim; d += 32) {
      __m256 c0 = _mm256_loadu_ps(out + d), c1 = _mm256_loadu_ps(out + d + 8);
      __m256 c2 = _mm256_loadu_ps(out + d + 16), c3 = _mm256_loadu_ps(out + d + 24);
      for (int64_t t = 0; t < n; ++t) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        const T* row = v[t] + off + d;
        c0 = _mm256_fmadd_ps(pt, load8(row), c0);
        c1 = _mm256_fmadd_ps(pt, load8(row + 8), c1);
        c2 = _mm256_fmadd_ps(pt, load8(row + 16), c2);
        c3 = _mm256_fmadd_ps(pt, load8(row + 24), c3);
      }
      _mm256_storeu_ps(out + d, c0);
      _mm256_storeu_ps(out + d + 8, c1);
      _mm256_storeu_ps(out + d + 16, c2);
      _mm256_storeu_ps(out + d + 24, c3);
    }
    for (; d < head_dim; d += 8) {
      __m256 c0 = _mm256_loadu_ps(out + d);
      for (int64_t t = 0; t < n; ++t)
        c0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load8(v[t] + off + d), c0);
      _mm256_storeu_ps(out + d, c0);
    }
  }
}
#endif

// s[0..n) = softmax(s), in place.
inline void softmax(float* s, int64_t len) {
  const float m = *std::max_element(s, s + len);
  float sum = 0.f;
  int64_t t = 0;
#ifdef __AVX2__
  // exp dominated the kernel with std::exp (~20 cycles a score against ~8 for the dot).
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (; t + 8 <= len; t += 8) {
    const __m256 e = fdpd::exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    sv = _mm256_add_ps(sv, e);
  }
  sum = fdpd::hsum(sv);
#endif
  for (; t < len; ++t) { s[t] = std::exp(s[t] - m); sum += s[t]; }
  const float inv = 1.f / sum;
  for (t = 0; t < len; ++t) s[t] *= inv;
}

// One task's view of the cache: token t's rows of its KV heads (query head j of the task reads
// KV head j / group of them, at offset (j / group) * s_head), and what the passes share.
template <typename T>
struct TaskRows {
  const T* cache;
  const int64_t* blocks;
  int64_t block_size, s_block, s_kv, s_tok, s_head, first_head;
  int64_t nq, group, head_dim, span_bytes;   // query heads of the task; bytes of a token's rows
  bool vector_rows;                          // head_dim % 8 == 0: the AVX2 paths
  const T* key(int64_t t) const {
    return cache + blocks[t / block_size] * s_block + (t % block_size) * s_tok +
           first_head * s_head;
  }
  const T* value(int64_t t) const { return key(t) + s_kv; }
};

// scores[j * len + t] = qf[j] . key t, for t < len: one pass over the keys, eight at a time.
template <typename T>
void score_keys(const TaskRows<T>& r, int64_t len, const float* qf, float* scores) {
  int64_t t = 0;
#ifdef __AVX2__
  for (; r.vector_rows && t + 8 <= len; t += 8) {
    const T* k[8];
    for (int64_t i = 0; i < 8; ++i) {
      if (t + i + kAhead < len) prefetch(r.key(t + i + kAhead), r.span_bytes);
      k[i] = r.key(t + i);
    }
    scores8(k, qf, r.nq, r.group, r.head_dim, r.s_head, scores + t, len);
  }
#endif
  for (; t < len; ++t) {
    if (t + kAhead < len) prefetch(r.key(t + kAhead), r.span_bytes);
    for (int64_t j = 0; j < r.nq; ++j)
      scores[j * len + t] = dot(qf + j * r.head_dim, r.key(t) + j / r.group * r.s_head,
                                r.head_dim);
  }
}

// acc[j] = sum over t < len of probs[j * len + t] * value t: one pass, a block's worth at a time.
template <typename T>
void sum_values(const TaskRows<T>& r, int64_t len, const float* probs, float* acc) {
  std::fill(acc, acc + r.nq * r.head_dim, 0.f);
  int64_t t = 0;
#ifdef __AVX2__
  for (; r.vector_rows && t < len; t += kValueTile) {
    const int64_t n = std::min(kValueTile, len - t);
    const T* v[kValueTile];
    for (int64_t i = 0; i < n; ++i) {
      if (t + i + kAhead < len) prefetch(r.value(t + i + kAhead), r.span_bytes);
      v[i] = r.value(t + i);
    }
    accumulate_values(v, n, probs + t, len, r.nq, r.group, r.head_dim, r.s_head, acc);
  }
#endif
  for (; t < len; ++t) {
    if (t + kAhead < len) prefetch(r.value(t + kAhead), r.span_bytes);
    for (int64_t j = 0; j < r.nq; ++j)
      axpy(probs[j * len + t], r.value(t) + j / r.group * r.s_head, acc + j * r.head_dim,
           r.head_dim);
  }
}

template <typename T, typename Q>
void decode_kernel(const Q* q, const T* cache, const int64_t* table, const int64_t* lens,
                   Q* out, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                   int64_t block_size, int64_t width, int64_t s_block, int64_t s_kv,
                   int64_t s_tok, int64_t s_head, float scale) {
  const int64_t group = q_heads / kv_heads;
  // A task is one request and a run of its KV heads: all of them when there are requests
  // enough for every thread (a token's rows of all heads are contiguous, so the task streams
  // each block's keys in one piece), else one head per task.
  const int64_t heads = batch >= 2 * at::get_num_threads() ? kv_heads : 1;
  const int64_t nq = heads * group, runs = kv_heads / heads;
  const int64_t span_bytes = ((heads - 1) * s_head + head_dim) * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, batch * runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(nq * head_dim), acc(nq * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / runs, h0 = task % runs * heads, len = lens[b];
      const TaskRows<T> rows{cache, table + b * width, block_size, s_block, s_kv, s_tok, s_head,
                             h0, nq, group, head_dim, span_bytes, head_dim % 8 == 0};
      const Q* qb = q + (b * q_heads + h0 * group) * head_dim;   // the task's query heads
      for (int64_t i = 0; i < nq * head_dim; ++i) qf[i] = to_float(qb[i]) * scale;
      if (static_cast<int64_t>(scores.size()) < nq * len) scores.resize(nq * len);
      score_keys(rows, len, qf.data(), scores.data());
      for (int64_t j = 0; j < nq; ++j) softmax(scores.data() + j * len, len);
      sum_values(rows, len, scores.data(), acc.data());
      Q* ob = out + (b * q_heads + h0 * group) * head_dim;
      for (int64_t i = 0; i < nq * head_dim; ++i) ob[i] = static_cast<Q>(acc[i]);
    }
  });
}

// out[B, Hq, D] = attention of q[B, Hq, D] over layer_cache[blocks, 2, bs, Hkv, D].
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor layer_cache,
                            torch::Tensor block_table, torch::Tensor seq_lens, double scale) {
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = layer_cache.size(3), block_size = layer_cache.size(2);
  TORCH_CHECK(q.scalar_type() == layer_cache.scalar_type(), "q and the cache differ in dtype");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && layer_cache.stride(4) == 1 &&
              q_heads % kv_heads == 0 && block_table.scalar_type() == at::kLong &&
              seq_lens.scalar_type() == at::kLong && block_table.is_contiguous(),
              "paged_decode_attention: layout contract violated (see the file's header)");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == batch && seq_lens.numel() == batch,
              "paged_decode_attention: one block table row and one length per request");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= block_table.size(1) * block_size,
                "paged_decode_attention: request ", b, " has ", lens[b],
                " tokens, its blocks hold 1..", block_table.size(1) * block_size);
  fdpd::check_block_ids(block_table, layer_cache.size(0), "paged_decode_attention");
  fdpd::dispatch(layer_cache.scalar_type(), "paged_decode_attention", [&](auto tag) {
    using T = decltype(tag);
    decode_kernel<T, T>(
        q.data_ptr<T>(), layer_cache.data_ptr<T>(), block_table.data_ptr<int64_t>(),
        seq_lens.data_ptr<int64_t>(), out.data_ptr<T>(), batch, q_heads, kv_heads, head_dim,
        block_size, block_table.size(1), layer_cache.stride(0), layer_cache.stride(1),
        layer_cache.stride(2), layer_cache.stride(3), static_cast<float>(scale));
  });
}

}  // namespace

TORCH_LIBRARY(fdpd, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor layer_cache, "
        "Tensor block_table, Tensor seq_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(fdpd, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
