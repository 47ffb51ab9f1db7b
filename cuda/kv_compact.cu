// kv_compact: move the accepted tree nodes' cache rows to consecutive slots,
// every plane (layer x {K,V}) of every sequence in one launch.
//
// Two kernels, picked by the path capacity M (known on the host):
//
// Short paths (M <= kShortRows, every decoding round): a block owns one or more
// slabs of 32 vector columns of one (plane, sequence) and all M rows, a row per
// warp up to 16 rows and 2 or 4 rows per warp past that (so that every block of
// a Qwen3-8B-sized cache fits on the chip at once; for the shortest paths, more
// slabs per block make fewer blocks and a cheaper launch); it loads every row,
// synchronises, then stores. Reading everything
// before writing anything makes any overlap safe, and the kernel is a handful
// of instructions: at this size a round trip to memory and the launch are the
// whole cost. Unrolled code cost instruction-cache misses that showed up as time
// (bench/results/h100/kernel_notes.md), hence a warp per row rather than a loop per thread.
//
// Long paths: one warp owns a slab of 32 vector-wide columns of one (plane,
// sequence); each lane walks the accepted rows of its column in path order. Columns never alias
// each other, so lanes need no synchronisation for the data, and the in-order
// walk is what makes overlapping source/destination ranges safe: with accepted
// strictly increasing and accepted[j] >= j, the destination of row j can only
// coincide with the source of an earlier row i < j, which the lane has already
// loaded. Loads of later rows never alias an earlier destination, so the next
// chunk of rows is loaded before the current one is stored (two chunks in
// flight per lane), and the path offsets are staged in shared memory once per
// warp instead of being re-read by every lane in the dependent chain.
#include "kv_compact.cuh"

namespace jetspec::cuda {
namespace {

constexpr int kThreads = 32;     // lanes per warp: one vector column each
constexpr int kShortRows = 64;   // longest path of the short kernel
constexpr int kShortWarps = 16;  // most warps per block in the short kernel
constexpr int kRows = 16;        // rows per chunk of the long kernel; two chunks in flight per lane
constexpr int kOffsets = 1024;   // path offsets staged per pass of the long kernel

// Slots from `base` to the cache's end, 0 for a base outside [0, slots]: path offsets are compared with
// it, rather than forming base + offset, which a huge offset would wrap around into range.
__device__ __forceinline__ int64_t slots_from(int64_t base, int64_t slots) {
  return base >= 0 && base <= slots ? slots - base : 0;
}

template <typename Vec, int kShortUnroll>
__global__ void __launch_bounds__(kThreads * kShortWarps) kv_compact_short_kernel(KvCompactArgs a, int64_t cols) {
  // Grid (column blocks, sequences, planes): no integer division on the latency-critical path.
  const int64_t b = blockIdx.y, p = blockIdx.z;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t len = a.accept_len[b];
  len = len < 0 ? 0 : (len > a.max_accept ? a.max_accept : len);
  const int64_t base = a.base[b];
  const int64_t room = slots_from(base, a.slots);
  char* column = a.cache + p * a.plane_stride + b * a.batch_stride + col * static_cast<int64_t>(sizeof(Vec));
  Vec v[kShortUnroll];
  bool move[kShortUnroll];
#pragma unroll
  for (int k = 0; k < kShortUnroll; ++k) {
    const int64_t j = threadIdx.y + static_cast<int64_t>(k) * blockDim.y;
    const int64_t off = j < a.max_accept ? a.accepted[b * a.max_accept + j] : 0;
    // Out-of-range slots are skipped rather than trusted: a bad index must not fault the device.
    move[k] = col < cols && j < len && off != j && off >= 0 && off < room && j < room;
    if (move[k]) v[k] = *reinterpret_cast<const Vec*>(column + (base + off) * a.slot_stride);
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kShortUnroll; ++k) {
    const int64_t j = threadIdx.y + static_cast<int64_t>(k) * blockDim.y;
    if (move[k]) *reinterpret_cast<Vec*>(column + (base + j) * a.slot_stride) = v[k];
  }
}

template <typename Vec>
struct Chunk {
  Vec v[kRows];
  bool move[kRows];
};

template <typename Vec>
__device__ __forceinline__ void load_chunk(Chunk<Vec>& c, const char* column, const int* offsets, int64_t first,
                                           int64_t end, int64_t base, int64_t room, int64_t slot_stride) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t j = first + r;
    const int64_t off = j < end ? offsets[j % kOffsets] : 0;
    // Out-of-range slots are skipped rather than trusted: a bad index must not fault the device.
    c.move[r] = j < end && off != j && off >= 0 && off < room && j < room;
    if (c.move[r]) c.v[r] = *reinterpret_cast<const Vec*>(column + (base + off) * slot_stride);
  }
}

// Stores rows first_dst, first_dst + 1, ... of a loaded chunk.
template <typename Vec>
__device__ __forceinline__ void store_chunk(const Chunk<Vec>& c, char* column, int64_t first_dst, int64_t slot_stride) {
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    if (c.move[r]) *reinterpret_cast<Vec*>(column + (first_dst + r) * slot_stride) = c.v[r];
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads) kv_compact_long_kernel(KvCompactArgs a, int64_t cols) {
  __shared__ int offsets[kOffsets];
  // Grid (column slabs, sequences, planes): no integer division on the latency-critical path.
  const int64_t cb = blockIdx.x, b = blockIdx.y, p = blockIdx.z;
  const int64_t col = cb * kThreads + threadIdx.x;
  const int64_t* acc = a.accepted + b * a.max_accept;
  int64_t len = a.accept_len[b];
  const int64_t base = a.base[b];
  const int64_t room = slots_from(base, a.slots);
  // With no room (a base out of range included) nothing moves; no destination slot base + j is formed.
  len = len < 0 || room == 0 ? 0 : (len > a.max_accept ? a.max_accept : len);
  char* column = a.cache + p * a.plane_stride + b * a.batch_stride + col * static_cast<int64_t>(sizeof(Vec));
  const bool active = col < cols;

  // The first pass runs unconditionally and stages offsets up to the buffer's capacity, not up to len,
  // so their loads are issued together with len's instead of after it.
  int64_t first = 0;
  do {
    const int64_t staged = first + kOffsets < a.max_accept ? first + kOffsets : a.max_accept;
    // An offset outside [0, 2^31) is out of range of any cache the glue accepts: staged as -1, skipped.
    for (int64_t i = first + threadIdx.x; i < staged; i += kThreads) {
      const int64_t off = acc[i];
      offsets[i - first] = off >= 0 && off <= 0x7fffffff ? static_cast<int>(off) : -1;
    }
    __syncwarp();
    const int64_t end = staged < len ? staged : len;
    if (active) {
      Chunk<Vec> cur, next;
      load_chunk(cur, column, offsets, first, end, base, room, a.slot_stride);
      for (int64_t j = first; j < end; j += kRows) {
        if (j + kRows < end) load_chunk(next, column, offsets, j + kRows, end, base, room, a.slot_stride);
        store_chunk(cur, column, base + j, a.slot_stride);
        cur = next;
      }
    }
    __syncwarp();
    first += kOffsets;
  } while (first < len);
}

template <typename Vec>
cudaError_t launch(const KvCompactArgs& a, cudaStream_t stream) {
  const int64_t cols = a.row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
  if (col_blocks == 0 || a.batch == 0 || a.planes == 0 || a.max_accept == 0) return cudaSuccess;
  if (col_blocks > 0x7fffffff || a.batch > 65535 || a.planes > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(a.batch), static_cast<unsigned>(a.planes));
  if (a.max_accept <= kShortRows) {
    // Fewest rows per thread that fit: unrolled rows that are not there still cost instruction fetches.
    const int unroll = a.max_accept <= kShortWarps ? 1 : (a.max_accept <= 2 * kShortWarps ? 2 : 4);
    const int64_t rows = (a.max_accept + unroll - 1) / unroll;
    // Short paths leave room for several column slabs per block: fewer blocks, a cheaper launch.
    int64_t slabs = kShortWarps / rows;
    slabs = slabs < 1 ? 1 : (slabs > col_blocks ? col_blocks : slabs);
    const dim3 threads(static_cast<unsigned>(kThreads * slabs), static_cast<unsigned>(rows));
    const dim3 short_grid(static_cast<unsigned>((col_blocks + slabs - 1) / slabs), grid.y, grid.z);
    if (unroll == 1) kv_compact_short_kernel<Vec, 1><<<short_grid, threads, 0, stream>>>(a, cols);
    else if (unroll == 2) kv_compact_short_kernel<Vec, 2><<<short_grid, threads, 0, stream>>>(a, cols);
    else kv_compact_short_kernel<Vec, 4><<<short_grid, threads, 0, stream>>>(a, cols);
  } else {
    kv_compact_long_kernel<Vec><<<grid, kThreads, 0, stream>>>(a, cols);
  }
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
