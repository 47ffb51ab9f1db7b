// kv_compact: move the accepted tree nodes' cache rows to consecutive slots,
// every plane (layer x {K,V}) of every sequence in one launch.
//
// One thread owns one vector-wide column of one (plane, sequence) and walks the
// accepted rows in order, a chunk of ROWS at a time: it loads the whole chunk,
// then stores it. Columns never alias each other, so no barrier is needed, and
// the in-order walk is what makes overlapping source/destination ranges safe:
// with accepted strictly increasing and accepted[j] >= j, the destination of
// row j can only coincide with the source of an earlier row i < j, which this
// thread has already read (same chunk: loaded before any store; earlier chunk:
// loaded in an earlier iteration). Loads of later rows may be issued early:
// they never alias an earlier destination.
#include "kv_compact.cuh"

namespace jetspec::cuda {
namespace {

constexpr int kRows = 16;     // rows in flight per thread
constexpr int kThreads = 64;  // small blocks spread short jobs over all SMs

template <typename Vec>
__global__ void __launch_bounds__(kThreads) kv_compact_kernel(KvCompactArgs a, int64_t cols) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (t >= a.planes * a.batch * cols) return;
  const int64_t col = t % cols;
  const int64_t b = (t / cols) % a.batch;
  const int64_t p = t / (cols * a.batch);

  int64_t len = a.accept_len[b];
  len = len < 0 ? 0 : (len > a.max_accept ? a.max_accept : len);
  const int64_t base = a.base[b];
  const int64_t* acc = a.accepted + b * a.max_accept;
  char* column = a.cache + p * a.plane_stride + b * a.batch_stride + col * static_cast<int64_t>(sizeof(Vec));

  for (int64_t j0 = 0; j0 < len; j0 += kRows) {
    int64_t src[kRows];
    bool move[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t j = j0 + r;
      src[r] = j < len ? base + acc[j] : 0;
      const int64_t dst = base + j;
      // Out-of-range slots are skipped rather than trusted: a bad index must not fault the device.
      move[r] = j < len && src[r] != dst && src[r] >= 0 && src[r] < a.slots && dst >= 0 && dst < a.slots;
    }
    Vec v[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (move[r]) v[r] = *reinterpret_cast<const Vec*>(column + src[r] * a.slot_stride);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (move[r]) *reinterpret_cast<Vec*>(column + (base + j0 + r) * a.slot_stride) = v[r];
  }
}

template <typename Vec>
cudaError_t launch(const KvCompactArgs& a, cudaStream_t stream) {
  const int64_t cols = a.row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t threads = a.planes * a.batch * cols;
  if (threads == 0 || a.max_accept == 0) return cudaSuccess;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kv_compact_kernel<Vec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, cols);
  return cudaGetLastError();
}

// Widest access that every row start is aligned to.
int64_t vector_bytes(const KvCompactArgs& a) {
  const auto addr = reinterpret_cast<uintptr_t>(a.cache);
  for (int64_t v : {16, 8, 4, 2}) {
    if (a.row_bytes % v == 0 && addr % v == 0 && a.plane_stride % v == 0 && a.batch_stride % v == 0 &&
        a.slot_stride % v == 0)
      return v;
  }
  return 1;
}

}  // namespace

cudaError_t kv_compact(const KvCompactArgs& a, cudaStream_t stream) {
  switch (vector_bytes(a)) {
    case 16: return launch<uint4>(a, stream);
    case 8: return launch<uint2>(a, stream);
    case 4: return launch<uint32_t>(a, stream);
    case 2: return launch<uint16_t>(a, stream);
    default: return launch<uint8_t>(a, stream);
  }
}

}  // namespace jetspec::cuda
