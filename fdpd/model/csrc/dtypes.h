// The activation and KV-cache dtypes fdpd's kernels run on (float32, bfloat16, float16): the
// dispatch from a tensor's dtype to a kernel instantiated for it, and the conversion every
// kernel reads through (arithmetic is float32 whatever the storage dtype).
#pragma once

#include <torch/extension.h>

namespace fdpd {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// run(T{}) with T the C++ type of `dtype`; an error naming `name` for any other dtype.
template <typename F>
void dispatch(at::ScalarType dtype, const char* name, F&& run) {
  switch (dtype) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

}  // namespace fdpd
