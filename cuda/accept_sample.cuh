// Launcher interface of cuda/accept_sample.cu (raw pointers only; contract in cpp/accept_sample.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

enum class SampleDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct AcceptSampleArgs {
  const int64_t* tokens;     // [batch, nodes]
  const int64_t* parents;    // [batch, nodes]
  const void* logits;        // [batch, nodes, vocab], vocab dense
  int64_t logits_stride0;    // elements between batch rows
  int64_t logits_stride1;    // elements between nodes
  SampleDtype dtype;
  const int64_t* num_nodes;  // [batch]
  const float* temperature;  // [batch]
  const int64_t* top_k;      // [batch]
  const float* top_p;        // [batch]
  const int64_t* seed;       // [1]
  int64_t* offset;           // [1], advanced by one
  int64_t* accepted;         // [batch, max_accept]
  int64_t* accept_len;       // [batch]
  int64_t* bonus;            // [batch]
  int64_t batch, nodes, vocab, max_accept;
};

// A batch row is sampled by a cluster of up to kSampleMaxCluster CTAs (16 where the chip can schedule such a
// cluster, else 8, the portable size), each owning a slice of the vocabulary of at most kSampleMaxSlice
// tokens (its probabilities live in shared memory).
constexpr int64_t kSampleMaxSlice = 40960;
constexpr int64_t kSamplePortableCluster = 8;
constexpr int64_t kSampleMaxCluster = 16;
constexpr int64_t kSampleMaxVocab = kSampleMaxSlice * kSamplePortableCluster;

cudaError_t accept_sample(const AcceptSampleArgs& args, cudaStream_t stream);

}  // namespace jetspec::cuda
