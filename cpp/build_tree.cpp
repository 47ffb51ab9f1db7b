// jetspec::build_tree — best-first token tree from per-depth top-K draft candidates.
//
//   build_tree(Tensor topk_logprobs, Tensor topk_ids, Tensor root_token, Tensor base_pos,
//              Tensor(a!) tokens, Tensor(b!) parents, Tensor(c!) depths, Tensor(d!) positions,
//              Tensor(e!) ancestors, Tensor(f!) num_nodes) -> ()
//
//   topk_logprobs [B, D, K] float32  full-vocabulary log-probs of each depth's top-K, descending;
//                                    row d is the distribution of tree depth d + 1.
//   topk_ids      [B, D, K] int64    their token ids.
//   root_token    [B] int64          the anchor (tree node 0).
//   base_pos      [B] int64          position of the root (the committed prefix length).
//   tokens        [B, N] int64       out: node tokens; N is the budget, root included.
//   parents       [B, N] int64       out: parent node (-1 for the root).
//   depths        [B, N] int64       out: node depth (root 0).
//   positions     [B, N] int64       out: base_pos + depth.
//   ancestors     [B, N, W] int32    out: W = ceil(N / 32); bit (j % 32) of word j / 32 of row i is set
//                                    iff node j is node i or one of its ancestors.
//   num_nodes     [B] int64          out: nodes built (<= N; fewer when D and K cannot fill the budget).
//
//   Algorithm (node-for-node the published reference's accum_logp builder): node scores are cumulative
//   log-probs; a max-heap pops the best node, ties going to the earlier-created node; a popped node at
//   depth d < D gets min(K, N - count) children at once, in candidate-rank order, child r scoring
//   score(parent) + topk_logprobs[d][r]; stop when N nodes exist or the heap is empty. Scores are
//   float64, summed in that order from the root's 0.0, so ties are exact. Node index = creation order,
//   so parents[i] < i. Padding nodes (i >= num_nodes) are token 0, parent -1, depth 0, position
//   base_pos, and see only themselves. D = 0 gives the root alone.
//
// The CPU kernel is the Python reference (jetspec.tree), registered from Python; the schema lives here
// so that every backend shares it. The CUDA kernel (cuda/build_tree.cu) builds the same trees, bit for
// bit, for D <= 32, K <= 32 and N <= 1024 (beyond: ValueError), one launch with one block per tree, no
// host sync. It relies on what the contract says of topk_logprobs: rows descending, log-probs (no NaN,
// no +inf); on rows that are not, the two kernels may build different trees.
#include <torch/library.h>

#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "build_tree.cuh"
#endif

namespace jetspec {
namespace {

#ifdef JETSPEC_WITH_CUDA
constexpr const char* kOp = "build_tree";

void check_args(const at::Tensor& topk_logprobs, const at::Tensor& topk_ids, const at::Tensor& root_token,
                const at::Tensor& base_pos, const at::Tensor& tokens, const at::Tensor& parents,
                const at::Tensor& depths, const at::Tensor& positions, const at::Tensor& ancestors,
                const at::Tensor& num_nodes) {
  check_dtype(kOp, topk_logprobs, "topk_logprobs", at::kFloat);
  check_dim(kOp, topk_logprobs, "topk_logprobs", 3);
  const int64_t batch = topk_logprobs.size(0), depth = topk_logprobs.size(1), width = topk_logprobs.size(2);
  check_dtype(kOp, topk_ids, "topk_ids", at::kLong);
  TORCH_CHECK_VALUE(topk_ids.sizes() == topk_logprobs.sizes(),
                    message(kOp, "'topk_ids' must have the shape of 'topk_logprobs' ", topk_logprobs.sizes(),
                            ", got ", topk_ids.sizes()));
  TORCH_CHECK_VALUE(width >= 1, message(kOp, "the candidate width K must be at least 1: 'topk_logprobs' has shape ",
                                        topk_logprobs.sizes()));
  for (const auto& [t, name] : {std::pair{&root_token, "root_token"}, {&base_pos, "base_pos"},
                                {&num_nodes, "num_nodes"}}) {
    check_dtype(kOp, *t, name, at::kLong);
    check_dim(kOp, *t, name, 1);
    check_size(kOp, *t, name, 0, batch);
  }
  check_dim(kOp, tokens, "tokens", 2);
  const int64_t budget = tokens.size(1);
  for (const auto& [t, name] : {std::pair{&tokens, "tokens"}, {&parents, "parents"}, {&depths, "depths"},
                                {&positions, "positions"}}) {
    check_dtype(kOp, *t, name, at::kLong);
    check_dim(kOp, *t, name, 2);
    check_size(kOp, *t, name, 0, batch);
    check_size(kOp, *t, name, 1, budget);
  }
  check_dtype(kOp, ancestors, "ancestors", at::kInt);
  check_dim(kOp, ancestors, "ancestors", 3);
  check_size(kOp, ancestors, "ancestors", 0, batch);
  check_size(kOp, ancestors, "ancestors", 1, budget);
  check_size(kOp, ancestors, "ancestors", 2, (budget + 31) / 32);
  for (const auto& [t, name] :
       {std::pair{&topk_ids, "topk_ids"}, {&root_token, "root_token"}, {&base_pos, "base_pos"}, {&tokens, "tokens"},
        {&parents, "parents"}, {&depths, "depths"}, {&positions, "positions"}, {&ancestors, "ancestors"},
        {&num_nodes, "num_nodes"}})
    check_device(kOp, *t, name, topk_logprobs, "topk_logprobs");
  TORCH_CHECK_VALUE(budget >= 1, message(kOp, "the budget (nodes including the root, the width of 'tokens') must be "
                                              "at least 1, got ", budget));
  TORCH_CHECK_VALUE(depth <= cuda::kTreeMaxDepth,
                    message(kOp, "CUDA builds trees of depth D <= ", cuda::kTreeMaxDepth,
                            ": 'topk_logprobs' has shape ", topk_logprobs.sizes()));
  TORCH_CHECK_VALUE(width <= cuda::kTreeMaxWidth,
                    message(kOp, "CUDA takes at most K = ", cuda::kTreeMaxWidth,
                            " candidates per depth: 'topk_logprobs' has shape ", topk_logprobs.sizes()));
  TORCH_CHECK_VALUE(budget <= cuda::kTreeMaxNodes,
                    message(kOp, "CUDA builds trees of at most ", cuda::kTreeMaxNodes,
                            " nodes: the budget (the width of 'tokens') is ", budget));
}

template <size_t R>
void copy_strides(const at::Tensor& t, int64_t (&out)[R]) {
  for (size_t d = 0; d < R; ++d) out[d] = t.stride(static_cast<int64_t>(d));
}

void build_tree_cuda(const at::Tensor& topk_logprobs, const at::Tensor& topk_ids, const at::Tensor& root_token,
                     const at::Tensor& base_pos, at::Tensor& tokens, at::Tensor& parents, at::Tensor& depths,
                     at::Tensor& positions, at::Tensor& ancestors, at::Tensor& num_nodes) {
  check_args(topk_logprobs, topk_ids, root_token, base_pos, tokens, parents, depths, positions, ancestors, num_nodes);
  const c10::cuda::CUDAGuard guard(topk_logprobs.device());
  cuda::BuildTreeArgs a{};
  a.logprobs = topk_logprobs.data_ptr<float>();
  copy_strides(topk_logprobs, a.logprobs_stride);
  a.ids = topk_ids.data_ptr<int64_t>();
  copy_strides(topk_ids, a.ids_stride);
  a.root_token = root_token.data_ptr<int64_t>();
  a.root_stride = root_token.stride(0);
  a.base_pos = base_pos.data_ptr<int64_t>();
  a.base_stride = base_pos.stride(0);
  a.tokens = tokens.data_ptr<int64_t>();
  copy_strides(tokens, a.tokens_stride);
  a.parents = parents.data_ptr<int64_t>();
  copy_strides(parents, a.parents_stride);
  a.depths = depths.data_ptr<int64_t>();
  copy_strides(depths, a.depths_stride);
  a.positions = positions.data_ptr<int64_t>();
  copy_strides(positions, a.positions_stride);
  a.ancestors = ancestors.data_ptr<int32_t>();
  copy_strides(ancestors, a.ancestors_stride);
  a.num_nodes = num_nodes.data_ptr<int64_t>();
  a.num_nodes_stride = num_nodes.stride(0);
  a.batch = topk_logprobs.size(0);
  a.depth = topk_logprobs.size(1);
  a.width = topk_logprobs.size(2);
  a.nodes = tokens.size(1);
  check_launch(cuda::build_tree(a, current_stream(topk_logprobs)), kOp);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def(
      "build_tree(Tensor topk_logprobs, Tensor topk_ids, Tensor root_token, Tensor base_pos, "
      "Tensor(a!) tokens, Tensor(b!) parents, Tensor(c!) depths, Tensor(d!) positions, "
      "Tensor(e!) ancestors, Tensor(f!) num_nodes) -> ()");
}

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("build_tree", &build_tree_cuda); }
#endif

}  // namespace jetspec
