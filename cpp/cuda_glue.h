// What every CUDA entry point in cpp/ needs: the device guard, torch's current
// stream, and turning a launcher's cudaError_t into a Python exception.
#pragma once
#ifdef JETSPEC_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "checks.h"

namespace jetspec {

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, message(op, "CUDA launch failed: ", cudaGetErrorString(err)));
}

}  // namespace jetspec

#endif  // JETSPEC_WITH_CUDA
