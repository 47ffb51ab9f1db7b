// jetspec::draft_topk — the draft head's LM-head projection, log-softmax normaliser and top-K, fused.
//
//   draft_topk(Tensor hidden, Tensor weight, float temperature, Tensor(a!) logprobs, Tensor(b!) ids) -> ()
//
//   hidden   [B, D, H] float32/bfloat16/float16  the head's final hidden states of the D predicted depths.
//   weight   [V, H]    same dtype as hidden      the target's LM head (no bias); rows may be strided, H dense.
//   logprobs [B, D, K] float32                   out: log_softmax(hidden @ weight^T / temperature) at the top K,
//                                                descending; K is the outputs' last size, 1 <= K <= V.
//   ids      [B, D, K] int64                     out: their vocabulary ids. Equal values rank by lower id.
//   temperature > 0 and finite, also as a float32.
//   All tensors share one device; the outputs share no memory with each other or the inputs.
//
//   Logits accumulate in float32. The CPU kernel is the reference (ATen ops); the CUDA kernel never
//   writes the B x D x V logits to memory (one pass over the weight) and matches it up to the float32
//   summation order. The CUDA kernel also needs K <= 32 and V < 2^31, and reads 'weight' in 16-byte
//   pieces: H a multiple of 8 (4 for float32), the row stride likewise, the data 16-byte aligned
//   (ValueError otherwise). float32 runs on CUDA cores there, bfloat16/float16 on tensor cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "draft_topk.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "draft_topk";

void check_args(const at::Tensor& hidden, const at::Tensor& weight, double temperature, const at::Tensor& logprobs,
                const at::Tensor& ids) {
  const Named all[] = {{&hidden, "hidden"}, {&weight, "weight"}, {&logprobs, "logprobs"}, {&ids, "ids"}};
  check_same_device(kOp, all);
  check_no_overlap(kOp, {all[2], all[3]}, all);
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
  // As the kernels use it: in float32, where a tiny or huge double becomes 0 or inf.
  const float t = static_cast<float>(temperature);
  TORCH_CHECK_VALUE(t > 0 && std::isfinite(t), message(kOp, "temperature must be positive and finite in float32"));
}

// The op in ATen ops, on any device: the CPU kernel, and the CUDA kernel's answer for H = 0.
void draft_topk_aten(const at::Tensor& hidden, const at::Tensor& weight, double temperature, at::Tensor& logprobs,
                     at::Tensor& ids) {
  const auto logits = at::matmul(hidden.to(at::kFloat), weight.to(at::kFloat).t()).div_(temperature);
  const auto norm = at::logsumexp(logits, -1, /*keepdim=*/true);
  // A stable descending sort keeps equal logits in id order: the tie rule every backend must follow.
  const auto [values, order] = at::sort(logits, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  const int64_t k = logprobs.size(2);
  logprobs.copy_(values.narrow(-1, 0, k) - norm);
  ids.copy_(order.narrow(-1, 0, k));
}

void draft_topk_cpu(const at::Tensor& hidden, const at::Tensor& weight, double temperature, at::Tensor& logprobs,
                    at::Tensor& ids) {
  check_args(hidden, weight, temperature, logprobs, ids);
  draft_topk_aten(hidden, weight, temperature, logprobs, ids);
}

#ifdef JETSPEC_WITH_CUDA
// Rows (dim 0) of a 2-D tensor that can be read in 16-byte pieces.
bool rows_in_16_bytes(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(1) == 1 && (t.size(1) * es) % 16 == 0 &&
         (t.size(0) <= 1 || (t.stride(0) * es) % 16 == 0);
}

void draft_topk_cuda(const at::Tensor& hidden, const at::Tensor& weight, double temperature, at::Tensor& logprobs,
                     at::Tensor& ids) {
  check_args(hidden, weight, temperature, logprobs, ids);
  const int64_t k = logprobs.size(2), h = hidden.size(2), rows = hidden.size(0) * hidden.size(1);
  TORCH_CHECK_VALUE(k <= cuda::kDraftTopkMaxK,
                    message(kOp, "the CUDA kernel supports K <= ", cuda::kDraftTopkMaxK, ", got ", k));
  // Its sort keys hold a vocabulary id in 32 bits.
  TORCH_CHECK_VALUE(weight.size(0) <= std::numeric_limits<int32_t>::max(),
                    message(kOp, "the CUDA kernel supports V <= 2^31 - 1, got 'weight' shape ", weight.sizes()));
  TORCH_CHECK_VALUE(h == 0 || rows_in_16_bytes(weight),
                    message(kOp, "the CUDA kernel reads 'weight' rows in 16-byte pieces: H and the row stride must "
                            "be multiples of 8 (4 for float32) and the data 16-byte aligned, got H = ", h,
                            ", row stride ", weight.stride(0), ", dtype ", weight.scalar_type()));
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  if (h == 0) {  // every logit is 0: nothing to stream
    draft_topk_aten(hidden, weight, temperature, logprobs, ids);
    return;
  }
  at::Tensor flat = hidden.reshape({rows, h});
  if (!rows_in_16_bytes(flat)) flat = at::empty({rows, h}, hidden.options()).copy_(flat);
  const bool direct = logprobs.is_contiguous() && ids.is_contiguous();
  const at::Tensor out_logprobs = direct ? logprobs : at::empty(logprobs.sizes(), logprobs.options());
  const at::Tensor out_ids = direct ? ids : at::empty(ids.sizes(), ids.options());

  cuda::DraftTopkArgs args{};
  args.dtype = hidden.scalar_type() == at::kBFloat16 ? cuda::DraftTopkDtype::kBFloat16
               : hidden.scalar_type() == at::kHalf   ? cuda::DraftTopkDtype::kFloat16
                                                     : cuda::DraftTopkDtype::kFloat32;
  args.hidden = flat.data_ptr();
  args.hidden_stride = flat.stride(0);
  args.weight = weight.data_ptr();
  args.weight_stride = weight.stride(0);
  args.rows = rows;
  args.vocab = weight.size(0);
  args.hidden_size = h;
  args.k = static_cast<int>(k);
  args.temperature = static_cast<float>(temperature);
  args.logprobs = out_logprobs.data_ptr<float>();
  args.ids = out_ids.data_ptr<int64_t>();
  int64_t bytes = 0;
  check_launch(cuda::draft_topk_workspace(args, &bytes), kOp);
  const at::Tensor workspace = at::empty({bytes}, hidden.options().dtype(at::kByte));
  check_launch(cuda::draft_topk(args, workspace.data_ptr(), current_stream(hidden)), kOp);
  if (!direct) {
    logprobs.copy_(out_logprobs);
    ids.copy_(out_ids);
  }
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def("draft_topk(Tensor hidden, Tensor weight, float temperature, Tensor(a!) logprobs, Tensor(b!) ids) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, BackendSelect, m) { m.impl("draft_topk", same_device_kernel()); }

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("draft_topk", &draft_topk_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("draft_topk", &draft_topk_cuda); }
#endif

}  // namespace jetspec
