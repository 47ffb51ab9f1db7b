// jetspec::accept_greedy — greedy (lossless) acceptance of a verified token tree, on the device.
//
//   accept_greedy(Tensor tokens, Tensor parents, Tensor target_ids, Tensor num_nodes,
//                 Tensor(a!) accepted, Tensor(b!) accept_len, Tensor(c!) bonus) -> ()
//
//   tokens     [B, N] int64   token of each tree node; node 0 is the root (the anchor).
//   parents    [B, N] int64   parent node of each node: -1 for the root, in [0, i) for node i.
//   target_ids [B, N] int64   the target's prediction (argmax, or a sample) at each node.
//   num_nodes  [B]    int64   nodes in use per row, 1 <= num_nodes[b] <= N (the rest is padding).
//   accepted   [B, M] int64   out: node indices of the accepted path, root first; -1 past its end.
//   accept_len [B]    int64   out: nodes on the accepted path, root included (1 <= accept_len <= M).
//   bonus      [B]    int64   out: target_ids at the path's last node — the next anchor.
//
//   Walk from the root: while a child c of the current node has tokens[c] == target_ids[current]
//   (siblings with equal tokens: the highest index wins) and fewer than M nodes are on the path,
//   step to c. Capping the path at M stays lossless: a shorter accepted prefix plus the target's
//   own prediction at its end is still exactly what greedy decoding would emit.
//   Committed tokens this round: tokens[accepted[1:accept_len]] followed by bonus.
//
// All tensors share one device, and no output shares memory with another argument.
// The CPU kernel validates the tree and raises on a malformed one; the CUDA kernel cannot
// raise without a host sync and treats an out-of-range parent as a non-matching node.
#include <torch/library.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "accept_greedy.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "accept_greedy";

void check_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_ids,
                const at::Tensor& num_nodes, const at::Tensor& accepted, const at::Tensor& accept_len,
                const at::Tensor& bonus) {
  const Named all[] = {{&tokens, "tokens"},     {&parents, "parents"},       {&target_ids, "target_ids"},
                       {&num_nodes, "num_nodes"}, {&accepted, "accepted"},     {&accept_len, "accept_len"},
                       {&bonus, "bonus"}};
  check_same_device(kOp, all);
  check_no_overlap(kOp, {all[4], all[5], all[6]}, all);
  for (const auto& [t, name] : all) check_dtype(kOp, *t, name, at::kLong);
  check_dim(kOp, tokens, "tokens", 2);
  const int64_t batch = tokens.size(0), nodes = tokens.size(1);
  TORCH_CHECK_VALUE(nodes >= 1, message(kOp, "a tree has at least its root node; 'tokens' has shape ", tokens.sizes()));
  for (const auto& [t, name] : {all[1], all[2]}) {
    check_dim(kOp, *t, name, 2);
    check_size(kOp, *t, name, 0, batch);
    check_size(kOp, *t, name, 1, nodes);
  }
  for (const auto& [t, name] : {all[3], all[5], all[6]}) {
    check_dim(kOp, *t, name, 1);
    check_size(kOp, *t, name, 0, batch);
  }
  check_dim(kOp, accepted, "accepted", 2);
  check_size(kOp, accepted, "accepted", 0, batch);
  TORCH_CHECK_VALUE(accepted.size(1) >= 1, message(kOp, "'accepted' needs room for the root, got shape ", accepted.sizes()));
  for (const auto& [t, name] : {all[4], all[5], all[6]})
    TORCH_CHECK_VALUE(t->is_contiguous(), message(kOp, "output '", name, "' must be contiguous"));
}

void accept_greedy_cpu(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_ids,
                       const at::Tensor& num_nodes, at::Tensor& accepted, at::Tensor& accept_len, at::Tensor& bonus) {
  check_args(tokens, parents, target_ids, num_nodes, accepted, accept_len, bonus);
  const auto tok = tokens.contiguous(), par = parents.contiguous(), tgt = target_ids.contiguous();
  const auto cnt = num_nodes.contiguous();
  const int64_t batch = tok.size(0), nodes = tok.size(1), max_accept = accepted.size(1);
  int64_t* acc = accepted.data_ptr<int64_t>();
  check_trees(kOp, par.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), batch, nodes);
  std::vector<int64_t> matching_child;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* t = tok.data_ptr<int64_t>() + b * nodes;
    const int64_t* p = par.data_ptr<int64_t>() + b * nodes;
    const int64_t* y = tgt.data_ptr<int64_t>() + b * nodes;
    const int64_t n = cnt.data_ptr<int64_t>()[b];
    matching_child.assign(n, -1);
    for (int64_t i = 1; i < n; ++i)
      if (t[i] == y[p[i]]) matching_child[p[i]] = i;
    int64_t cur = 0, len = 1;
    acc[b * max_accept] = 0;
    while (len < max_accept && matching_child[cur] >= 0) {
      cur = matching_child[cur];
      acc[b * max_accept + len++] = cur;
    }
    for (int64_t j = len; j < max_accept; ++j) acc[b * max_accept + j] = -1;
    accept_len.data_ptr<int64_t>()[b] = len;
    bonus.data_ptr<int64_t>()[b] = y[cur];
  }
}

#ifdef JETSPEC_WITH_CUDA
void accept_greedy_cuda(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_ids,
                        const at::Tensor& num_nodes, at::Tensor& accepted, at::Tensor& accept_len, at::Tensor& bonus) {
  check_args(tokens, parents, target_ids, num_nodes, accepted, accept_len, bonus);
  TORCH_CHECK_VALUE(tokens.size(1) <= cuda::kAcceptMaxNodes,
                    message(kOp, "trees of up to ", cuda::kAcceptMaxNodes, " nodes are supported on CUDA, got ", tokens.size(1)));
  TORCH_CHECK_VALUE(tokens.size(0) <= std::numeric_limits<int32_t>::max(),
                    message(kOp, "CUDA takes up to 2^31 - 1 trees (one block each), got 'tokens' shape ", tokens.sizes()));
  const c10::cuda::CUDAGuard guard(tokens.device());
  const auto tok = tokens.contiguous(), par = parents.contiguous(), tgt = target_ids.contiguous();
  const auto cnt = num_nodes.contiguous();
  cuda::AcceptGreedyArgs args{tok.data_ptr<int64_t>(),      par.data_ptr<int64_t>(),        tgt.data_ptr<int64_t>(),
                              cnt.data_ptr<int64_t>(),      accepted.data_ptr<int64_t>(),   accept_len.data_ptr<int64_t>(),
                              bonus.data_ptr<int64_t>(),    tok.size(0),                    tok.size(1),
                              accepted.size(1)};
  check_launch(cuda::accept_greedy(args, current_stream(tokens)), kOp);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def(
      "accept_greedy(Tensor tokens, Tensor parents, Tensor target_ids, Tensor num_nodes, "
      "Tensor(a!) accepted, Tensor(b!) accept_len, Tensor(c!) bonus) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, BackendSelect, m) { m.impl("accept_greedy", same_device_kernel()); }

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("accept_greedy", &accept_greedy_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("accept_greedy", &accept_greedy_cuda); }
#endif

}  // namespace jetspec
