// Launcher interface of cuda/tree_attention.cu (raw pointers only; contract in cpp/tree_attention.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

// Strides are in elements. Every pointer is 16-byte aligned and every stride but the (unit) last one
// is a multiple of 8 elements: the glue checks both, the kernels move 16-byte vectors.
struct TreeAttentionArgs {
  const void* query;  // [batch, nodes, q_heads, head_dim]
  int64_t q_batch_stride, q_node_stride, q_head_stride;
  const void* key;  // [batch, slots, kv_heads, head_dim]
  int64_t k_batch_stride, k_slot_stride, k_head_stride;
  const void* value;  // [batch, slots, kv_heads, head_dim]
  int64_t v_batch_stride, v_slot_stride, v_head_stride;
  void* out;  // [batch, nodes, q_heads, head_dim]
  int64_t o_batch_stride, o_node_stride, o_head_stride;
  const int64_t* prefix_len;  // [batch], on the device
  const int32_t* ancestors;   // [batch, nodes, words], contiguous
  int batch, nodes, words, q_heads, kv_heads, head_dim;
  int64_t slots;
  int64_t max_prefix;  // host bound of prefix_len: sizes the split count only
  float scale;
  bool bf16;  // else float16
};

// How a call is cut into blocks; chosen on the host from shapes alone (no device data).
struct TreeAttentionPlan {
  int tile;       // which block shape (rows of query heads x nodes per block); opaque to the caller
  int row_tiles;  // blocks along the (query head in group, node) rows of one kv head
  int splits;     // blocks along the keys; > 1 needs the partial buffers below
  bool tensor_copies;  // the device runs sm_90a code: the copy engine (TMA) fills the warpgroup blocks' K/V tiles
};

cudaError_t tree_attention_plan(const TreeAttentionArgs& args, TreeAttentionPlan* plan);

// With plan.splits > 1: partial_out holds splits * batch * nodes * q_heads * head_dim floats and
// partial_lse splits * batch * nodes * q_heads floats (both unused, may be null, when splits == 1).
cudaError_t tree_attention(const TreeAttentionArgs& args, const TreeAttentionPlan& plan, float* partial_out,
                           float* partial_lse, cudaStream_t stream);

}  // namespace jetspec::cuda
