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
//   score(parent) + topk_logprobs[d][r]; stop when N nodes exist or the heap is empty. Node index =
//   creation order, so parents[i] < i. Padding nodes (i >= num_nodes) are token 0, parent -1,
//   depth 0, position base_pos, and see only themselves.
//
// The CPU kernel is the Python reference (jetspec.tree), registered from Python; the schema lives here
// so that every backend shares it.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def(
      "build_tree(Tensor topk_logprobs, Tensor topk_ids, Tensor root_token, Tensor base_pos, "
      "Tensor(a!) tokens, Tensor(b!) parents, Tensor(c!) depths, Tensor(d!) positions, "
      "Tensor(e!) ancestors, Tensor(f!) num_nodes) -> ()");
}
