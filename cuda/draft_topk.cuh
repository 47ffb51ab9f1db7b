// Launcher interface of cuda/draft_topk.cu (raw pointers only; contract in cpp/draft_topk.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

enum class DraftTopkDtype { kBFloat16, kFloat16, kFloat32 };

// The widest K the kernels keep per row.
constexpr int kDraftTopkMaxK = 32;

struct DraftTopkArgs {
  DraftTopkDtype dtype;      // of hidden and weight
  const void* hidden;        // [rows, hidden_size]; rows 16-byte aligned
  int64_t hidden_stride;     // elements between rows
  const void* weight;        // [vocab, hidden_size]; rows 16-byte aligned
  int64_t weight_stride;     // elements between rows
  int64_t rows, vocab, hidden_size;  // hidden_size * element size: a multiple of 16 bytes, > 0
  int k;                     // 1 <= k <= min(vocab, kDraftTopkMaxK)
  float temperature;         // > 0
  float* logprobs;           // out: [rows, k], contiguous
  int64_t* ids;              // out: [rows, k], contiguous
};

// Bytes of device workspace that draft_topk needs for these arguments.
cudaError_t draft_topk_workspace(const DraftTopkArgs& args, int64_t* bytes);

// Enqueues the op on stream: no host synchronisation, no allocation (graph-capturable).
cudaError_t draft_topk(const DraftTopkArgs& args, void* workspace, cudaStream_t stream);

}  // namespace jetspec::cuda
