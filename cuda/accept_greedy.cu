// accept_greedy: the longest root path whose every token equals the target's
// prediction at its parent, plus the target's prediction at the path's end.
//
// One block per sequence. Every node checks its own match in parallel and
// registers itself as its parent's matching child (atomicMax: when siblings
// repeat a token the last one wins, as in a token -> child map filled in node
// order); one thread then follows those links from the root. The walk is as
// long as the accepted path, not the tree.
#include "accept_greedy.cuh"

namespace jetspec::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) accept_greedy_kernel(AcceptGreedyArgs a) {
  extern __shared__ int matching_child[];
  __shared__ int path_len;
  const int64_t b = blockIdx.x;
  const int64_t* tokens = a.tokens + b * a.nodes;
  const int64_t* parents = a.parents + b * a.nodes;
  const int64_t* target = a.target_ids + b * a.nodes;
  int64_t* accepted = a.accepted + b * a.max_accept;

  int64_t n = a.num_nodes[b];
  n = n < 1 ? 1 : (n > a.nodes ? a.nodes : n);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) matching_child[i] = -1;
  __syncthreads();
  for (int64_t i = 1 + threadIdx.x; i < n; i += kThreads) {
    const int64_t p = parents[i];
    // A parent outside [0, i) is not a tree edge: never matched, never dereferenced out of bounds.
    if (p >= 0 && p < i && tokens[i] == target[p]) atomicMax(&matching_child[p], static_cast<int>(i));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int cur = 0, len = 1;
    accepted[0] = 0;
    while (len < a.max_accept && matching_child[cur] >= 0) {
      cur = matching_child[cur];
      accepted[len++] = cur;
    }
    path_len = len;
    a.accept_len[b] = len;
    a.bonus[b] = target[cur];
  }
  __syncthreads();
  for (int64_t j = path_len + threadIdx.x; j < a.max_accept; j += kThreads) accepted[j] = -1;
}

}  // namespace

cudaError_t accept_greedy(const AcceptGreedyArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (a.nodes < 1 || a.nodes > kAcceptMaxNodes || a.max_accept < 1) return cudaErrorInvalidValue;
  if (a.batch > 0x7fffffff) return cudaErrorInvalidConfiguration;  // one block per tree
  const size_t smem = static_cast<size_t>(a.nodes) * sizeof(int);
  accept_greedy_kernel<<<static_cast<unsigned>(a.batch), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jetspec::cuda
