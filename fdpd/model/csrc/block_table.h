// Checks of the block tables the attention kernels read through: a bad block id would read
// outside the KV cache, so every entry (padding included, which is block 0) must name a block.
#pragma once

#include <torch/extension.h>

namespace fdpd {

inline void check_block_ids(const torch::Tensor& table, int64_t num_blocks, const char* op) {
  const int64_t* ids = table.data_ptr<int64_t>();
  for (int64_t i = 0, n = table.numel(); i < n; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_blocks, op, ": block id ", ids[i],
                " outside the cache's ", num_blocks, " blocks");
}

}  // namespace fdpd
