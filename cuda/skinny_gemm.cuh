// Launcher interface of cuda/skinny_gemm.cu (raw pointers only; contract in cpp/skinny_gemm.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

enum class SkinnyGemmDtype { kBFloat16, kFloat16 };

// What is applied to y = x @ weight^T before it is written (the op's `epilogue` argument).
enum class SkinnyEpilogue : int {
  kNone = 0,      // out = y
  kSiluMul = 1,   // weight = [gate; up] ([2I, K]): out = silu(y[:, :I]) * y[:, I:]  ([rows, I])
  kResidual = 2,  // out = y + residual
};

// The most x rows one launch takes (four m16n8 column blocks of 16 rows; wgmma tiles for more rows are
// a later kernel).
constexpr int64_t kSkinnyGemmMaxRows = 64;

struct SkinnyGemmArgs {
  SkinnyGemmDtype dtype;   // of every tensor
  const void* x;           // [rows, k], elements of a row dense; 16-byte aligned rows
  int64_t x_stride;        // elements between rows
  const void* weight;      // [n, k], likewise
  int64_t weight_stride;
  int64_t rows, n, k;      // 1 <= rows <= kSkinnyGemmMaxRows, n >= 1 (even for kSiluMul), k * element size
                           // a multiple of 16 bytes, > 0
  SkinnyEpilogue epilogue;
  const void* residual;    // [rows, n] for kResidual (any strides), else unused
  int64_t residual_stride0, residual_stride1;
  void* out;               // [rows, n] ([rows, n / 2] for kSiluMul), any strides, not overlapping the inputs
  int64_t out_stride0, out_stride1;
};

// Enqueues the op on stream: one launch (a cluster of CTAs per tile of weight rows when K is split), no
// host synchronisation, no allocation, no workspace (graph-capturable). On sm_90 the launch is a
// programmatic dependent launch (unless JETSPEC_PDL=0): the kernel starts streaming the weight while the
// kernel before it finishes, and reads x and residual and writes out only after that kernel is done;
// so the weight must not be written by the kernel just before.
cudaError_t skinny_gemm(const SkinnyGemmArgs& args, cudaStream_t stream);

}  // namespace jetspec::cuda
