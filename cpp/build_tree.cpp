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
// The CPU kernel (below) is that heap, as jetspec.ops.reference.build_tree runs it; it also raises
// where a position base_pos + depth would not fit in int64 (the CUDA kernel wraps it around). The CUDA
// kernel (cuda/build_tree.cu) builds the same trees, bit for bit, for D <= 32, K <= 32 and N <= 1024
// (beyond: ValueError), one launch with one block per tree, no host sync. It relies on what the contract
// says of topk_logprobs: rows descending, log-probs (no NaN, no +inf); on rows that are not, the two
// kernels may build different trees. All tensors share one device; no output shares memory with another
// argument.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <queue>
#include <vector>

#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "build_tree.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "build_tree";

void check_args(const at::Tensor& topk_logprobs, const at::Tensor& topk_ids, const at::Tensor& root_token,
                const at::Tensor& base_pos, const at::Tensor& tokens, const at::Tensor& parents,
                const at::Tensor& depths, const at::Tensor& positions, const at::Tensor& ancestors,
                const at::Tensor& num_nodes) {
  const Named all[] = {{&topk_logprobs, "topk_logprobs"}, {&topk_ids, "topk_ids"}, {&root_token, "root_token"},
                       {&base_pos, "base_pos"},           {&tokens, "tokens"},     {&parents, "parents"},
                       {&depths, "depths"},               {&positions, "positions"}, {&ancestors, "ancestors"},
                       {&num_nodes, "num_nodes"}};
  check_same_device(kOp, all);
  check_no_overlap(kOp, {all[4], all[5], all[6], all[7], all[8], all[9]}, all);
  check_dtype(kOp, topk_logprobs, "topk_logprobs", at::kFloat);
  check_dim(kOp, topk_logprobs, "topk_logprobs", 3);
  const int64_t batch = topk_logprobs.size(0), width = topk_logprobs.size(2);
  check_dtype(kOp, topk_ids, "topk_ids", at::kLong);
  TORCH_CHECK_VALUE(topk_ids.sizes() == topk_logprobs.sizes(),
                    message(kOp, "'topk_ids' must have the shape of 'topk_logprobs' ", topk_logprobs.sizes(),
                            ", got ", topk_ids.sizes()));
  TORCH_CHECK_VALUE(width >= 1, message(kOp, "the candidate width K must be at least 1: 'topk_logprobs' has shape ",
                                        topk_logprobs.sizes()));
  for (const auto& [t, name] : {all[2], all[3], all[9]}) {
    check_dtype(kOp, *t, name, at::kLong);
    check_dim(kOp, *t, name, 1);
    check_size(kOp, *t, name, 0, batch);
  }
  check_dim(kOp, tokens, "tokens", 2);
  const int64_t budget = tokens.size(1);
  for (const auto& [t, name] : {all[4], all[5], all[6], all[7]}) {
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
  TORCH_CHECK_VALUE(budget >= 1, message(kOp, "the budget (nodes including the root, the width of 'tokens') must be "
                                              "at least 1, got ", budget));
}

// A heap entry. Pop order: higher score first, then lower index (the earlier-created node), as the
// reference's heap of (-score, index) pops. A NaN score (outside the contract) ranks as -inf, so that the
// order stays a strict weak order and the heap well-formed.
struct Entry {
  double score;
  int64_t node;
};

struct PopsLater {
  static double rank(double score) { return std::isnan(score) ? -std::numeric_limits<double>::infinity() : score; }
  bool operator()(const Entry& a, const Entry& b) const {
    const double x = rank(a.score), y = rank(b.score);
    return x != y ? x < y : a.node > b.node;
  }
};

// One tree (batch row b): writes every output row, padding included, and returns the node count.
int64_t build_one(const at::TensorAccessor<float, 2>& lp, const at::TensorAccessor<int64_t, 2>& ids, int64_t root,
                  int64_t base, at::TensorAccessor<int64_t, 1> tok, at::TensorAccessor<int64_t, 1> par,
                  at::TensorAccessor<int64_t, 1> dep, at::TensorAccessor<int64_t, 1> pos,
                  at::TensorAccessor<int32_t, 2> anc) {
  const int64_t depth_limit = lp.size(0), width = lp.size(1), budget = tok.size(0), words = anc.size(1);
  std::priority_queue<Entry, std::vector<Entry>, PopsLater> heap;
  heap.push({0.0, 0});
  tok[0] = root;
  par[0] = -1;
  dep[0] = 0;
  int64_t count = 1;
  while (!heap.empty() && count < budget) {
    const Entry top = heap.top();
    heap.pop();
    const int64_t d = dep[top.node];
    if (d >= depth_limit) continue;
    const int64_t children = std::min(width, budget - count);
    for (int64_t r = 0; r < children; ++r, ++count) {
      tok[count] = ids[d][r];
      par[count] = top.node;
      dep[count] = d + 1;
      heap.push({top.score + static_cast<double>(lp[d][r]), count});
    }
  }
  for (int64_t i = count; i < budget; ++i) {
    tok[i] = 0;
    par[i] = -1;
    dep[i] = 0;
  }
  // Row i: its parent's row (node order puts the parent first) plus bit i; padding rows only bit i.
  for (int64_t i = 0; i < budget; ++i) {
    for (int64_t w = 0; w < words; ++w) anc[i][w] = par[i] >= 0 ? anc[par[i]][w] : 0;
    anc[i][i / 32] |= static_cast<int32_t>(1u << (i % 32));
    pos[i] = base + dep[i];
  }
  return count;
}

void build_tree_cpu(const at::Tensor& topk_logprobs, const at::Tensor& topk_ids, const at::Tensor& root_token,
                    const at::Tensor& base_pos, at::Tensor& tokens, at::Tensor& parents, at::Tensor& depths,
                    at::Tensor& positions, at::Tensor& ancestors, at::Tensor& num_nodes) {
  check_args(topk_logprobs, topk_ids, root_token, base_pos, tokens, parents, depths, positions, ancestors, num_nodes);
  const auto lp = topk_logprobs.accessor<float, 3>();
  const auto ids = topk_ids.accessor<int64_t, 3>();
  const auto root = root_token.accessor<int64_t, 1>();
  const auto base = base_pos.accessor<int64_t, 1>();
  const int64_t batch = topk_logprobs.size(0), depth_limit = topk_logprobs.size(1);
  for (int64_t b = 0; b < batch; ++b)  // depths reach at most D: base_pos + D must fit
    TORCH_CHECK_VALUE(base[b] <= std::numeric_limits<int64_t>::max() - depth_limit,
                      message(kOp, "base_pos[", b, "] = ", base[b], " puts positions up to base_pos + D (D = ",
                              depth_limit, ") past the int64 range"));
  auto tok = tokens.accessor<int64_t, 2>(), par = parents.accessor<int64_t, 2>(), dep = depths.accessor<int64_t, 2>(),
       pos = positions.accessor<int64_t, 2>();
  auto anc = ancestors.accessor<int32_t, 3>();
  auto count = num_nodes.accessor<int64_t, 1>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      count[b] = build_one(lp[b], ids[b], root[b], base[b], tok[b], par[b], dep[b], pos[b], anc[b]);
  });
}

#ifdef JETSPEC_WITH_CUDA
template <size_t R>
void copy_strides(const at::Tensor& t, int64_t (&out)[R]) {
  for (size_t d = 0; d < R; ++d) out[d] = t.stride(static_cast<int64_t>(d));
}

void build_tree_cuda(const at::Tensor& topk_logprobs, const at::Tensor& topk_ids, const at::Tensor& root_token,
                     const at::Tensor& base_pos, at::Tensor& tokens, at::Tensor& parents, at::Tensor& depths,
                     at::Tensor& positions, at::Tensor& ancestors, at::Tensor& num_nodes) {
  check_args(topk_logprobs, topk_ids, root_token, base_pos, tokens, parents, depths, positions, ancestors, num_nodes);
  TORCH_CHECK_VALUE(topk_logprobs.size(1) <= cuda::kTreeMaxDepth,
                    message(kOp, "CUDA builds trees of depth D <= ", cuda::kTreeMaxDepth,
                            ": 'topk_logprobs' has shape ", topk_logprobs.sizes()));
  TORCH_CHECK_VALUE(topk_logprobs.size(2) <= cuda::kTreeMaxWidth,
                    message(kOp, "CUDA takes at most K = ", cuda::kTreeMaxWidth,
                            " candidates per depth: 'topk_logprobs' has shape ", topk_logprobs.sizes()));
  TORCH_CHECK_VALUE(tokens.size(1) <= cuda::kTreeMaxNodes,
                    message(kOp, "CUDA builds trees of at most ", cuda::kTreeMaxNodes,
                            " nodes: the budget (the width of 'tokens') is ", tokens.size(1)));
  TORCH_CHECK_VALUE(topk_logprobs.size(0) <= std::numeric_limits<int32_t>::max(),
                    message(kOp, "CUDA builds up to 2^31 - 1 trees (one block each), got 'topk_logprobs' shape ",
                            topk_logprobs.sizes()));
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

TORCH_LIBRARY_IMPL(jetspec, BackendSelect, m) { m.impl("build_tree", same_device_kernel()); }

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("build_tree", &build_tree_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("build_tree", &build_tree_cuda); }
#endif

}  // namespace jetspec
