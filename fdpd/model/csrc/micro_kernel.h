// The register-blocked float32 micro-kernel both of fdpd's GEMMs run on: the linear layers'
// (packed_linear.cpp) and attention's S = QK^T and PV products (prefill_attention.cpp).
//
// C[live x W] (+)= A[6 x K] . B[K x W] (+ bias), W = 16 or 8 columns: per k, W/8 vector loads
// of B's row k, one broadcast of A per row and 2 FMAs per row, into 12 accumulators. The
// operands are addressed through small accessors (each caller keeps its own layout, nothing is
// copied to fit the kernel): A's element (i, k) is broadcast, B's row k is loaded.
#pragma once

#include <cstdint>

#include "vec.h"

namespace fdpd {

constexpr int64_t kMicroRows = 6;

// A accessors: element (i, k).
struct RowsByPointer {                 // A[i][k] = rows[i][k]
  const float* const* rows;
  const float* at(int64_t i, int64_t k) const { return rows[i] + k; }
};
struct Transposed {                    // A[i][k] = base[k * ld + i] (k-major strips, S^T)
  const float* base;
  int64_t ld;
  const float* at(int64_t i, int64_t k) const { return base + k * ld + i; }
};
// B accessors: row k (W consecutive floats).
struct Strided {                       // B[k] = base + k * ld
  const float* base;
  int64_t ld;
  const float* row(int64_t k) const { return base + k * ld; }
};
struct GatheredRows {                  // B[k] = rows[k] + col
  const float* const* rows;
  int64_t col;
  const float* row(int64_t k) const { return rows[k] + col; }
};

// kLive (1..6) rows of C are computed and stored (with kAccumulate, added to what C holds);
// `bias` (W floats) is added on store; `prefetch`, when given, is touched at W floats per k
// (the caller's next B panel). The accumulators are named variables: held in an array, gcc
// spilled them to the stack on every k (half the speed).
template <int64_t W, bool kAccumulate, int kLive, typename OpA, typename OpB>
inline void micro_kernel(const OpA& A, const OpB& B, float* __restrict C, int64_t ldc, int64_t K,
                         const float* bias = nullptr, const float* prefetch = nullptr) {
  static_assert(W == 16 || W == 8, "micro_kernel: 8 or 16 columns");
  static_assert(kLive >= 1 && kLive <= kMicroRows, "micro_kernel: 1..6 rows");
#ifdef __AVX2__
  constexpr bool kTwo = W == 16;
#define FDPD_ROW_INIT(i)                                                                   \
  __m256 c##i##0 = i < kLive && kAccumulate ? _mm256_loadu_ps(C + i * ldc)                 \
                                            : _mm256_setzero_ps();                         \
  __m256 c##i##1 = i < kLive && kTwo && kAccumulate ? _mm256_loadu_ps(C + i * ldc + 8)     \
                                                    : _mm256_setzero_ps();
#define FDPD_ROW_FMA(i)                                    \
  if (i < kLive) {                                         \
    const __m256 a = _mm256_broadcast_ss(A.at(i, k));      \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);             \
    if (kTwo) c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);   \
  }
#define FDPD_ROW_STORE(i)                                                            \
  if (i < kLive) {                                                                   \
    _mm256_storeu_ps(C + i * ldc, _mm256_add_ps(c##i##0, z0));                       \
    if (kTwo) _mm256_storeu_ps(C + i * ldc + 8, _mm256_add_ps(c##i##1, z1));         \
  }
  FDPD_ROW_INIT(0) FDPD_ROW_INIT(1) FDPD_ROW_INIT(2) FDPD_ROW_INIT(3) FDPD_ROW_INIT(4)
  FDPD_ROW_INIT(5)
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B.row(k);
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = kTwo ? _mm256_loadu_ps(b + 8) : b0;
    if (prefetch != nullptr) __builtin_prefetch(prefetch + k * W, 0, 3);
    FDPD_ROW_FMA(0) FDPD_ROW_FMA(1) FDPD_ROW_FMA(2) FDPD_ROW_FMA(3) FDPD_ROW_FMA(4)
    FDPD_ROW_FMA(5)
  }
  const __m256 z0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 z1 = bias && kTwo ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  FDPD_ROW_STORE(0) FDPD_ROW_STORE(1) FDPD_ROW_STORE(2) FDPD_ROW_STORE(3) FDPD_ROW_STORE(4)
  FDPD_ROW_STORE(5)
#undef FDPD_ROW_INIT
#undef FDPD_ROW_FMA
#undef FDPD_ROW_STORE
#else
  (void)prefetch;
  for (int64_t i = 0; i < kLive; ++i)
    for (int64_t j = 0; j < W; ++j) {
      float s = kAccumulate ? C[i * ldc + j] : 0.f;
      for (int64_t k = 0; k < K; ++k) s += *A.at(i, k) * B.row(k)[j];
      C[i * ldc + j] = s + (bias ? bias[j] : 0.f);
    }
#endif
}

}  // namespace fdpd
