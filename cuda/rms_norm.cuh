// Launcher interface of cuda/rms_norm.cu (raw pointers only; contract in cpp/rms_norm.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

enum class RmsNormDtype { kBFloat16, kFloat16, kFloat32 };

// The widest rows the kernels keep in registers (a row's threads hold it whole between the sum of
// squares and the scaling, so the row is read from memory once).
constexpr int64_t kRmsNormMaxHidden = 16384;

struct RmsNormArgs {
  RmsNormDtype dtype;     // of every tensor
  const void* x;          // [rows, hidden], elements of a row dense
  int64_t x_stride;       // elements between rows
  const void* residual;   // [rows, hidden] or nullptr (no residual add)
  int64_t residual_stride;
  const void* weight;     // [hidden], dense
  void* out;              // [rows, hidden]
  int64_t out_stride;
  void* residual_out;     // [rows, hidden] or nullptr (h not written)
  int64_t residual_out_stride;
  int64_t rows, hidden;   // 0 < hidden <= kRmsNormMaxHidden; rows >= 0
  float eps;              // >= 0
};

// Enqueues the op on stream: one launch, no host synchronisation, no allocation (graph-capturable); on
// sm_90 a programmatic dependent launch (unless JETSPEC_PDL=0) that waits for the kernel before it
// before its first load.
// The outputs must not overlap the inputs: x and residual are read through the read-only data path.
cudaError_t rms_norm(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace jetspec::cuda
