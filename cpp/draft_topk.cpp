// jetspec::draft_topk — the draft head's LM-head projection, log-softmax normaliser and top-K, fused.
//
//   draft_topk(Tensor hidden, Tensor weight, float temperature, Tensor(a!) logprobs, Tensor(b!) ids) -> ()
//
//   hidden   [B, D, H] float32/bfloat16/float16  the head's final hidden states of the D predicted depths.
//   weight   [V, H]    same dtype as hidden      the target's LM head (no bias); rows may be strided, H dense.
//   logprobs [B, D, K] float32                   out: log_softmax(hidden @ weight^T / temperature) at the top K,
//                                                descending; K is the outputs' last size, 1 <= K <= V.
//   ids      [B, D, K] int64                     out: their vocabulary ids. Equal values rank by lower id.
//   temperature > 0.
//
//   Logits accumulate in float32. The CPU kernel is the reference (ATen ops); a CUDA kernel that never
//   writes the B x D x V logits to memory is the point of the op (issue: fused drafting) and must match it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace jetspec {
namespace {

constexpr const char* kOp = "draft_topk";

void check_args(const at::Tensor& hidden, const at::Tensor& weight, double temperature, const at::Tensor& logprobs,
                const at::Tensor& ids) {
  TORCH_CHECK_VALUE(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16 ||
                        hidden.scalar_type() == at::kHalf,
                    message(kOp, "'hidden' must be float32, bfloat16 or float16, got ", hidden.scalar_type()));
  check_dtype(kOp, weight, "weight", hidden.scalar_type());
  check_dtype(kOp, logprobs, "logprobs", at::kFloat);
  check_dtype(kOp, ids, "ids", at::kLong);
  check_dim(kOp, hidden, "hidden", 3);
  check_dim(kOp, weight, "weight", 2);
  check_size(kOp, weight, "weight", 1, hidden.size(2));
  TORCH_CHECK_VALUE(weight.stride(1) == 1, message(kOp, "'weight' rows must be dense, got strides ", weight.strides()));
  check_dim(kOp, logprobs, "logprobs", 3);
  for (int64_t d = 0; d < 2; ++d) check_size(kOp, logprobs, "logprobs", d, hidden.size(d));
  TORCH_CHECK_VALUE(ids.sizes() == logprobs.sizes(),
                    message(kOp, "'ids' must have the shape of 'logprobs' ", logprobs.sizes(), ", got ", ids.sizes()));
  const int64_t k = logprobs.size(2);
  TORCH_CHECK_VALUE(1 <= k && k <= weight.size(0),
                    message(kOp, "K (the outputs' last size) must be in [1, V = ", weight.size(0), "], got ", k));
  TORCH_CHECK_VALUE(temperature > 0, message(kOp, "temperature must be positive"));
  check_device(kOp, weight, "weight", hidden, "hidden");
  check_device(kOp, logprobs, "logprobs", hidden, "hidden");
  check_device(kOp, ids, "ids", hidden, "hidden");
}

void draft_topk_cpu(const at::Tensor& hidden, const at::Tensor& weight, double temperature, at::Tensor& logprobs,
                    at::Tensor& ids) {
  check_args(hidden, weight, temperature, logprobs, ids);
  const auto logits = at::matmul(hidden.to(at::kFloat), weight.to(at::kFloat).t()).div_(temperature);
  const auto norm = at::logsumexp(logits, -1, /*keepdim=*/true);
  // A stable descending sort keeps equal logits in id order: the tie rule every backend must follow.
  const auto [values, order] = at::sort(logits, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  const int64_t k = logprobs.size(2);
  logprobs.copy_(values.narrow(-1, 0, k) - norm);
  ids.copy_(order.narrow(-1, 0, k));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def("draft_topk(Tensor hidden, Tensor weight, float temperature, Tensor(a!) logprobs, Tensor(b!) ids) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("draft_topk", &draft_topk_cpu); }

}  // namespace jetspec
