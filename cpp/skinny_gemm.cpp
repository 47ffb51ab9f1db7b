// jetspec::skinny_gemm — y = x @ weight^T for a few rows of x, with the next elementwise step fused.
//
//   skinny_gemm(Tensor x, Tensor weight, Tensor? residual, int epilogue, Tensor(a!) out) -> ()
//
//   x        [R, K] float32/bfloat16/float16  the rows.
//   weight   [N, K] x's dtype                 an nn.Linear weight as HF stores it (no bias).
//   residual [R, N] x's dtype, or None        epilogue 2 only.
//   epilogue 0 (none)     out [R, N]      = y
//            1 (silu_mul) out [R, N / 2]  = silu(y[:, :N/2]) * y[:, N/2:]  (weight = [gate; up], N even)
//            2 (residual) out [R, N]      = y + residual
//   out      x's dtype.
//   All tensors share one device; out shares no memory with the inputs nor within itself (ValueError).
//
//   y accumulates in float32. Rounding follows the HF modules the op replaces: y is rounded to the dtype
//   (nn.Linear's output); silu_mul is act_fn(gate) * up of those rounded halves, each step rounded
//   (Qwen3MLP / LlamaMLP); residual is `residual + y` rounded (the decoder layer's residual add). The CPU
//   kernel is the reference (ATen ops: a float32 matmul, then those steps); the CUDA kernel matches it up
//   to the float32 summation order.
//
//   The CUDA kernel streams the weight once (a thread-block cluster splits K where the weight has few
//   rows) and needs: bfloat16 or float16; R <= 64 (LIMITS["skinny_gemm"]["cuda"]["rows"]; more rows belong
//   to a tensor-core GEMM: the Python wrapper jetspec.ops.skinny_gemm runs torch.nn.functional.linear
//   there); x and weight rows read in 16-byte pieces: elements dense, K and the row strides multiples of 8,
//   the data 16-byte aligned. Anything else raises ValueError before any kernel runs. out and residual
//   may have any strides.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "skinny_gemm.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "skinny_gemm";

constexpr int64_t kEpilogueNone = 0, kEpilogueSiluMul = 1, kEpilogueResidual = 2;
#ifdef JETSPEC_WITH_CUDA
static_assert(static_cast<int>(cuda::SkinnyEpilogue::kNone) == kEpilogueNone &&
                  static_cast<int>(cuda::SkinnyEpilogue::kSiluMul) == kEpilogueSiluMul &&
                  static_cast<int>(cuda::SkinnyEpilogue::kResidual) == kEpilogueResidual,
              "the schema's epilogue numbers are the kernel's");
#endif

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                int64_t epilogue, const at::Tensor& out) {
  std::vector<Named> all{{&x, "x"}, {&weight, "weight"}, {&out, "out"}};
  if (residual) all.emplace_back(&*residual, "residual");
  check_same_device(kOp, all);
  check_no_overlap(kOp, {all[2]}, all);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                    message(kOp, "'x' must be float32, bfloat16 or float16, got ", x.scalar_type()));
  check_dim(kOp, x, "x", 2);
  check_dtype(kOp, weight, "weight", x.scalar_type());
  check_dim(kOp, weight, "weight", 2);
  check_size(kOp, weight, "weight", 1, x.size(1));
  TORCH_CHECK_VALUE(epilogue == kEpilogueNone || epilogue == kEpilogueSiluMul || epilogue == kEpilogueResidual,
                    message(kOp, "epilogue must be 0 (none), 1 (silu_mul) or 2 (residual), got ", epilogue));
  const int64_t rows = x.size(0), n = weight.size(0);
  TORCH_CHECK_VALUE(epilogue != kEpilogueSiluMul || n % 2 == 0,
                    message(kOp, "the silu_mul epilogue needs an even number of weight rows ([gate; up]), got ", n));
  TORCH_CHECK_VALUE(residual.has_value() == (epilogue == kEpilogueResidual),
                    message(kOp, "'residual' must be given with the residual epilogue (2) and only with it"));
  const int64_t n_out = epilogue == kEpilogueSiluMul ? n / 2 : n;
  check_dtype(kOp, out, "out", x.scalar_type());
  check_dim(kOp, out, "out", 2);
  check_size(kOp, out, "out", 0, rows);
  check_size(kOp, out, "out", 1, n_out);
  if (residual) {
    check_dtype(kOp, *residual, "residual", x.scalar_type());
    check_dim(kOp, *residual, "residual", 2);
    check_size(kOp, *residual, "residual", 0, rows);
    check_size(kOp, *residual, "residual", 1, n);
  }
}

// The op in ATen ops, on any device: the CPU kernel, and the CUDA kernel's answer for K = 0.
void skinny_gemm_aten(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                      int64_t epilogue, const at::Tensor& out) {
  const at::Tensor y = at::matmul(x.to(at::kFloat), weight.to(at::kFloat).t()).to(x.scalar_type());
  if (epilogue == kEpilogueSiluMul) {
    const int64_t half = weight.size(0) / 2;
    out.copy_(at::silu(y.narrow(1, 0, half)) * y.narrow(1, half, half));
  } else if (epilogue == kEpilogueResidual) {
    out.copy_(*residual + y);
  } else {
    out.copy_(y);
  }
}

void skinny_gemm_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                     int64_t epilogue, const at::Tensor& out) {
  check_args(x, weight, residual, epilogue, out);
  if (out.numel() == 0) return;
  skinny_gemm_aten(x, weight, residual, epilogue, out);
}

#ifdef JETSPEC_WITH_CUDA
// Rows (dim 0) of a 2-D tensor that can be read in 16-byte pieces.
bool rows_in_16_bytes(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(1) == 1 || t.size(1) <= 1) &&
         (t.size(1) * es) % 16 == 0 && (t.size(0) <= 1 || (t.stride(0) * es) % 16 == 0);
}

void skinny_gemm_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                      int64_t epilogue, const at::Tensor& out) {
  check_args(x, weight, residual, epilogue, out);
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(x.scalar_type() != at::kFloat,
                    message(kOp, "the CUDA kernel takes bfloat16 or float16, got float32"));
  TORCH_CHECK_VALUE(rows <= cuda::kSkinnyGemmMaxRows,
                    message(kOp, "the CUDA kernel supports R <= ", cuda::kSkinnyGemmMaxRows, " rows, got ", rows,
                            " (jetspec.ops.skinny_gemm runs torch.nn.functional.linear there)"));
  TORCH_CHECK_VALUE(k == 0 || (rows_in_16_bytes(x) && rows_in_16_bytes(weight)),
                    message(kOp, "the CUDA kernel reads 'x' and 'weight' rows in 16-byte pieces: K and the row "
                            "strides must be multiples of 8, the elements dense and the data 16-byte aligned, got "
                            "K = ", k, ", row strides ", x.stride(0), " ('x') and ", weight.stride(0), " ('weight')"));
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  if (k == 0) {  // y = 0: nothing to stream
    skinny_gemm_aten(x, weight, residual, epilogue, out);
    return;
  }
  cuda::SkinnyGemmArgs args{};
  args.dtype = x.scalar_type() == at::kBFloat16 ? cuda::SkinnyGemmDtype::kBFloat16 : cuda::SkinnyGemmDtype::kFloat16;
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  args.weight = weight.data_ptr();
  args.weight_stride = weight.stride(0);
  args.rows = rows;
  args.n = n;
  args.k = k;
  args.epilogue = static_cast<cuda::SkinnyEpilogue>(epilogue);
  args.residual = residual ? residual->data_ptr() : nullptr;
  args.residual_stride0 = residual ? residual->stride(0) : 0;
  args.residual_stride1 = residual ? residual->stride(1) : 0;
  args.out = out.data_ptr();
  args.out_stride0 = out.stride(0);
  args.out_stride1 = out.stride(1);
  check_launch(cuda::skinny_gemm(args, current_stream(x)), kOp);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def("skinny_gemm(Tensor x, Tensor weight, Tensor? residual, int epilogue, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, BackendSelect, m) { m.impl("skinny_gemm", same_device_kernel()); }

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("skinny_gemm", &skinny_gemm_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("skinny_gemm", &skinny_gemm_cuda); }
#endif

}  // namespace jetspec
