// Launcher interface of cuda/kv_compact.cu (raw pointers only; contract in cpp/kv_compact.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jetspec::cuda {

struct KvCompactArgs {
  char* cache;             // byte address of cache[0, 0, 0]
  int64_t planes, batch, slots;
  int64_t row_bytes;       // bytes of one slot's contiguous row
  int64_t plane_stride, batch_stride, slot_stride;  // in bytes
  const int64_t* accepted; // [batch, max_accept], contiguous
  int64_t max_accept;
  const int64_t* accept_len;  // [batch]
  const int64_t* base;        // [batch]
};

cudaError_t kv_compact(const KvCompactArgs& args, cudaStream_t stream);

}  // namespace jetspec::cuda
