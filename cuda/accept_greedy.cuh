// Launcher interface of cuda/accept_greedy.cu (raw pointers only; contract in cpp/accept_greedy.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

struct AcceptGreedyArgs {
  const int64_t* tokens;      // [batch, nodes]
  const int64_t* parents;     // [batch, nodes]
  const int64_t* target_ids;  // [batch, nodes]
  const int64_t* num_nodes;   // [batch]
  int64_t* accepted;          // [batch, max_accept]
  int64_t* accept_len;        // [batch]
  int64_t* bonus;             // [batch]
  int64_t batch, nodes, max_accept;
};

// Largest tree one launch handles (its per-node scratch lives in shared memory).
constexpr int64_t kAcceptMaxNodes = 8192;

cudaError_t accept_greedy(const AcceptGreedyArgs& args, cudaStream_t stream);

}  // namespace jetspec::cuda
