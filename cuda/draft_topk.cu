// draft_topk: LM head + log-softmax normaliser + top-K in one pass over the weight, the R x V logits
// never leaving the chip.
//
// The op reads the whole [V, H] weight for a handful of rows, so it is a weight stream: its floor is the
// weight's bytes at memory bandwidth, and everything else has to hide under that stream.
//
// Kernel 1 (partial_kernel) splits V into one contiguous slice per CTA, as many CTAs as fit on the chip at
// once (two per SM), so that every SM streams and one wave finishes together. A CTA walks its slice in
// tiles of 128 weight rows, each tile in stages of 128 bytes per row, through a ring of shared-memory
// stages filled by 16-byte cp.async (3 to 5 stages: 64-128 KiB in flight per SM, what HBM needs to stay
// busy). The hidden rows ride along in every stage (their 128-byte slice, an L2 hit) instead of sitting in
// shared memory whole: 64 rows of H = 8192 would not fit, and the ring needs the room. Logits come from
// tensor cores (mma.sync m16n8k16, fp32 accumulate): the hidden rows are the A operand, 16 per m-tile, the
// weight rows are the column-major B operand as stored, and each warp owns 16 weight rows of the tile.
// Float32 inputs take the same path with CUDA-core FMAs in the same fragment layout (exact fp32 products;
// no tensor-core format keeps them).
//
// At the end of each tile every thread folds its logits into a running (max, sum exp) per row it owns and
// offers those above the row's current K-th best to a small per-row buffer; a warp per row merges the
// buffer into the CTA's sorted top-32 list (bitonic sort + merge across lanes). After the first tile
// almost nothing passes the threshold, so the selection costs a compare per logit. A full buffer leaves
// the rest pending for another round, so the buffer stays 32 entries for any K.
//
// Keys: a candidate is one uint64, the float's bits made order-preserving in the high word and the
// complemented id in the low word, so "larger key" is exactly "larger value, then lower id" — the tie
// rule of the CPU reference's stable sort — and every comparison is one integer compare. -0 is folded
// into +0 as float comparisons do. Key 0 (below every real key) marks an empty slot.
//
// Kernel 2 (combine_kernel), a block per row: logsumexp from the CTAs' (max, sum) pairs, and the top K of
// the CTAs' lists. The K-th largest list head is a lower bound of the K-th largest key (K lists have a key
// at least that large), which leaves at most K lists, at most K^2 survivors, typically about K; each
// survivor's rank is then counted directly and it writes itself to its slot.
#include "draft_topk.cuh"
#include "ptx.cuh"

namespace jetspec::cuda {
namespace {

using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::smem_addr;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 16 * kWarps;  // weight rows per tile: 16 per warp
constexpr int kChunkBytes = 128;        // bytes of every row per pipeline stage
constexpr int kPieces = kChunkBytes / 16;
constexpr int kListSize = 32;           // per-row top list: one key per lane
constexpr int kCandidates = 32;         // per-row buffer between merges: one key per lane
constexpr int kMaxTiles = 4;            // m-tiles of 16 hidden rows per launch
constexpr int kCombineThreads = 512;
constexpr int kSmemPerSm = 228 * 1024;  // sm_90
constexpr int kSmemPerBlockReserved = 1024;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kDraftTopkMaxK <= kListSize, "the lists hold K keys");

constexpr int cmin(int a, int b) { return a < b ? a : b; }

// Shared memory of kernel 1 for MT m-tiles: the stage ring, then the per-row lists, candidate buffers,
// per-warp (max, sum) pairs and candidate counts. As many stages as let two CTAs share an SM.
template <int MT>
struct Layout {
  static constexpr int kRows = 16 * MT;
  static constexpr int kStageBytes = (kTileRows + kRows) * kChunkBytes;
  static constexpr int kLists = 0;
  static constexpr int kCands = kLists + kRows * kListSize * 8;
  static constexpr int kStats = kCands + kRows * kCandidates * 8;
  static constexpr int kCounts = kStats + kWarps * kRows * 8;
  static constexpr int kFixedBytes = kCounts + kRows * 4;
  static constexpr int kStages = cmin(6, (kSmemPerSm / 2 - kSmemPerBlockReserved - kFixedBytes) / kStageBytes);
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kBytes = kRingBytes + kFixedBytes;
  static_assert(kStages >= 3, "a ring needs a stage landing, one being read and one being filled");
};

struct Problem {
  const char* hidden;
  int64_t hidden_stride;  // bytes
  const char* weight;
  int64_t weight_stride;  // bytes
  int64_t rows, vocab;
  int64_t row_bytes;      // H * element size, a multiple of 16
  int64_t k_stages;       // stages per tile: ceil(row_bytes / kChunkBytes)
  int k;
  float temperature;
  float2* stats;          // out: [ctas, rows] (max, sum exp) of each CTA's slice
  uint64_t* keys;         // out: [ctas, rows, k] each CTA's top k, descending
};

// ---- keys -------------------------------------------------------------------------------------------

__device__ __forceinline__ uint64_t make_key(float value, uint32_t id) {
  uint32_t u = __float_as_uint(value);
  u = u == 0x80000000u ? 0u : u;
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~id);
}

__device__ __forceinline__ float key_value(uint64_t key) {
  const uint32_t u = static_cast<uint32_t>(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ int64_t key_id(uint64_t key) { return ~static_cast<uint32_t>(key); }

__device__ __forceinline__ uint64_t umax(uint64_t a, uint64_t b) { return a > b ? a : b; }
__device__ __forceinline__ uint64_t umin(uint64_t a, uint64_t b) { return a < b ? a : b; }

// One compare-exchange of a bitonic network between lanes l and l ^ j.
__device__ __forceinline__ uint64_t exchange(uint64_t x, int j, bool keep_larger) {
  const uint64_t y = __shfl_xor_sync(kFull, x, j);
  return keep_larger ? umax(x, y) : umin(x, y);
}

// The warp's 32 keys (one per lane), sorted descending by lane.
__device__ __forceinline__ uint64_t warp_sort(uint64_t x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) x = exchange(x, j, ((lane & k) == 0) == ((lane & j) == 0));
  return x;
}

// The largest 32 of two descending warp lists, descending: pairing a's i-th with b's (31-i)-th keeps
// the top 32 as a bitonic sequence, which one half-cleaner cascade sorts.
__device__ __forceinline__ uint64_t warp_merge(uint64_t a, uint64_t b) {
  const int lane = threadIdx.x & 31;
  uint64_t x = umax(a, __shfl_sync(kFull, b, 31 - lane));
#pragma unroll
  for (int j = 16; j > 0; j >>= 1) x = exchange(x, j, (lane & j) == 0);
  return x;
}

// (max, sum of exp(x - max)) of the union of two sets; max = -inf marks an empty set.
__device__ __forceinline__ void merge_stats(float& m, float& s, float other_m, float other_s) {
  const float mx = fmaxf(m, other_m);
  if (mx == -INFINITY) return;
  s = s * __expf(m - mx) + other_s * __expf(other_m - mx);
  m = mx;
}

// ---- streaming --------------------------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1; zero-fills when !valid (src is then never read). The 256-byte
// L2 prefetch fetches the next stage's piece of the same row with this one: longer DRAM bursts.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// A row's 16-byte pieces sit XOR-swizzled by row: the 8 rows of an 8x8 ldmatrix (or the rows a warp's
// lanes read in the float32 path) then hit 8 different bank groups.
__device__ __forceinline__ int swizzle(int row, int piece) { return row * kChunkBytes + ((piece ^ (row & 7)) << 4); }

// Stage (tile starting at weight row v0, byte offset kb of every row): the tile's weight rows, then the
// 16 * MT hidden rows. Rows past the slice or the hidden rows, and bytes past H, are zero-filled.
template <int MT>
__device__ __forceinline__ void load_stage(const Problem& p, unsigned char* stage, int64_t v0, int64_t v_end,
                                           int64_t kb) {
  const int piece = threadIdx.x % kPieces;
  const int64_t offset = kb + piece * 16;
  const bool k_ok = offset < p.row_bytes;
  const uint32_t base = smem_addr(stage);
#pragma unroll
  for (int i = 0; i < kTileRows * kPieces / kThreads; ++i) {
    const int row = threadIdx.x / kPieces + i * (kThreads / kPieces);
    const bool ok = k_ok && v0 + row < v_end;
    cp_async16(base + swizzle(row, piece), ok ? p.weight + (v0 + row) * p.weight_stride + offset : p.weight, ok);
  }
  constexpr int kRows = 16 * MT;
  const uint32_t hidden_base = base + kTileRows * kChunkBytes;
#pragma unroll
  for (int i = 0; i < (kRows * kPieces + kThreads - 1) / kThreads; ++i) {
    const int row = (threadIdx.x + i * kThreads) / kPieces;
    if (row < kRows) {
      const bool ok = k_ok && row < p.rows;
      cp_async16(hidden_base + swizzle(row, piece), ok ? p.hidden + row * p.hidden_stride + offset : p.hidden, ok);
    }
  }
}

// ---- logits of one stage ----------------------------------------------------------------------------
//
// acc[mt][nb][h * 2 + j]: hidden row mt * 16 + h * 8 + lane / 4 against weight row (of the tile)
// warp * 16 + nb * 8 + 2 * (lane % 4) + j — the m16n8 accumulator fragment, for every dtype.

template <DraftTopkDtype D, int MT>
__device__ __forceinline__ void stage_logits(const unsigned char* stage, float (&acc)[MT][2][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned char* hidden = stage + kTileRows * kChunkBytes;
  if constexpr (D == DraftTopkDtype::kFloat32) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll 2  // unrolled further, the hoisted loads of 3-4 m-tiles spill
    for (int piece = 0; piece < kPieces; ++piece) {
      float4 w[2][2];
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          w[nb][j] = *reinterpret_cast<const float4*>(stage + swizzle(warp * 16 + nb * 8 + 2 * t + j, piece));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float4 a = *reinterpret_cast<const float4*>(hidden + swizzle(mt * 16 + h * 8 + g, piece));
#pragma unroll
          for (int nb = 0; nb < 2; ++nb)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              float& c = acc[mt][nb][h * 2 + j];
              c = fmaf(a.x, w[nb][j].x, c);
              c = fmaf(a.y, w[nb][j].y, c);
              c = fmaf(a.z, w[nb][j].z, c);
              c = fmaf(a.w, w[nb][j].w, c);
            }
        }
    }
  } else {
    // ldmatrix x4: lanes 8q..8q+7 address matrix q. B: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) of the
    // warp's 16 weight rows give b0, b1 of both n8 blocks; A: (rows 0-7 | 8-15) x (k 0-7 | 8-15) give a0..a3.
    const int q = lane >> 3, r8 = lane & 7;
    const uint32_t w_base = smem_addr(stage), h_base = smem_addr(hidden);
    const int w_row = warp * 16 + (q >> 1) * 8 + r8;
#pragma unroll
    for (int ks = 0; ks < kPieces / 2; ++ks) {
      uint32_t b[4];
      ldmatrix_x4(b, w_base + swizzle(w_row, 2 * ks + (q & 1)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a, h_base + swizzle(mt * 16 + (q & 1) * 8 + r8, 2 * ks + (q >> 1)));
        ptx::mma16816<D == DraftTopkDtype::kBFloat16>(acc[mt][0], a, b[0], b[1]);
        ptx::mma16816<D == DraftTopkDtype::kBFloat16>(acc[mt][1], a, b[2], b[3]);
      }
    }
  }
}

// ---- selection at the end of a tile ---------------------------------------------------------------

struct RowsSmem {
  uint64_t* lists;  // [16 * MT][kListSize], descending; entry k - 1 is the row's threshold
  uint64_t* cands;  // [16 * MT][kCandidates]
  int* counts;      // [16 * MT]
};

template <int MT>
__device__ __forceinline__ void select_tile(const Problem& p, float (&acc)[MT][2][4], float (&run_max)[MT][2],
                                            float (&run_sum)[MT][2], const RowsSmem& s, int64_t v0,
                                            int64_t v_end) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int64_t col0 = v0 + warp * 16 + 2 * (lane & 3);
  uint32_t pending = 0;  // bit mt * 8 + nb * 4 + h * 2 + j: logit still to offer
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_ok = mt * 16 + h * 8 + g < p.rows;
      float tile_max = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const bool live = row_ok && col0 + nb * 8 + j < v_end;
          float& x = acc[mt][nb][h * 2 + j];
          x = live ? __fdiv_rn(x, p.temperature) : -INFINITY;  // rounded as the reference's division
          tile_max = fmaxf(tile_max, x);
          pending |= static_cast<uint32_t>(live) << (mt * 8 + nb * 4 + h * 2 + j);
        }
      if (tile_max != -INFINITY) {
        const float m = fmaxf(run_max[mt][h], tile_max);
        float sum = run_sum[mt][h] * __expf(run_max[mt][h] - m);
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int j = 0; j < 2; ++j) sum += __expf(acc[mt][nb][h * 2 + j] - m);
        run_max[mt][h] = m;
        run_sum[mt][h] = sum;
      }
    }

  do {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = mt * 16 + h * 8 + g;
        const uint64_t threshold = s.lists[row * kListSize + p.k - 1];
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const uint32_t bit = 1u << (mt * 8 + nb * 4 + h * 2 + j);
            if (pending & bit) {
              const uint64_t key = make_key(acc[mt][nb][h * 2 + j], static_cast<uint32_t>(col0 + nb * 8 + j));
              if (key > threshold) {
                const int slot = atomicAdd(&s.counts[row], 1);
                if (slot < kCandidates) {  // else offered again, against the threshold after the merge
                  s.cands[row * kCandidates + slot] = key;
                  pending &= ~bit;
                }
              } else {
                pending &= ~bit;
              }
            }
          }
      }
    __syncthreads();
    for (int row = warp; row < p.rows; row += kWarps) {
      const int n = s.counts[row];
      if (n == 0) continue;
      const uint64_t cand = lane < n ? s.cands[row * kCandidates + lane] : 0;
      uint64_t* list = s.lists + row * kListSize;
      list[lane] = warp_merge(list[lane], warp_sort(cand));
      __syncwarp();  // every lane has read the count
      if (lane == 0) s.counts[row] = 0;
    }
  } while (__syncthreads_or(pending != 0));
}

// ---- kernel 1: one V-slice per CTA -------------------------------------------------------------------

template <DraftTopkDtype D, int MT>
__global__ void __launch_bounds__(kThreads, 2) partial_kernel(const Problem p) {
  using L = Layout<MT>;
  constexpr int kRows = L::kRows;
  constexpr int kStages = L::kStages;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* fixed = smem + L::kRingBytes;
  const RowsSmem rs{reinterpret_cast<uint64_t*>(fixed + L::kLists), reinterpret_cast<uint64_t*>(fixed + L::kCands),
                    reinterpret_cast<int*>(fixed + L::kCounts)};
  float2* warp_stats = reinterpret_cast<float2*>(fixed + L::kStats);  // [kWarps][kRows]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t v_begin = blockIdx.x * p.vocab / gridDim.x;
  const int64_t v_end = (blockIdx.x + 1) * p.vocab / gridDim.x;
  const int64_t stages = (v_end - v_begin + kTileRows - 1) / kTileRows * p.k_stages;

  // Visible to the first selection through the main loop's barriers.
  for (int i = threadIdx.x; i < kRows * kListSize; i += kThreads) rs.lists[i] = 0;
  for (int i = threadIdx.x; i < kRows; i += kThreads) rs.counts[i] = 0;

  float acc[MT][2][4] = {};
  float run_max[MT][2], run_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) run_max[mt][h] = -INFINITY, run_sum[mt][h] = 0.f;

  // Loads run kStages - 1 stages ahead of the logits; stage i lives in slot i % kStages.
  int64_t load_v0 = v_begin, load_k = 0, loaded = 0;
  int load_slot = 0;
  auto load_next = [&]() {
    load_stage<MT>(p, smem + load_slot * L::kStageBytes, load_v0, v_end, load_k * kChunkBytes);
    load_slot = load_slot + 1 == kStages ? 0 : load_slot + 1;
    if (++load_k == p.k_stages) load_k = 0, load_v0 += kTileRows;
    ++loaded;
  };
  for (int i = 0; i < kStages - 1; ++i) {
    if (loaded < stages) load_next();
    cp_async_commit();  // one group per stage, empty or not, so that wait_group counts stages
  }

  int64_t v0 = v_begin, k = 0;
  int slot = 0;
  for (int64_t i = 0; i < stages; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for every thread; slot (i - 1) % kStages is free to refill
    if (loaded < stages) load_next();
    cp_async_commit();
    stage_logits<D, MT>(smem + slot * L::kStageBytes, acc);
    slot = slot + 1 == kStages ? 0 : slot + 1;
    if (++k == p.k_stages) {
      select_tile<MT>(p, acc, run_max, run_sum, rs, v0, v_end);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nb][e] = 0.f;
      k = 0;
      v0 += kTileRows;
    }
  }
  cp_async_wait<0>();

  // The four lanes of a quad share rows; then the warps, through shared memory.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = run_max[mt][h], sum = run_sum[mt][h];
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        const float om = __shfl_xor_sync(kFull, m, off), os = __shfl_xor_sync(kFull, sum, off);
        merge_stats(m, sum, om, os);
      }
      if ((lane & 3) == 0) warp_stats[warp * kRows + mt * 16 + h * 8 + (lane >> 2)] = make_float2(m, sum);
    }
  __syncthreads();
  for (int64_t row = threadIdx.x; row < p.rows; row += kThreads) {
    float m = -INFINITY, sum = 0.f;
    for (int w = 0; w < kWarps; ++w) merge_stats(m, sum, warp_stats[w * kRows + row].x, warp_stats[w * kRows + row].y);
    p.stats[blockIdx.x * p.rows + row] = make_float2(m, sum);
  }
  for (int64_t i = threadIdx.x; i < p.rows * p.k; i += kThreads) {
    const int64_t row = i / p.k;
    p.keys[blockIdx.x * p.rows * p.k + i] = rs.lists[row * kListSize + (i - row * p.k)];
  }
}

// ---- kernel 2: one block per row ---------------------------------------------------------------------

__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const float2* stats, const uint64_t* keys,
                                                                  int ctas, int rows, int k, float* logprobs,
                                                                  int64_t* ids) {
  extern __shared__ uint64_t candidates[];  // [ctas][k] this row's lists, then [k * k] survivors
  uint64_t* survivors = candidates + ctas * k;
  __shared__ float2 warp_stats[kCombineThreads / 32];
  __shared__ unsigned long long threshold;
  __shared__ int survivor_count;
  const int row = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) threshold = 0, survivor_count = 0;
  for (int i = threadIdx.x; i < ctas * k; i += kCombineThreads) {
    const int c = i / k;
    candidates[i] = keys[(static_cast<int64_t>(c) * rows + row) * k + (i - c * k)];
  }
  float m = -INFINITY, sum = 0.f;
  for (int c = threadIdx.x; c < ctas; c += kCombineThreads) {
    const float2 st = stats[static_cast<int64_t>(c) * rows + row];
    merge_stats(m, sum, st.x, st.y);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(kFull, m, off), os = __shfl_xor_sync(kFull, sum, off);
    merge_stats(m, sum, om, os);
  }
  if (lane == 0) warp_stats[warp] = make_float2(m, sum);
  __syncthreads();
  m = -INFINITY, sum = 0.f;
  for (int w = 0; w < kCombineThreads / 32; ++w) merge_stats(m, sum, warp_stats[w].x, warp_stats[w].y);
  const float lse = m + __logf(sum);

  // The K-th largest head (or 0, keeping everything, with fewer than K lists).
  for (int c = threadIdx.x; c < ctas; c += kCombineThreads) {
    const uint64_t head = candidates[c * k];
    int at_least = 0;
    for (int j = 0; j < ctas; ++j) at_least += candidates[j * k] >= head;
    if (at_least >= k) atomicMax(&threshold, static_cast<unsigned long long>(head));
  }
  __syncthreads();
  const uint64_t bound = threshold;
  for (int i = threadIdx.x; i < ctas * k; i += kCombineThreads) {
    if (candidates[i] >= bound) {
      const int slot = atomicAdd(&survivor_count, 1);
      if (slot < k * k) survivors[slot] = candidates[i];
    }
  }
  __syncthreads();
  const int n = survivor_count < k * k ? survivor_count : k * k;
  for (int i = threadIdx.x; i < n; i += kCombineThreads) {
    const uint64_t key = survivors[i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += survivors[j] > key;
    if (rank < k) {
      logprobs[static_cast<int64_t>(row) * k + rank] = key_value(key) - lse;
      ids[static_cast<int64_t>(row) * k + rank] = key_id(key);
    }
  }
}

// ---- host --------------------------------------------------------------------------------------------

using PartialKernel = void (*)(Problem);

template <DraftTopkDtype D>
PartialKernel partial_for(int mt, int* smem) {
  switch (mt) {
    case 1: *smem = Layout<1>::kBytes; return partial_kernel<D, 1>;
    case 2: *smem = Layout<2>::kBytes; return partial_kernel<D, 2>;
    case 3: *smem = Layout<3>::kBytes; return partial_kernel<D, 3>;
    default: *smem = Layout<4>::kBytes; return partial_kernel<D, 4>;
  }
}

struct Launch {
  PartialKernel kernel;
  int smem;
  int ctas;
};

// Kernel 1 for a launch of `rows` hidden rows: as many CTAs as are resident at once, at most a tile each.
cudaError_t plan(const DraftTopkArgs& a, int64_t rows, Launch* out) {
  const int mt = static_cast<int>((rows + 15) / 16);
  switch (a.dtype) {
    case DraftTopkDtype::kBFloat16: out->kernel = partial_for<DraftTopkDtype::kBFloat16>(mt, &out->smem); break;
    case DraftTopkDtype::kFloat16: out->kernel = partial_for<DraftTopkDtype::kFloat16>(mt, &out->smem); break;
    default: out->kernel = partial_for<DraftTopkDtype::kFloat32>(mt, &out->smem); break;
  }
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(out->kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, out->smem);
  // All of L1 as shared memory (the weight bypasses L1): two CTAs' rings per SM.
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(out->kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, out->kernel, kThreads, out->smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int64_t tiles = (a.vocab + kTileRows - 1) / kTileRows;
  out->ctas = static_cast<int>(tiles < static_cast<int64_t>(per_sm) * sms ? tiles : static_cast<int64_t>(per_sm) * sms);
  return cudaSuccess;
}

int64_t partial_bytes(int64_t ctas, int64_t rows, int k) { return ctas * rows * (1 + k) * 8; }

constexpr int64_t kLaunchRows = 16 * kMaxTiles;

}  // namespace

cudaError_t draft_topk_workspace(const DraftTopkArgs& a, int64_t* bytes) {
  *bytes = 0;
  // Full launches of kLaunchRows rows, then the rest: two shapes at most.
  for (int64_t rows : {a.rows < kLaunchRows ? a.rows : kLaunchRows, a.rows % kLaunchRows}) {
    if (rows == 0) continue;
    Launch l{};
    if (const cudaError_t err = plan(a, rows, &l); err != cudaSuccess) return err;
    const int64_t need = partial_bytes(l.ctas, rows, a.k);
    *bytes = need > *bytes ? need : *bytes;
  }
  return cudaSuccess;
}

cudaError_t draft_topk(const DraftTopkArgs& a, void* workspace, cudaStream_t stream) {
  const int64_t es = a.dtype == DraftTopkDtype::kFloat32 ? 4 : 2;
  const int64_t row_bytes = a.hidden_size * es;
  if (a.k < 1 || a.k > kDraftTopkMaxK || a.k > a.vocab || a.vocab > 0x7fffffff || a.hidden_size < 1 ||
      row_bytes % 16 != 0 || !(a.temperature > 0.f))
    return cudaErrorInvalidValue;
  for (int64_t first = 0; first < a.rows; first += kLaunchRows) {
    const int64_t rows = a.rows - first < kLaunchRows ? a.rows - first : kLaunchRows;
    Launch l{};
    if (const cudaError_t err = plan(a, rows, &l); err != cudaSuccess) return err;
    Problem p{};
    p.hidden = static_cast<const char*>(a.hidden) + first * a.hidden_stride * es;
    p.hidden_stride = a.hidden_stride * es;
    p.weight = static_cast<const char*>(a.weight);
    p.weight_stride = a.weight_stride * es;
    p.rows = rows;
    p.vocab = a.vocab;
    p.row_bytes = row_bytes;
    p.k_stages = (row_bytes + kChunkBytes - 1) / kChunkBytes;
    p.k = a.k;
    p.temperature = a.temperature;
    p.stats = static_cast<float2*>(workspace);
    p.keys = reinterpret_cast<uint64_t*>(p.stats + l.ctas * rows);
    l.kernel<<<l.ctas, kThreads, l.smem, stream>>>(p);

    const size_t combine_smem = static_cast<size_t>(l.ctas + a.k) * a.k * sizeof(uint64_t);
    cudaError_t err = cudaFuncSetAttribute(combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(combine_smem));
    if (err != cudaSuccess) return err;
    combine_kernel<<<static_cast<unsigned>(rows), kCombineThreads, combine_smem, stream>>>(
        p.stats, p.keys, l.ctas, static_cast<int>(rows), a.k, a.logprobs + first * a.k, a.ids + first * a.k);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace jetspec::cuda
