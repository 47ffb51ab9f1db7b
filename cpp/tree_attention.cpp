// jetspec::tree_attention — the verify forward's attention: N tree nodes over the committed prefix plus
// the tree itself under its ancestor mask, every query head of a kv head (GQA) at once.
//
//   tree_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor prefix_len, Tensor ancestors,
//                  float scale, int max_prefix, Tensor(a!) out) -> ()
//
//   query       [B, N, Hq, d]  bfloat16 or float16. Last dim dense, other strides free (e.g. HF's
//                              [B, Hq, N, d] projections transposed).
//   key_cache   [B, S, Hkv, d] query's dtype. Last dim dense, other strides free (e.g. cache.data[layer, 0]
//   value_cache [B, S, Hkv, d] and [layer, 1] of a [L, 2, B, S, Hkv, d] cache). The tree's own keys and
//                              values are already in slots prefix_len[b] + j, j < N.
//   prefix_len  [B] int64      committed prefix per sequence, 0 <= prefix_len[b] <= S - N. Read on the
//                              device: a graph replay may change it without the host knowing.
//   ancestors   [B, N, ceil(N / 32)] int32  packed "may attend" bits as build_tree writes them: bit j % 32
//                              of word j / 32 of row i set <=> node i may attend node j.
//   scale       > 0            softmax scale (usually d ** -0.5).
//   max_prefix  an upper bound of prefix_len known on the host, 0 <= max_prefix <= S - N. It only sizes
//                              the split of the work: any in-range prefix_len gives the same result.
//   out         [B, N, Hq, d]  query's dtype, last dim dense: the attention output.
//
//   Hq % Hkv == 0 (query head h reads kv head h / (Hq / Hkv)), d in {64, 128}, 1 <= N <= 1024.
//   Node i sees key k iff k < prefix_len[b], or k = prefix_len[b] + j with j <= i and bit j of
//   ancestors[b, i] set (bits of later nodes are ignored: node order puts every ancestor first).
//   out[b, i, h] = sum over visible k of softmax_k(scale * q[b, i, h] . K[b, k, h / G]) * V[b, k, h / G],
//   scores, softmax and sums in fp32; a node that sees no key gets 0, and a key a node may not see
//   contributes nothing to it, whatever its K and V hold (NaN and inf included).
//   All tensors share one device; 'out' shares no memory with the inputs.
//
// The CPU kernel is the reference (ATen, fp32) and validates prefix_len; the CUDA kernel cannot raise
// without a host sync and clamps an out-of-range prefix_len into [0, S - N] instead of faulting. The
// CUDA kernel also needs query, key_cache, value_cache and out 16-byte aligned, with every stride but
// the last a multiple of 8 elements (true of any slice of whole rows of a d-wide cache).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "checks.h"
#include "cuda_glue.h"
#include "op_limits.h"
#ifdef JETSPEC_WITH_CUDA
#include "tree_attention.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "tree_attention";
constexpr int64_t kMaxNodes = limits::kTreeAttentionMaxNodes;

int64_t words_for(int64_t nodes) { return (nodes + 31) / 32; }

void check_args(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                const at::Tensor& prefix_len, const at::Tensor& ancestors, double scale, int64_t max_prefix,
                const at::Tensor& out) {
  const Named all[] = {{&query, "query"},           {&key_cache, "key_cache"}, {&value_cache, "value_cache"},
                       {&prefix_len, "prefix_len"}, {&ancestors, "ancestors"}, {&out, "out"}};
  check_same_device(kOp, all);
  check_no_overlap(kOp, {all[5]}, all);
  TORCH_CHECK_VALUE(query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf,
                    message(kOp, "'query' must be bfloat16 or float16, got ", query.scalar_type()));
  check_dim(kOp, query, "query", 4);
  const int64_t batch = query.size(0), nodes = query.size(1), q_heads = query.size(2), dim = query.size(3);
  TORCH_CHECK_VALUE(1 <= nodes && nodes <= kMaxNodes,
                    message(kOp, "'query' must hold 1 to ", kMaxNodes, " tree nodes in dim 1, got shape ",
                            query.sizes()));
  TORCH_CHECK_VALUE(std::find(std::begin(limits::kTreeAttentionHeadDims), std::end(limits::kTreeAttentionHeadDims),
                              dim) != std::end(limits::kTreeAttentionHeadDims),
                    message(kOp, "head_dim (the last size of 'query') must be 64 or 128, got ", dim));
  for (const auto& [t, name] : {all[1], all[2]}) {
    check_dtype(kOp, *t, name, query.scalar_type());
    check_dim(kOp, *t, name, 4);
    check_size(kOp, *t, name, 0, batch);
    check_size(kOp, *t, name, 3, dim);
  }
  TORCH_CHECK_VALUE(value_cache.sizes() == key_cache.sizes(),
                    message(kOp, "'value_cache' must have the shape of 'key_cache' ", key_cache.sizes(), ", got ",
                            value_cache.sizes()));
  const int64_t slots = key_cache.size(1), kv_heads = key_cache.size(2);
  TORCH_CHECK_VALUE(kv_heads >= 1 && q_heads >= 1 && q_heads % kv_heads == 0,
                    message(kOp, "the heads of 'query' (", q_heads, ") must be a positive multiple of those of "
                            "'key_cache' (", kv_heads, ")"));
  TORCH_CHECK_VALUE(slots >= nodes, message(kOp, "'key_cache' has ", slots, " slots, fewer than the ", nodes,
                                            " tree nodes it must hold"));
  check_dtype(kOp, out, "out", query.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == query.sizes(),
                    message(kOp, "'out' must have the shape of 'query' ", query.sizes(), ", got ", out.sizes()));
  for (const auto& [t, name] : {all[0], all[1], all[2], all[5]})
    TORCH_CHECK_VALUE(t->stride(3) == 1, message(kOp, "the last dim of '", name, "' must be dense, got strides ",
                                                 t->strides()));
  check_dtype(kOp, prefix_len, "prefix_len", at::kLong);
  check_dim(kOp, prefix_len, "prefix_len", 1);
  check_size(kOp, prefix_len, "prefix_len", 0, batch);
  check_dtype(kOp, ancestors, "ancestors", at::kInt);
  check_dim(kOp, ancestors, "ancestors", 3);
  check_size(kOp, ancestors, "ancestors", 0, batch);
  check_size(kOp, ancestors, "ancestors", 1, nodes);
  check_size(kOp, ancestors, "ancestors", 2, words_for(nodes));
  // As the kernels use it: in float32, where a tiny or huge double becomes 0 or inf.
  const float scale_f = static_cast<float>(scale);
  TORCH_CHECK_VALUE(std::isfinite(scale_f) && scale_f > 0,
                    message(kOp, "'scale' must be positive and finite (also as a float32)"));
  TORCH_CHECK_VALUE(0 <= max_prefix && max_prefix <= slots - nodes,
                    message(kOp, "'max_prefix' must be in [0, S - N = ", slots - nodes, "], got ", max_prefix));
}

void tree_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& prefix_len, const at::Tensor& ancestors, double scale, int64_t max_prefix,
                        at::Tensor& out) {
  check_args(query, key_cache, value_cache, prefix_len, ancestors, scale, max_prefix, out);
  const int64_t batch = query.size(0), nodes = query.size(1), q_heads = query.size(2), dim = query.size(3);
  const int64_t slots = key_cache.size(1), kv_heads = key_cache.size(2), group = q_heads / kv_heads;
  const auto prefix = prefix_len.contiguous();
  const int64_t* prefix_p = prefix.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(0 <= prefix_p[b] && prefix_p[b] <= slots - nodes,
                      message(kOp, "prefix_len[", b, "] = ", prefix_p[b], " is outside [0, S - N = ", slots - nodes,
                              "]"));
  const auto bool_opts = query.options().dtype(at::kBool);
  const auto earlier_or_self = at::ones({nodes, nodes}, bool_opts).tril();
  const auto shifts = at::arange(32, ancestors.options());
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = prefix_p[b], keys = n + nodes;
    // [Hkv, G, N, d] queries against [Hkv, 1, keys, d] keys and values, in fp32.
    const auto q = query[b].to(at::kFloat).reshape({nodes, kv_heads, group, dim}).permute({1, 2, 0, 3});
    const auto k = key_cache[b].narrow(0, 0, keys).to(at::kFloat).permute({1, 0, 2}).unsqueeze(1);
    const auto v = value_cache[b].narrow(0, 0, keys).to(at::kFloat).permute({1, 0, 2}).unsqueeze(1);
    const auto tree = at::bitwise_and(at::bitwise_right_shift(ancestors[b].unsqueeze(-1), shifts), 1)
                          .flatten(1)
                          .narrow(1, 0, nodes)
                          .to(at::kBool)
                          .logical_and(earlier_or_self);
    const auto visible = at::cat({at::ones({nodes, n}, bool_opts), tree}, 1);  // [N, keys]
    auto scores = at::matmul(q, k.transpose(-1, -2)).mul_(scale);
    scores.masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity());  // NaN scores too
    auto probs = at::softmax(scores, -1);
    probs.masked_fill_(visible.any(-1, /*keepdim=*/true).logical_not(), 0.0);  // no visible key: 0, not NaN
    // A hidden key's probability is 0, but 0 times a NaN or infinite value is NaN: the product takes the
    // finite values only, and the rare non-finite ones are added for the nodes that see their key.
    const auto finite = v.isfinite();
    auto result = at::matmul(probs, v.masked_fill(finite.logical_not(), 0.0));  // [Hkv, G, N, d]
    const auto bad = finite.logical_not().any(-1).any(0).flatten().nonzero().squeeze(1);  // keys holding one
    if (bad.numel() > 0) {
      const auto values = v.index_select(2, bad).masked_fill(finite.index_select(2, bad), 0.0);  // [Hkv, 1, c, d]
      const auto terms = probs.index_select(3, bad).unsqueeze(-1) * values.unsqueeze(2);  // [Hkv, G, N, c, d]
      const auto seen = visible.index_select(1, bad).unsqueeze(-1);                        // [N, c, 1]
      result.add_(terms.masked_fill(seen.logical_not(), 0.0).sum(3));
    }
    out[b].copy_(result.permute({2, 0, 1, 3}).reshape({nodes, q_heads, dim}));
  }
}

#ifdef JETSPEC_WITH_CUDA
void check_cuda_layout(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                       const at::Tensor& out) {
  const std::pair<const at::Tensor*, const char*> rows[] = {
      {&query, "query"}, {&key_cache, "key_cache"}, {&value_cache, "value_cache"}, {&out, "out"}};
  for (const auto& [t, name] : rows) {
    bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
    for (int64_t d = 0; d < 3; ++d) aligned = aligned && (t->size(d) == 1 || t->stride(d) % 8 == 0);
    TORCH_CHECK_VALUE(aligned, message(kOp, "CUDA needs '", name, "' 16-byte aligned with strides of dims 0-2 a "
                                       "multiple of 8 elements, got strides ", t->strides()));
  }
  TORCH_CHECK_VALUE(query.size(0) <= 65535 && key_cache.size(2) <= 65535,
                    message(kOp, "CUDA supports up to 65535 sequences and 65535 kv heads, got 'key_cache' shape ",
                            key_cache.sizes()));
  TORCH_CHECK_VALUE(key_cache.size(1) <= std::numeric_limits<int32_t>::max(),
                    message(kOp, "CUDA supports up to 2^31 - 1 cache slots, got 'key_cache' shape ", key_cache.sizes()));
  // Rows (sequence, node, query head) are counted in 32 bits, and the split-merge grid has a block per few.
  TORCH_CHECK_VALUE(product_at_most({query.size(0), query.size(1), query.size(2)}, std::numeric_limits<int32_t>::max()),
                    message(kOp, "CUDA supports up to 2^31 - 1 output rows (B x N x Hq), got 'query' shape ",
                            query.sizes()));
}

void tree_attention_cuda(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                         const at::Tensor& prefix_len, const at::Tensor& ancestors, double scale, int64_t max_prefix,
                         at::Tensor& out) {
  check_args(query, key_cache, value_cache, prefix_len, ancestors, scale, max_prefix, out);
  check_cuda_layout(query, key_cache, value_cache, out);
  if (query.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const auto prefix = prefix_len.contiguous();
  const auto anc = ancestors.contiguous();
  cuda::TreeAttentionArgs args{};
  args.query = query.data_ptr();
  args.q_batch_stride = query.stride(0);
  args.q_node_stride = query.stride(1);
  args.q_head_stride = query.stride(2);
  args.key = key_cache.data_ptr();
  args.k_batch_stride = key_cache.stride(0);
  args.k_slot_stride = key_cache.stride(1);
  args.k_head_stride = key_cache.stride(2);
  args.value = value_cache.data_ptr();
  args.v_batch_stride = value_cache.stride(0);
  args.v_slot_stride = value_cache.stride(1);
  args.v_head_stride = value_cache.stride(2);
  args.out = out.data_ptr();
  args.o_batch_stride = out.stride(0);
  args.o_node_stride = out.stride(1);
  args.o_head_stride = out.stride(2);
  args.prefix_len = prefix.data_ptr<int64_t>();
  args.ancestors = anc.data_ptr<int32_t>();
  args.batch = static_cast<int>(query.size(0));
  args.nodes = static_cast<int>(query.size(1));
  args.words = static_cast<int>(anc.size(2));
  args.q_heads = static_cast<int>(query.size(2));
  args.kv_heads = static_cast<int>(key_cache.size(2));
  args.head_dim = static_cast<int>(query.size(3));
  args.slots = key_cache.size(1);
  args.max_prefix = max_prefix;
  args.scale = static_cast<float>(scale);
  args.bf16 = query.scalar_type() == at::kBFloat16;
  cuda::TreeAttentionPlan plan{};
  check_launch(cuda::tree_attention_plan(args, &plan), kOp);
  // JETSPEC_TREE_ATTENTION_TMA=0 has the warpgroup blocks copy K/V with cp.async instead of the copy
  // engine: what they do where the driver cannot describe a cache view, kept reachable for tests (every
  // view the tests build encodes) and as an escape hatch.
  if (const char* tma = std::getenv("JETSPEC_TREE_ATTENTION_TMA"); tma != nullptr && std::strcmp(tma, "0") == 0)
    plan.tensor_copies = false;
  // Split partials: sized from shapes and max_prefix only, so the allocation is the same on every
  // graph replay (the caching allocator serves it from the graph's pool).
  at::Tensor partial_out, partial_lse;
  if (plan.splits > 1) {
    const int64_t rows = query.size(0) * query.size(1) * query.size(2);
    partial_out = at::empty({plan.splits, rows, query.size(3)}, query.options().dtype(at::kFloat));
    partial_lse = at::empty({plan.splits, rows}, query.options().dtype(at::kFloat));
  }
  check_launch(cuda::tree_attention(args, plan, partial_out.defined() ? partial_out.data_ptr<float>() : nullptr,
                                    partial_lse.defined() ? partial_lse.data_ptr<float>() : nullptr,
                                    current_stream(query)),
               kOp);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def(
      "tree_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor prefix_len, Tensor ancestors, "
      "float scale, int max_prefix, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, BackendSelect, m) { m.impl("tree_attention", same_device_kernel()); }

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }
#endif

}  // namespace jetspec
