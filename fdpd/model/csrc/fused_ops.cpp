// Fused elementwise steps of a decoder layer, each one pass over its data instead of the 4-14
// small torch ops (and as many temporaries) they replace:
//
// - rope_and_write_kv: rotate q and k by their positions (rotate-half RoPE, the layout of
//   fdpd.model.llama.RotaryEmbedding's cos/sin tables) straight out of the fused qkv projection,
//   and store the rotated k and the v of every new token in its cache slot;
// - silu_and_mul: SiLU(gate) * up from the fused gate_up projection;
// - rms_norm: one pass for the sum of squares, one to scale (torch runs ~6 ops on CPU).
//
// Arithmetic in float32 with one rounding to the activation dtype at the end (the torch path
// rounds after every op in bf16; in float32 the two agree to the last bit or two).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "dtypes.h"
#include "vec.h"

namespace {

using fdpd::dispatch;

template <typename T>
void rope_kernel(const T* qkv, const int64_t* positions, const float* cos, const float* sin,
                 T* cache, const int64_t* slot_blocks, const int64_t* slot_offsets, T* q_out,
                 T* k_out, int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                 int64_t s_block, int64_t s_kv, int64_t s_tok, int64_t s_head) {
  const int64_t width = (q_heads + 2 * kv_heads) * head_dim, half = head_dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + positions[t] * head_dim;
      const float* s = sin + positions[t] * head_dim;
      T* slot = cache + slot_blocks[t] * s_block + slot_offsets[t] * s_tok;
      for (int64_t j = 0; j < q_heads + kv_heads; ++j) {
        const T* x = qkv + t * width + j * head_dim;
        T* dst = j < q_heads ? q_out + (t * q_heads + j) * head_dim
                             : k_out + (t * kv_heads + j - q_heads) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          dst[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          dst[i + half] = static_cast<T>(x2 * c[i + half] + x1 * s[i + half]);
        }
        if (j >= q_heads) {
          T* kslot = slot + (j - q_heads) * s_head;
          for (int64_t i = 0; i < head_dim; ++i) kslot[i] = dst[i];
        }
      }
      const T* v = qkv + t * width + (q_heads + kv_heads) * head_dim;
      for (int64_t h = 0; h < kv_heads; ++h)
        for (int64_t i = 0; i < head_dim; ++i) slot[s_kv + h * s_head + i] = v[h * head_dim + i];
    }
  });
}

template <typename T>
void silu_mul_kernel(const T* gate_up, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      int64_t i = 0;
      if constexpr (std::is_same_v<T, float>) {
#ifdef __AVX2__
        const __m256 one = _mm256_set1_ps(1.f);
        for (; i + 8 <= inter; i += 8) {
          const __m256 gv = _mm256_loadu_ps(g + i);
          const __m256 e = fdpd::exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
          _mm256_storeu_ps(o + i, _mm256_div_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(u + i)),
                                                _mm256_add_ps(one, e)));
        }
#endif
      }
      for (; i < inter; ++i) {
        const float gv = static_cast<float>(g[i]);
        o[i] = static_cast<T>(gv * static_cast<float>(u[i]) / (1.f + std::exp(-gv)));
      }
    }
  });
}

// out = weight * (x / sqrt(mean(x^2) + eps)), per row, float32 inside (HF's order: normalise
// in float32, round to the activation dtype, then scale).
template <typename T>
void rms_norm_kernel(const T* x, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      T* o = out + r * n;
      float ss = 0.f;
      int64_t i = 0;
      if constexpr (std::is_same_v<T, float>) {
#ifdef __AVX2__
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (; i + 16 <= n; i += 16) {
          const __m256 v0 = _mm256_loadu_ps(xr + i), v1 = _mm256_loadu_ps(xr + i + 8);
          a0 = _mm256_fmadd_ps(v0, v0, a0);
          a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        ss = fdpd::hsum(_mm256_add_ps(a0, a1));
#endif
      }
      for (; i < n; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      i = 0;
      if constexpr (std::is_same_v<T, float>) {
#ifdef __AVX2__
        const __m256 iv = _mm256_set1_ps(inv);
        for (; i + 8 <= n; i += 8)
          _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i),
                                                _mm256_mul_ps(_mm256_loadu_ps(xr + i), iv)));
#endif
      }
      for (; i < n; ++i)
        o[i] = static_cast<T>(static_cast<float>(weight[i]) *
                              static_cast<float>(static_cast<T>(static_cast<float>(xr[i]) * inv)));
    }
  });
}

void rope_and_write_kv(torch::Tensor q_out, torch::Tensor k_out, torch::Tensor qkv,
                       torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                       torch::Tensor layer_cache, torch::Tensor slot_blocks,
                       torch::Tensor slot_offsets) {
  const int64_t q_heads = q_out.size(1), kv_heads = k_out.size(1), head_dim = q_out.size(2);
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (q_heads + 2 * kv_heads) * head_dim,
              "rope_and_write_kv: qkv must be contiguous [T, (Hq + 2 Hkv) * D]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == head_dim,
              "rope_and_write_kv: cos/sin must be contiguous float32 [positions, D]");
  TORCH_CHECK(layer_cache.scalar_type() == qkv.scalar_type() && layer_cache.stride(4) == 1 &&
              head_dim % 2 == 0, "rope_and_write_kv: cache dtype/layout");
  dispatch(qkv.scalar_type(), "rope_and_write_kv", [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T>(qkv.data_ptr<T>(), positions.data_ptr<int64_t>(), cos.data_ptr<float>(),
                   sin.data_ptr<float>(), layer_cache.data_ptr<T>(),
                   slot_blocks.data_ptr<int64_t>(), slot_offsets.data_ptr<int64_t>(),
                   q_out.data_ptr<T>(), k_out.data_ptr<T>(), qkv.size(0), q_heads, kv_heads,
                   head_dim, layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2),
                   layer_cache.stride(3));
  });
}

void silu_and_mul(torch::Tensor out, torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(1) == 2 * out.size(1),
              "silu_and_mul: gate_up must be contiguous [T, 2 I]");
  dispatch(gate_up.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_mul_kernel<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), gate_up.size(0),
                       out.size(1));
  });
}

void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous() &&
              weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(-1),
              "rms_norm: contiguous x [rows, n] and weight [n] of one dtype");
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T>(x.data_ptr<T>(), weight.data_ptr<T>(), out.data_ptr<T>(),
                       x.numel() / x.size(-1), x.size(-1), static_cast<float>(eps));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fdpd, m) {
  m.def("rope_and_write_kv(Tensor(a!) q_out, Tensor(b!) k_out, Tensor qkv, Tensor positions, "
        "Tensor cos, Tensor sin, Tensor(c!) layer_cache, Tensor slot_blocks, "
        "Tensor slot_offsets) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(fdpd, CPU, m) {
  m.impl("rope_and_write_kv", &rope_and_write_kv);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rms_norm", &rms_norm);
}
