// The size limits of the ops' contracts that hold on every device. The CUDA-only limits live with
// their kernels (cuda/<op>.cuh). module.cpp exports both to Python as jetspec._C.LIMITS, so that
// jetspec.ops.supports() reads them instead of a copy.
#pragma once
#include <cstdint>

namespace jetspec::limits {

// tree_attention: nodes per tree (the packed ancestor rows and the kernels' tiles are sized for it)
constexpr int64_t kTreeAttentionMaxNodes = 1024;
// tree_attention: the head dims its kernels are instantiated for
constexpr int64_t kTreeAttentionHeadDims[] = {64, 128};

}  // namespace jetspec::limits
