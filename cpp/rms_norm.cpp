// jetspec::rms_norm — the decoder layer's residual add and RMSNorm, fused: one pass over the rows.
//
//   rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, Tensor(a!) out, Tensor(b!)? residual_out) -> ()
//
//   x            [R, H] float32/bfloat16/float16  the rows (e.g. a sublayer's output).
//   residual     [R, H] x's dtype, or None        added to x first.
//   weight       [H]    x's dtype                 the norm's scale.
//   eps          >= 0, finite in float32          added to the mean square.
//   out          [R, H] x's dtype                 out: rmsnorm(h) * weight, h = x + residual (x without one).
//   residual_out [R, H] x's dtype, or None        out: h, the residual stream the next layer adds to.
//
//   Numerics are HF's `hidden_states = residual + hidden_states` followed by Qwen3RMSNorm/LlamaRMSNorm:
//     h      = (x + residual) rounded to the dtype
//     var    = mean(h.float()^2) over H, in float32
//     normed = (h.float() * rsqrt(var + eps)) rounded to the dtype
//     out    = weight * normed, rounded to the dtype
//   The CPU kernel is the reference (those ATen ops); the CUDA kernel matches it up to the float32
//   summation order of var (and so, rarely, one unit in the last place of out).
//   Every tensor may have any row stride; the CUDA kernel needs each row's elements dense (stride 1 in
//   dim 1; ValueError otherwise) and H <= 16384 (LIMITS["rms_norm"]["cuda"]["hidden"]). It moves 16-byte
//   pieces when every pointer is 16-byte aligned and H and the row strides are multiples of 16 bytes, one
//   element at a time otherwise.
//   All tensors share one device; the outputs share no memory with each other or the inputs, nor within
//   themselves (ValueError).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "rms_norm.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "rms_norm";

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_dtype(kOp, t, name, x.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(),
                    message(kOp, "'", name, "' must have the shape of 'x' ", x.sizes(), ", got ", t.sizes()));
}

void check_args(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
                const at::Tensor& out, const std::optional<at::Tensor>& residual_out) {
  std::vector<Named> all{{&x, "x"}, {&weight, "weight"}, {&out, "out"}};
  if (residual) all.emplace_back(&*residual, "residual");
  if (residual_out) all.emplace_back(&*residual_out, "residual_out");
  check_same_device(kOp, all);
  const Named outputs[] = {all[2], all.back()};  // out, and residual_out when given
  check_no_overlap(kOp, c10::ArrayRef<Named>(outputs, residual_out ? 2 : 1), all);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                    message(kOp, "'x' must be float32, bfloat16 or float16, got ", x.scalar_type()));
  check_dim(kOp, x, "x", 2);
  if (residual) check_rows(*residual, "residual", x);
  check_dtype(kOp, weight, "weight", x.scalar_type());
  check_dim(kOp, weight, "weight", 1);
  check_size(kOp, weight, "weight", 0, x.size(1));
  // As the kernels use it: in float32.
  const float e = static_cast<float>(eps);
  TORCH_CHECK_VALUE(std::isfinite(e) && e >= 0, message(kOp, "eps must be finite and >= 0 in float32"));
  check_rows(out, "out", x);
  if (residual_out) check_rows(*residual_out, "residual_out", x);
}

// The op in ATen ops, on any device: the CPU kernel.
void rms_norm_aten(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                   double eps, const at::Tensor& out, const std::optional<at::Tensor>& residual_out) {
  const at::Tensor h = residual ? x + *residual : x;
  if (residual_out) residual_out->copy_(h);
  const at::Tensor hf = h.to(at::kFloat);
  const at::Tensor var = hf.pow(2).mean(-1, /*keepdim=*/true);
  out.copy_(weight * (hf * at::rsqrt(var + eps)).to(x.scalar_type()));
}

void rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
                  const at::Tensor& out, const std::optional<at::Tensor>& residual_out) {
  check_args(x, residual, weight, eps, out, residual_out);
  if (x.numel() == 0) return;
  rms_norm_aten(x, residual, weight, eps, out, residual_out);
}

#ifdef JETSPEC_WITH_CUDA
void rms_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                   double eps, const at::Tensor& out, const std::optional<at::Tensor>& residual_out) {
  check_args(x, residual, weight, eps, out, residual_out);
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK_VALUE(hidden <= cuda::kRmsNormMaxHidden,
                    message(kOp, "the CUDA kernel supports H <= ", cuda::kRmsNormMaxHidden, ", got ", hidden));
  const auto dense = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.stride(1) == 1 || hidden <= 1,
                      message(kOp, "the CUDA kernel needs the elements of each row of '", name,
                              "' dense (stride 1 in dim 1), got strides ", t.strides()));
  };
  dense(x, "x");
  if (residual) dense(*residual, "residual");
  dense(weight.unsqueeze(0), "weight");
  dense(out, "out");
  if (residual_out) dense(*residual_out, "residual_out");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());

  cuda::RmsNormArgs args{};
  args.dtype = x.scalar_type() == at::kBFloat16 ? cuda::RmsNormDtype::kBFloat16
               : x.scalar_type() == at::kHalf   ? cuda::RmsNormDtype::kFloat16
                                                : cuda::RmsNormDtype::kFloat32;
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  args.residual = residual ? residual->data_ptr() : nullptr;
  args.residual_stride = residual ? residual->stride(0) : 0;
  args.weight = weight.data_ptr();
  args.out = out.data_ptr();
  args.out_stride = out.stride(0);
  args.residual_out = residual_out ? residual_out->data_ptr() : nullptr;
  args.residual_out_stride = residual_out ? residual_out->stride(0) : 0;
  args.rows = rows;
  args.hidden = hidden;
  args.eps = static_cast<float>(eps);
  check_launch(cuda::rms_norm(args, current_stream(x)), kOp);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, Tensor(a!) out, Tensor(b!)? residual_out) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, BackendSelect, m) { m.impl("rms_norm", same_device_kernel()); }

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }
#endif

}  // namespace jetspec
