// The linear layers' GEMM, y[M, N] = x[M, K] W[N, K]^T (+ bias), on weights packed once into
// 16-column panels: W_packed[N / 16][K][16] (the last panel zero padded).
//
// Why not oneDNN: in a decoder step every layer's weights arrive cold (the model is larger than
// the caches), and oneDNN's packed fp32 GEMM on this AVX2 CPU ran at ~50 GFLOP/s for a decode
// step (M = 32) and ~70 for a 512-token prefill chunk, against ~85-90 with the weights hot. This
// GEMM is the textbook blocked one (GotoBLAS's loop order) with the weight stream in mind, on
// the micro-kernel of micro_kernel.h:
//
//   for each block of up to kBlockRows rows of x          (x block packed 6 rows per k: L2)
//     for each 16-column panel of W (parallel)              (the panel, K x 64 B, streams once
//       for each 6-row strip of the block                    per row block; the first strip
//         C[6 x 16] = strip . panel   (12 accumulators)      prefetches the next panel)
//
// Arithmetic: float32 products accumulated in float32 along k in order (one FMA chain per
// output), the same contract as any BLAS sgemm; results differ from oneDNN's by summation order
// only. x is float32 and contiguous; M, N, K >= 1.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "micro_kernel.h"

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kRows = fdpd::kMicroRows;
constexpr int64_t kCols = 16;         // panel width: two 8-float vectors
constexpr int64_t kBlockRows = 96;    // rows of x packed at once (K = 1536: 576 KiB, in L2)

// C[live x 16] = A strip (k-major, 6 floats per k) . B panel (16 floats per k) (+ bias), the
// next panel prefetched when given. Rows past `live` are padding of the strip: not computed.
template <int kLive>
void strip_kernel(const float* a, const float* b, int64_t K, float* c, int64_t ldc,
                  const float* bias, const float* prefetch) {
  fdpd::micro_kernel<kCols, false, kLive>(fdpd::Transposed{a, kRows}, fdpd::Strided{b, kCols},
                                          c, ldc, K, bias, prefetch);
}

using MicroKernel = void (*)(const float*, const float*, int64_t, float*, int64_t, const float*,
                             const float*);
constexpr MicroKernel kByRows[kRows + 1] = {nullptr,         strip_kernel<1>, strip_kernel<2>,
                                            strip_kernel<3>, strip_kernel<4>, strip_kernel<5>,
                                            strip_kernel<6>};

// x rows [m0, m0 + rows) into strips of 6, k-major: strip s holds x[m0 + 6s + i][k] at
// (s * K + k) * 6 + i, zero past the last row.
void pack_rows(const float* x, int64_t K, int64_t m0, int64_t rows, float* out) {
  const int64_t strips = (rows + kRows - 1) / kRows;
  at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* dst = out + s * K * kRows;
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t r = s * kRows + i;
        if (r >= rows) {
          for (int64_t k = 0; k < K; ++k) dst[k * kRows + i] = 0.f;
          continue;
        }
        const float* src = x + (m0 + r) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * kRows + i] = src[k];
      }
    }
  });
}

// W[N, K] (float32, any strides) -> [ceil(N / 16), K, 16], zero padded.
torch::Tensor pack_linear_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
              "pack_linear_weight: a float32 [N, K] weight");
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + kCols - 1) / kCols;
  auto padded = torch::zeros({panels * kCols, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, kCols, K}).transpose(1, 2).contiguous();
}

// y[M, N] = x[M, K] . W^T (+ bias), W given packed by pack_linear_weight.
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  packed.dim() == 3 && packed.scalar_type() == at::kFloat &&
                  packed.is_contiguous() && packed.size(2) == kCols &&
                  packed.size(1) == x.size(1) && packed.size(0) * kCols >= N &&
                  (packed.size(0) - 1) * kCols < N,
              "packed_linear: x [M, K] float32 contiguous and a weight packed for K = ",
              x.size(1));
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "packed_linear: bias must be float32 [N]");
    b = bias->data_ptr<float>();
  }
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> strips(((std::min(M, kBlockRows) + kRows - 1) / kRows) * kRows * K);
  for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, M - m0), count = (rows + kRows - 1) / kRows;
    pack_rows(xp, K, m0, rows, strips.data());
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      float tail[kRows * kCols];                     // the last panel's columns past N
      for (int64_t p = begin; p < end; ++p) {
        const float* panel = wp + p * K * kCols;
        const float* next = p + 1 < end ? panel + K * kCols : nullptr;
        const bool full = (p + 1) * kCols <= N;
        float bias_tail[kCols] = {};
        const float* bp = b ? b + p * kCols : nullptr;
        if (b && !full) {
          std::copy(b + p * kCols, b + N, bias_tail);
          bp = bias_tail;
        }
        for (int64_t s = 0; s < count; ++s) {
          const int64_t live = std::min(kRows, rows - s * kRows);
          const float* pf = s == 0 ? next : nullptr;
          float* out = yp + (m0 + s * kRows) * N + p * kCols;
          if (full) {
            kByRows[live](strips.data() + s * K * kRows, panel, K, out, N, bp, pf);
            continue;
          }
          kByRows[live](strips.data() + s * K * kRows, panel, K, tail, kCols, bp, pf);
          for (int64_t i = 0; i < live; ++i)
            std::copy(tail + i * kCols, tail + i * kCols + (N - p * kCols), out + i * N);
        }
      }
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fdpd, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(fdpd, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
}
