// Launcher interface of cuda/build_tree.cu (raw pointers only; contract in cpp/build_tree.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

// Largest trees one launch builds: the tree and its frontier live in one block's shared memory.
constexpr int64_t kTreeMaxDepth = 32;   // D
constexpr int64_t kTreeMaxWidth = 32;   // K
constexpr int64_t kTreeMaxNodes = 1024; // N
// Trees of at least this many expansions beyond the root (and K >= 2) take the threshold path; below
// it the pop path's short chain beats the threshold path's fixed cost (both paths forced and timed:
// bench/results/h100/build_tree_threshold/paths_forced.txt).
constexpr int kThresholdMinExpansions = 40;

// Every tensor is addressed through its element strides, so that sliced or transposed
// inputs and outputs need no copy (and no extra launch).
struct BuildTreeArgs {
  const float* logprobs;  // [batch, depth, width]
  int64_t logprobs_stride[3];
  const int64_t* ids;     // [batch, depth, width]
  int64_t ids_stride[3];
  const int64_t* root_token;  // [batch]
  int64_t root_stride;
  const int64_t* base_pos;    // [batch]
  int64_t base_stride;
  int64_t* tokens;     // [batch, nodes]
  int64_t tokens_stride[2];
  int64_t* parents;    // [batch, nodes]
  int64_t parents_stride[2];
  int64_t* depths;     // [batch, nodes]
  int64_t depths_stride[2];
  int64_t* positions;  // [batch, nodes]
  int64_t positions_stride[2];
  int32_t* ancestors;  // [batch, nodes, words]
  int64_t ancestors_stride[3];
  int64_t* num_nodes;  // [batch]
  int64_t num_nodes_stride;
  int64_t batch, depth, width, nodes;
};

cudaError_t build_tree(const BuildTreeArgs& args, cudaStream_t stream);

}  // namespace jetspec::cuda
