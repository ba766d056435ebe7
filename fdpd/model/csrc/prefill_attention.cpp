// Prefill attention straight over the paged KV cache: every prompt chunk of a step attends,
// causally, to its own new tokens and to everything already cached for its request, reading the
// keys and values through the block table.
//
// Why: the plain-torch path gathers a chunk's context into a dense copy (index_select) and
// builds a [new, total] visibility mask before scaled_dot_product_attention, one call per
// chunk. Here attention is flash-style tiling (FlashAttention-2's loop order) with
// register-blocked micro-GEMMs and no copy of the context:
//
//   for each (chunk, KV head, tile of about 48 query rows)       <- one task, run in parallel
//     Q^T = the tile's rows, every query head of the KV head's group stacked (GQA costs no
//           extra key traffic), pre-scaled, float32, transposed once
//     for each tile of kKeys keys the tile can see (causal)
//       S^T = K Q^T   (keys x rows: K's rows are read in place from their blocks, so nothing is
//                      transposed or copied per key tile)
//       online softmax down each column of S^T, 8 query rows per vector: masked tile max,
//       rescale the running sum and O, P = exp(S - max) (zero past a row's causal limit)
//       O += P V      (V's rows read in place too)
//     out = O / sum
//
// Both products run the 6 x 16 micro-kernel of micro_kernel.h (12 accumulators, AVX2 FMA),
// its operands addressed through accessors: rows by pointer (keys, values), or transposed
// (P = S^T).
// A bf16/fp16 cache, or a head_dim that is not a multiple of 8, packs each key tile into float32
// rows first. Numerics: float32 accumulation and softmax whatever the cache dtype (as SDPA on
// CPU); every query sees at least itself, so no row is ever empty and the mask cannot make NaN.
//
// Layout contract (checked below): q and out contiguous [T, Hq, D]; the layer view
// [num_blocks, 2, block_size, kv_heads, D] with a unit stride on D; spans int64 [S, 3] rows of
// (first flat token, new tokens, tokens cached before the step); block_table int64 [S, W]
// holding the blocks of each span's first start + new positions.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "block_table.h"
#include "dtypes.h"
#include "micro_kernel.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kRows = fdpd::kMicroRows;
constexpr int64_t kCols = 16;         // micro-kernel columns (two 8-float vectors)
constexpr int64_t kKeys = 48;         // keys per key tile (a multiple of kRows)
constexpr int64_t kTileRows = 48;     // query rows per task (tokens x group heads), about
constexpr int64_t kRowAlign = 24;     // query rows padded to a multiple of 6 (PV) and 8 (S^T)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

using fdpd::GatheredRows;
using fdpd::RowsByPointer;
using fdpd::Strided;
using fdpd::to_float;
using fdpd::Transposed;

// C[M x N] (+)= A[M x K] B[K x N]; M a multiple of 6, N of 8. B's 16-column panel stays in L1
// while the rows go by.
template <bool kAccumulate, typename MakeA, typename MakeB>
void gemm(MakeA make_a, MakeB make_b, float* C, int64_t ldc, int64_t M, int64_t N, int64_t K) {
  int64_t j = 0;
  for (; j + kCols <= N; j += kCols)
    for (int64_t i = 0; i < M; i += kRows)
      fdpd::micro_kernel<kCols, kAccumulate, kRows>(make_a(i), make_b(j), C + i * ldc + j, ldc,
                                                    K);
  if (j < N)
    for (int64_t i = 0; i < M; i += kRows)
      fdpd::micro_kernel<8, kAccumulate, kRows>(make_a(i), make_b(j), C + i * ldc + j, ldc, K);
}

struct Task { int64_t span, head, first; };   // first: the tile's first new token of the span

struct Geometry {
  int64_t q_heads, kv_heads, group, head_dim, dim_padded, block_size, width;
  int64_t s_block, s_kv, s_tok, s_head;
  int64_t tile_tokens;
  bool packed;                                 // key tiles copied to float32 rows first
};

// Per-thread scratch, sized once for the largest tile.
struct Scratch {
  std::vector<float> qt, st, o, max, sum, correction, kbuf, vbuf, zero;
  std::vector<int32_t> pos;
  std::vector<const float*> keys, values;
  explicit Scratch(const Geometry& g) {
    const int64_t rp = round_up(g.tile_tokens * g.group, kRowAlign), dp = g.dim_padded;
    qt.assign(g.head_dim * rp, 0.f);
    st.assign(kKeys * rp, 0.f);
    o.assign(rp * dp, 0.f);
    max.assign(rp, 0.f);
    sum.assign(rp, 0.f);
    correction.assign(rp, 0.f);
    pos.assign(rp, 0);
    if (g.packed) {
      kbuf.assign(kKeys * dp, 0.f);
      vbuf.assign(kKeys * dp, 0.f);
    }
    zero.assign(dp, 0.f);
    keys.assign(kKeys, nullptr);
    values.assign(kKeys, nullptr);
  }
};

// Point keys[j] / values[j] at the float32 rows of keys k0 .. k0 + n (in place for a float32
// cache, else converted into kbuf/vbuf); rows n .. n_padded point at zeros.
template <typename T>
void locate_keys(const T* cache, const int64_t* blocks, const Geometry& g, int64_t head,
                 int64_t k0, int64_t n, int64_t n_padded, Scratch& w) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = k0 + j;
    const T* k = cache + blocks[p / g.block_size] * g.s_block + (p % g.block_size) * g.s_tok +
                 head * g.s_head;
    if (!g.packed) {
      w.keys[j] = reinterpret_cast<const float*>(k);
      w.values[j] = reinterpret_cast<const float*>(k + g.s_kv);
      continue;
    }
    float* kd = w.kbuf.data() + j * g.dim_padded;
    float* vd = w.vbuf.data() + j * g.dim_padded;
    for (int64_t d = 0; d < g.head_dim; ++d) {
      kd[d] = to_float(k[d]);
      vd[d] = to_float(k[g.s_kv + d]);
    }
    w.keys[j] = kd;
    w.values[j] = vd;
  }
  for (int64_t j = n; j < n_padded; ++j) w.keys[j] = w.values[j] = w.zero.data();
}

// Online softmax over one key tile, down the columns of S^T [n_padded x rp]: 8 query rows at a
// time. Keys past a row's position (or past n) get probability 0; max/sum/correction updated.
void softmax_tile(Scratch& w, int64_t k0, int64_t n, int64_t n_padded, int64_t rp) {
  float* st = w.st.data();
#ifdef __AVX2__
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rp; r += 8) {
    // visible(j) = k0 + j <= pos[r]  <=>  pos[r] - k0 - j > -1
    const __m256i reach = _mm256_sub_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.pos.data() + r)),
        _mm256_set1_epi32(static_cast<int32_t>(k0)));
    const auto visible = [&](int64_t j) {
      return _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(reach, _mm256_set1_epi32(static_cast<int32_t>(j - 1))));
    };
    __m256 tile_max = neg_inf;
    for (int64_t j = 0; j < n; ++j)
      tile_max = _mm256_max_ps(
          tile_max, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(st + j * rp + r), visible(j)));
    const __m256 old_max = _mm256_loadu_ps(w.max.data() + r);
    const __m256 m = _mm256_max_ps(old_max, tile_max);
    // 0 on the first tile (old max -inf); every row sees key 0, so m is finite from then on.
    const __m256 corr = _mm256_and_ps(fdpd::exp256(_mm256_sub_ps(old_max, m)),
                                      _mm256_cmp_ps(old_max, neg_inf, _CMP_NEQ_OQ));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_padded; ++j) {
      float* s = st + j * rp + r;
      const __m256 mask = j < n ? visible(j) : _mm256_setzero_ps();
      const __m256 p = _mm256_and_ps(fdpd::exp256(_mm256_sub_ps(_mm256_loadu_ps(s), m)), mask);
      _mm256_storeu_ps(s, p);
      sum = _mm256_add_ps(sum, p);
    }
    _mm256_storeu_ps(w.sum.data() + r,
                     _mm256_fmadd_ps(_mm256_loadu_ps(w.sum.data() + r), corr, sum));
    _mm256_storeu_ps(w.max.data() + r, m);
    _mm256_storeu_ps(w.correction.data() + r, corr);
  }
#else
  for (int64_t r = 0; r < rp; ++r) {
    const auto visible = [&](int64_t j) { return j < n && k0 + j <= w.pos[r]; };
    float m = w.max[r];
    for (int64_t j = 0; j < n; ++j)
      if (visible(j)) m = std::max(m, st[j * rp + r]);
    const float corr = std::isinf(w.max[r]) ? 0.f : std::exp(w.max[r] - m);
    float sum = 0.f;
    for (int64_t j = 0; j < n_padded; ++j) {
      float& s = st[j * rp + r];
      s = visible(j) ? std::exp(s - m) : 0.f;
      sum += s;
    }
    w.sum[r] = w.sum[r] * corr + sum;
    w.max[r] = m;
    w.correction[r] = corr;
  }
#endif
}

inline void scale_row(float* x, float a, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(av, _mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] *= a;
}

template <typename T>
void run_task(const Task& task, const T* q, const T* cache, const int64_t* spans,
              const int64_t* table, T* out, const Geometry& g, float scale, Scratch& w) {
  const int64_t first_token = spans[task.span * 3], num_new = spans[task.span * 3 + 1];
  const int64_t start = spans[task.span * 3 + 2];
  const int64_t* blocks = table + task.span * g.width;
  const int64_t tokens = std::min(g.tile_tokens, num_new - task.first);
  const int64_t rows = tokens * g.group, rp = round_up(rows, kRowAlign);
  const int64_t D = g.head_dim, Dp = g.dim_padded;
  const int64_t first_pos = start + task.first;          // the tile's first query position

  // Q^T: column r = (token r / group, head task.head * group + r % group), scaled; padding
  // columns are zero and sit at the tile's last position (finite, never read back).
  for (int64_t r = 0; r < rp; ++r) {
    const bool real = r < rows;
    w.pos[r] = static_cast<int32_t>(first_pos + (real ? r / g.group : tokens - 1));
    const T* src = q + ((first_token + task.first + r / g.group) * g.q_heads +
                        task.head * g.group + r % g.group) * D;
    for (int64_t d = 0; d < D; ++d) w.qt[d * rp + r] = real ? to_float(src[d]) * scale : 0.f;
  }
  std::fill(w.o.begin(), w.o.begin() + rp * Dp, 0.f);
  std::fill(w.max.begin(), w.max.begin() + rp, -std::numeric_limits<float>::infinity());
  std::fill(w.sum.begin(), w.sum.begin() + rp, 0.f);

  const int64_t visible = first_pos + tokens;            // keys [0, visible) matter to the tile
  for (int64_t k0 = 0; k0 < visible; k0 += kKeys) {
    const int64_t n = std::min(kKeys, visible - k0), n_padded = round_up(n, kRows);
    locate_keys(cache, blocks, g, task.head, k0, n, n_padded, w);
    // S^T [n_padded x rp] = K [n_padded x D] . Q^T [D x rp]
    gemm<false>([&](int64_t i) { return RowsByPointer{w.keys.data() + i}; },
                [&](int64_t j) { return Strided{w.qt.data() + j, rp}; },
                w.st.data(), rp, n_padded, rp, D);
    softmax_tile(w, k0, n, n_padded, rp);
    for (int64_t r = 0; r < rp; ++r)
      if (w.correction[r] != 1.f) scale_row(w.o.data() + r * Dp, w.correction[r], Dp);
    // O [rp x Dp] += P [rp x n_padded] . V [n_padded x Dp], P[r][j] = S^T[j][r]
    gemm<true>([&](int64_t i) { return Transposed{w.st.data() + i, rp}; },
               [&](int64_t j) { return GatheredRows{w.values.data(), j}; },
               w.o.data(), Dp, rp, Dp, n_padded);
  }

  for (int64_t r = 0; r < rows; ++r) {
    T* dst = out + ((first_token + task.first + r / g.group) * g.q_heads + task.head * g.group +
                    r % g.group) * D;
    const float inv = 1.f / w.sum[r];
    const float* o = w.o.data() + r * Dp;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
  }
}

template <typename T>
void prefill_kernel(const T* q, const T* cache, const int64_t* spans, int64_t num_spans,
                    const int64_t* table, T* out, const Geometry& g, float scale) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < num_spans; ++s)
    for (int64_t h = 0; h < g.kv_heads; ++h)
      for (int64_t first = 0; first < spans[s * 3 + 1]; first += g.tile_tokens)
        tasks.push_back({s, h, first});
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(g);
    for (int64_t i = begin; i < end; ++i)
      run_task(tasks[i], q, cache, spans, table, out, g, scale, scratch);
  });
}

// out[T, Hq, D] = causal attention of each span's new tokens over its cached context.
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor layer_cache,
                             torch::Tensor spans, torch::Tensor block_table, double scale) {
  const int64_t q_heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = layer_cache.size(3), block_size = layer_cache.size(2);
  TORCH_CHECK(q.scalar_type() == layer_cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "paged_prefill_attention: q, out and the cache differ in dtype");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes() &&
              layer_cache.stride(4) == 1 && layer_cache.size(4) == head_dim &&
              q_heads % kv_heads == 0 && spans.scalar_type() == at::kLong &&
              spans.is_contiguous() && spans.dim() == 2 && spans.size(1) == 3 &&
              block_table.scalar_type() == at::kLong && block_table.is_contiguous() &&
              block_table.dim() == 2 && block_table.size(0) == spans.size(0),
              "paged_prefill_attention: layout contract violated (see the file's header)");
  const int64_t group = q_heads / kv_heads;
  Geometry g{q_heads, kv_heads, group, head_dim, round_up(head_dim, 8), block_size,
             block_table.size(1), layer_cache.stride(0), layer_cache.stride(1),
             layer_cache.stride(2), layer_cache.stride(3),
             std::max<int64_t>(1, kTileRows / group),
             layer_cache.scalar_type() != at::kFloat || head_dim % 8 != 0};
  const int64_t* sp = spans.data_ptr<int64_t>();
  for (int64_t s = 0; s < spans.size(0); ++s)
    TORCH_CHECK(sp[s * 3 + 1] >= 1 && sp[s * 3 + 2] >= 0 && sp[s * 3] >= 0 &&
                sp[s * 3] + sp[s * 3 + 1] <= q.size(0) &&
                sp[s * 3 + 2] + sp[s * 3 + 1] <= g.width * block_size,
                "paged_prefill_attention: span ", s, " does not fit the batch or its blocks");
  fdpd::check_block_ids(block_table, layer_cache.size(0), "paged_prefill_attention");
  fdpd::dispatch(layer_cache.scalar_type(), "paged_prefill_attention", [&](auto tag) {
    using T = decltype(tag);
    prefill_kernel<T>(q.data_ptr<T>(), layer_cache.data_ptr<T>(), sp, spans.size(0),
                      block_table.data_ptr<int64_t>(), out.data_ptr<T>(), g,
                      static_cast<float>(scale));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fdpd, m) {
  m.def("paged_prefill_attention(Tensor(a!) out, Tensor q, Tensor layer_cache, Tensor spans, "
        "Tensor block_table, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(fdpd, CPU, m) {
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}
