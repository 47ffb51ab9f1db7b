// tree_attention: the queries of N tree nodes over a committed prefix (unmasked) plus the tree's own
// keys under its packed ancestor mask, flash-attention style.
//
// Rows. The q_heads / kv_heads query heads that share a kv head are packed with the nodes into one
// row space, row = node * group + head-in-group, so a block reads each K/V tile once for every query
// head of its kv head (GQA costs no extra K/V traffic). A block owns kRows consecutive rows of one
// (sequence, kv head); a warp owns 16 or 32 of them (one or two m16 tiles: with two, every K/V
// fragment read from shared memory feeds two tensor-core products, which halves the shared-memory
// traffic per FLOP and is what makes the mma.sync tile compute-bound rather than ldmatrix-bound). The
// m-tiles interleave across a block's warps so that each m-tile of 4 consecutive warps is one 64-row
// wgmma tile.
//
// Keys. Tiles of kKeys keys stream through a kStages-deep ring of 128-byte rows with XOR-swizzled
// 16-byte chunks (ldmatrix reads hit 8 distinct bank groups, and the layout is wgmma's 128-byte
// swizzle). On sm_90a one thread asks the copy engine (TMA) for each tile, completing on a per-stage
// mbarrier: issuing 16-byte cp.async copies from every thread cost the 4-warp blocks ~4% of their time
// in address arithmetic and issue slots. Elsewhere (and if the driver cannot describe the cache view)
// every thread copies with cp.async. On sm_90a the warpgroup blocks run S = Q K^T as warpgroup MMAs with
// both operands in shared memory and O += P V with P from the score registers and V read in place
// (transposed descriptor); elsewhere, and for the 1-warp decode block, both run on mma.sync m16n8k16.
// The large trees' block on sm_90a is warp-specialised (see tree_attention_specialised_kernel).
// Accumulators are fp32; the online softmax is in fp32 and base 2 (the scale is folded into the
// exponent). Tiles entirely inside the prefix need no mask; the few that reach the tree block test the
// ancestor bits, fetched as 64-bit windows per row and tile. Node order puts every ancestor before its
// descendants, so a block's keys end right after its last node's own key.
//
// Splits (flash-decoding). A short tree gives few blocks (one per kv head for N = 1), so the key range
// is cut into `splits` parts whose partial (normalised output, log-sum-exp) go to fp32 buffers and a
// second kernel merges them. The split count is chosen on the host from shapes and the max_prefix
// bound; each block derives its key range from the actual prefix_len on the device, so any prefix
// length stays correct (splits that get no keys write an empty partial).
#include "tree_attention.cuh"
#include "ptx.cuh"

#include <cuda.h>  // CUtensorMap and its encoder's signature (the encoder itself comes from the runtime)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace jetspec::cuda {
namespace {

using ptx::cp_async_wait;
using ptx::smem_addr;

constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim_, int kWarps_, int kMTiles_, int kKeys_, int kStages_, bool kSpecialised_ = false>
struct Tile {
  static constexpr int kHeadDim = kHeadDim_, kWarps = kWarps_, kMTiles = kMTiles_, kKeys = kKeys_,
                       kStages = kStages_;
  // A warp-specialised block (sm_90a only) adds a producer warpgroup to the kWarps warps that hold rows.
  static constexpr bool kSpecialised = kSpecialised_;
  static constexpr bool kWarpgroup = kWarps % 4 == 0;  // can run wgmma (on sm_90a)
  static constexpr int kThreads = 32 * kWarps;         // the threads that hold rows
  static constexpr int kLaunchThreads = kThreads + (kSpecialised ? 128 : 0);
  static constexpr int kRows = 16 * kMTiles * kWarps;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kKvBytes = kKeys * kRowBytes;  // one K (or V) tile in shared memory
  // Q, the K and V rings, two 8-byte mbarriers per stage (filled, and emptied: used by tensor copies)
  // and a word per warp.
  static constexpr int kSmem = kRows * kRowBytes + 2 * kStages * kKvBytes + 16 * kStages + 4 * kWarps;
  // Tiles are stored as head_dim / 64 column regions of 128-byte rows (the wgmma 128-byte swizzle atom).
  static constexpr int kQRegion = kRows * 128, kKvRegion = kKeys * 128;
  static_assert(kKeys == 32 || kKeys % 64 == 0, "ancestor windows of 64 bits");
  static_assert((kRows * kChunks) % kThreads == 0 && (kKeys * kChunks) % kThreads == 0, "even copy split");
  static_assert(kThreads % kChunks == 0, "a thread copies one chunk column");
};

// Block shapes, by rows (query heads per kv head x nodes): decoding (<= 16 rows) and short trees
// (<= 64) are bound by K/V bytes, so they keep deep pipelines and waste few tensor-core rows; larger
// trees take a compute-bound 128-row tile. At head_dim 128 its O accumulators take 128 registers a
// thread when one warpgroup holds all 128 rows (two m-tiles per warp). With mma.sync, 64-key score tiles
// (64 more, plus the K/V fragments) spill, so that tile uses 32-key tiles and a deeper ring. With wgmma
// (sm_90a) the operands stay in shared memory and 64-key tiles fit (249 registers).
// On sm_90a the 128 rows are normally split between two warpgroups of one m-tile each, fed by a producer
// warpgroup (the specialised tile, one block per SM): a warpgroup's softmax runs while the other's
// products use the tensor cores, which the single-warpgroup block could only get from a second block per
// SM whose phases drift into step with its own. With 64 rows a warpgroup, 128-key tiles fit (O 64, S 64
// and P 32 registers): twice the products per softmax pass, barrier and wait, and half the Q reads per
// FLOP; 64-key tiles and two-stage rings were measured slower (bench/results/h100/specialised/; three
// 128-key stages fill shared memory). The single-warpgroup wgmma tile remains for when the driver cannot
// describe the cache to the copy engine.
enum TileKind : int { kSmall = 0, kMedium = 1, kLarge = 2, kLargeSpecialised = 3 };
template <int D> using SmallTile = Tile<D, 1, 1, 64, 3>;
template <int D> using MediumTile = Tile<D, 4, 1, 64, 3>;
template <int D> using LargeTile = std::conditional_t<D == 128, Tile<D, 4, 2, 32, 4>, Tile<D, 4, 2, 64, 3>>;
template <int D> using LargeWgmmaTile = Tile<D, 4, 2, 64, 2>;
template <int D> using LargeSpecialisedTile = Tile<D, 8, 1, 128, 3, true>;

int tile_kind(int rows, bool wgmma) {
  return rows <= 16 ? kSmall : (rows <= 64 ? kMedium : (wgmma ? kLargeSpecialised : kLarge));
}
int tile_rows(int kind) { return kind == kSmall ? 16 : (kind == kMedium ? 64 : 128); }

struct Params {
  TreeAttentionArgs a;
  int group;  // query heads per kv head
  int row_tiles, splits;
  float* part_o;    // [splits, batch * nodes * q_heads, head_dim]
  float* part_lse;  // [splits, batch * nodes * q_heads], base 2
  // Tensor maps of K and V ([batch, slots, kv_heads, head_dim] boxes of kKeys x 64 columns, 128-byte
  // swizzle) when the copy engine fills the K/V rings (wgmma blocks); else each thread issues cp.async.
  bool tensor_copies;
  CUtensorMap k_map, v_map;
};

// Out-of-range rows are zero-filled (src-size 0): their products stay finite and are masked or dropped.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, sizeof(r));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, sizeof(r));
  }
  return r;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile stored as 64-column regions of `region`
// bytes, 128-byte rows, chunks XOR-swizzled by the row: the layout both ldmatrix (8 distinct bank groups
// per 8 rows) and wgmma's 128-byte-swizzle descriptors read.
__device__ __forceinline__ uint32_t swizzle(int row, int chunk, int region) {
  return (chunk >> 3) * region + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// First row of warp `warp`'s m-tile `mt` within the block: m-tiles are interleaved across the warps so
// that each m-tile of 4 consecutive warps is one 64-row wgmma tile.
template <typename Cfg>
__device__ __forceinline__ int tile_row(int warp, int mt) {
  return 16 * (mt * Cfg::kWarps + warp);
}

// Bit x set <=> key (prefix + first + x) is visible to `node`: a prefix key (first + x < 0), or tree
// key j = first + x with j <= node and bit j of the node's ancestor row set.
__device__ __forceinline__ uint64_t visible_bits(const int32_t* row, int words, int node, int first) {
  auto word = [&](int w) -> uint64_t {
    if (w < 0) return 0xffffffffull;
    return w < words ? static_cast<uint32_t>(__ldg(row + w)) : 0ull;
  };
  const int q = first >> 5, r = first & 31;  // floor division: first may be negative
  uint64_t bits = (word(q) | (word(q + 1) << 32)) >> r;
  if (r) bits |= word(q + 2) << (64 - r);
  const int keep = node - first + 1;  // bits [0, keep) are keys up to the node itself
  if (keep < 64) bits &= keep <= 0 ? 0ull : ((1ull << keep) - 1);
  return bits;
}

// max or sum (op) of this thread's scores of one row of an m-tile (elements 2 hf and 2 hf + 1 of the
// 8-key column tiles [kFirst, kFirst + kCount)) as a balanced tree: a dependent chain log2(keys) deep
// rather than one step per key. Recursion rather than loops over an array: for 16 column tiles the
// unroller left such loops rolled and the array in local memory.
template <int kFirst, int kCount, int kTiles, typename Op>
__device__ __forceinline__ float row_reduce(const float (&s)[kTiles][4], int hf, Op op) {
  if constexpr (kCount == 1) {
    return op(s[kFirst][2 * hf], s[kFirst][2 * hf + 1]);
  } else {
    static_assert(kCount % 2 == 0, "a power of two");
    return op(row_reduce<kFirst, kCount / 2>(s, hf, op), row_reduce<kFirst + kCount / 2, kCount / 2>(s, hf, op));
  }
}

// The rows and keys of this block, from the grid and the sequence's prefix length.
struct BlockSpan {
  int row0, rows;            // the block's first row; rows of its (sequence, kv head)
  int prefix, key_end;       // keys past key_end are visible to none of the block's rows
  int tile_begin, tile_end;  // this split's key tiles
  int split, h, b;
};

template <typename Cfg>
__device__ __forceinline__ BlockSpan block_span(const Params& p) {
  const TreeAttentionArgs& a = p.a;
  BlockSpan s;
  s.split = blockIdx.x / p.row_tiles;
  s.h = blockIdx.y;
  s.b = blockIdx.z;
  s.rows = p.group * a.nodes;
  s.row0 = (blockIdx.x % p.row_tiles) * Cfg::kRows;
  // Out-of-contract prefix lengths are clamped rather than trusted: a bad value must not fault.
  const int64_t raw_prefix = a.prefix_len[s.b];
  s.prefix = static_cast<int>(raw_prefix < 0 ? 0 : (raw_prefix > a.slots - a.nodes ? a.slots - a.nodes : raw_prefix));
  const int last_node = (min(s.row0 + Cfg::kRows, s.rows) - 1) / p.group;
  s.key_end = s.prefix + last_node + 1;
  const int tiles = (s.key_end + Cfg::kKeys - 1) / Cfg::kKeys;
  const int per_split = (tiles + p.splits - 1) / p.splits;
  s.tile_begin = s.split * per_split;
  s.tile_end = min(tiles, s.tile_begin + per_split);
  return s;
}

// cp.async of rows [first, first + kCount) of the block's Q tile, by kCopiers threads (tid among them).
template <typename T, typename Cfg, int kCount, int kCopiers>
__device__ __forceinline__ void load_q(const Params& p, const BlockSpan& sp, uint32_t s_q, int first, int tid) {
  const TreeAttentionArgs& a = p.a;
  const T* q_base = static_cast<const T*>(a.query) + sp.b * a.q_batch_stride;
#pragma unroll
  for (int i = 0; i < kCount * Cfg::kChunks / kCopiers; ++i) {
    const int c = tid + i * kCopiers, r = first + c / Cfg::kChunks, ch = c % Cfg::kChunks;
    const int row = sp.row0 + r;
    const bool valid = row < sp.rows;
    const int node = row / p.group, head = sp.h * p.group + (row - node * p.group);
    const T* src = valid ? q_base + node * a.q_node_stride + head * a.q_head_stride + ch * 8 : q_base;
    cp_async16(s_q + swizzle(r, ch, Cfg::kQRegion), src, valid);
  }
  cp_async_commit();
}

// Keys of the tree block that a row may not see get score -inf; the tile starts at key t * kKeys.
template <typename Cfg, int kKeyTiles>
__device__ __forceinline__ void mask_tree_keys(float (&s)[Cfg::kMTiles][kKeyTiles][4], const Params& p,
                                               const BlockSpan& sp, int t, int warp, int lane) {
  const TreeAttentionArgs& a = p.a;
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = min(sp.row0 + tile_row<Cfg>(warp, mt) + (lane >> 2) + 8 * hf, sp.rows - 1);
      const int node = row / p.group;
      const int32_t* words = a.ancestors + (static_cast<int64_t>(sp.b) * a.nodes + node) * a.words;
#pragma unroll
      for (int w = 0; w < (Cfg::kKeys + 63) / 64; ++w) {  // 64-key windows
        const uint64_t bits =
            visible_bits(words, a.words, node, t * Cfg::kKeys + 64 * w - sp.prefix) >> (2 * (lane & 3));
#pragma unroll
        for (int n = 0; n < min(kKeyTiles - 8 * w, 8); ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (!((bits >> (8 * n + e)) & 1)) s[mt][8 * w + n][2 * hf + e] = -INFINITY;
      }
    }
}

// Keys of the tree block [first, end) (tile-relative) of a V tile in shared memory get their NaN and inf
// values replaced by 0, by thread `tid` of the block's Cfg::kThreads: chunks tid, tid + kThreads, ..., the
// chunks this thread copies with cp.async, so that it may read them once its own copies are complete. A
// key a row may not see has probability 0, but P V adds 0 times its value, a NaN for a NaN or an inf.
// Returns whether this thread found such a value; the rows that see it get it from add_nonfinite_values.
template <typename T, typename Cfg>
__device__ __forceinline__ bool zero_nonfinite_v(uint32_t v_tile, int first, int end, int tid) {
  constexpr uint32_t kExponent = std::is_same_v<T, __nv_bfloat16> ? 0x7f80u : 0x7c00u;  // all set: NaN or inf
  constexpr uint32_t kPair = kExponent * 0x10001u;
  const int lo = first * Cfg::kChunks;
  bool found = false;
  for (int c = lo > tid ? tid + (lo - tid + Cfg::kThreads - 1) / Cfg::kThreads * Cfg::kThreads : tid;
       c < end * Cfg::kChunks; c += Cfg::kThreads) {
    const uint32_t addr = v_tile + swizzle(c / Cfg::kChunks, c % Cfg::kChunks, Cfg::kKvRegion);
    const uint4 v = ptx::ld_shared_v4(addr);
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
    bool any = false;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t x = (w[i] & kPair) ^ kPair;  // a 16-bit half of x is 0 where its value is non-finite
      any |= ((x - 0x10001u) & ~x & 0x80008000u) != 0;
    }
    if (any) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (((w[i] >> (16 * h)) & kExponent) == kExponent) w[i] &= ~(0xffffu << (16 * h));
      ptx::st_shared_v4(addr, make_uint4(w[0], w[1], w[2], w[3]));
      found = true;
    }
  }
  return found;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return __half2float(x);
}

// After zero_nonfinite_v found a value in the tile: the NaN and inf values of the tree keys [first, end)
// (absolute key indices) that a row sees go into its O accumulators, read again from the cache, as P V
// adds them (P > 0 times inf is inf, times NaN is NaN). Rare: only where the cache holds such values.
template <typename T, typename Cfg, int kDimTiles>
__device__ __forceinline__ void add_nonfinite_values(float (&o)[Cfg::kMTiles][kDimTiles][4], const Params& p,
                                                      const BlockSpan& sp, int first, int end, int warp, int lane) {
  const TreeAttentionArgs& a = p.a;
  const T* v_base = static_cast<const T*>(a.value) + sp.b * a.v_batch_stride + sp.h * a.v_head_stride + 2 * (lane & 3);
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = sp.row0 + tile_row<Cfg>(warp, mt) + (lane >> 2) + 8 * hf;
      if (row >= sp.rows) continue;
      const int node = row / p.group;
      const int32_t* words = a.ancestors + (static_cast<int64_t>(sp.b) * a.nodes + node) * a.words;
      for (int key = first; key < end; ++key) {
        const int j = key - sp.prefix;
        if (j > node || !((__ldg(words + (j >> 5)) >> (j & 31)) & 1)) continue;
        const T* v = v_base + key * a.v_slot_stride;
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = to_float(v[8 * n + e]);
            if (!isfinite(x)) o[mt][n][2 * hf + e] += x;
          }
      }
    }
}

// A row keeps its running max until a tile's max exceeds it by more than 2^kStaleLog2 in the
// exponentials: P and the sums may then reach 2^kStaleLog2, harmless in fp32 accumulators and in P's
// 8-bit exponent, and O is rescaled (a multiply per accumulator) only at such jumps instead of at every
// increase. The result is the same softmax: every exponential and the final sum share one base.
constexpr float kStaleLog2 = 8.f;

// One tile of the online softmax (base 2, the scale, positive, folded into the exponent): s becomes the
// exponentials of the scores against the running max m, l the running sum.
// Returns whether the max of any row of the warp moved, in which case O must be multiplied by
// `correction` before the tile's P V is added.
template <int kMT, int kKeyTiles>
__device__ __forceinline__ bool online_softmax(float (&s)[kMT][kKeyTiles][4], float (&m)[kMT][2], float (&l)[kMT][2],
                                               float (&correction)[kMT][2], float scale_log2) {
  bool moved = false;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = row_reduce<0, kKeyTiles>(s[mt], hf, [](float x, float y) { return fmaxf(x, y); });
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // Also true for the first visible key (m = -inf); false while the row sees no key (both -inf: NaN).
      const bool move = (mx - m[mt][hf]) * scale_log2 > kStaleLog2;
      correction[mt][hf] = move ? exp2f((m[mt][hf] - mx) * scale_log2) : 1.f;
      moved |= move;
      if (move) m[mt][hf] = mx;
      // A row with no visible key yet keeps max -inf; exponentiate against 0 so that it stays 0, not NaN.
      const float base = m[mt][hf] == -INFINITY ? 0.f : m[mt][hf] * scale_log2;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int i = 0; i < 2; ++i) s[mt][n][2 * hf + i] = exp2f(fmaf(s[mt][n][2 * hf + i], scale_log2, -base));
      const float sum = row_reduce<0, kKeyTiles>(s[mt], hf, [](float x, float y) { return x + y; });
      l[mt][hf] = fmaf(l[mt][hf], correction[mt][hf], sum);
    }
  return __any_sync(0xffffffffu, moved);
}

template <int kMT, int kDimTiles>
__device__ __forceinline__ void rescale(float (&o)[kMT][kDimTiles][4], const float (&correction)[kMT][2]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      o[mt][n][0] *= correction[mt][0];
      o[mt][n][1] *= correction[mt][0];
      o[mt][n][2] *= correction[mt][1];
      o[mt][n][3] *= correction[mt][1];
    }
}

// P in the input dtype: the S accumulator layout is the A-fragment layout of P V.
template <typename T, int kMT, int kKeyTiles>
__device__ __forceinline__ void pack_p(const float (&s)[kMT][kKeyTiles][4], uint32_t (&pa)[kKeyTiles / 2][kMT][4]) {
#pragma unroll
  for (int kk = 0; kk < kKeyTiles / 2; ++kk)
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      pa[kk][mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      pa[kk][mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      pa[kk][mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      pa[kk][mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    }
}

// Epilogue: every valid row is written, also by a split that got no keys (its partial is empty).
template <typename T, typename Cfg, int kDimTiles>
__device__ __forceinline__ void store_rows(const Params& p, const BlockSpan& sp, const float (&o)[Cfg::kMTiles][kDimTiles][4],
                                           const float (&m)[Cfg::kMTiles][2], const float (&l)[Cfg::kMTiles][2],
                                           float scale_log2, int warp, int lane) {
  const TreeAttentionArgs& a = p.a;
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = l[mt][hf];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int row = sp.row0 + tile_row<Cfg>(warp, mt) + (lane >> 2) + 8 * hf;
      if (row >= sp.rows) continue;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no visible key: output 0
      const int node = row / p.group, head = sp.h * p.group + (row - node * p.group);
      const int col = 2 * (lane & 3);
      if (p.splits == 1) {
        T* dst = static_cast<T*>(a.out) + sp.b * a.o_batch_stride + node * a.o_node_stride + head * a.o_head_stride + col;
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n)
          *reinterpret_cast<uint32_t*>(dst + 8 * n) = pack2<T>(o[mt][n][2 * hf] * inv, o[mt][n][2 * hf + 1] * inv);
      } else {
        const int64_t prow = (static_cast<int64_t>(sp.split * a.batch + sp.b) * a.nodes + node) * a.q_heads + head;
        float* dst = p.part_o + prow * Cfg::kHeadDim + col;
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n)
          *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(o[mt][n][2 * hf] * inv, o[mt][n][2 * hf + 1] * inv);
        // A NaN sum (a visible key's NaN or +inf score) gives a NaN log-sum-exp, which the merge keeps.
        if ((lane & 3) == 0)
          p.part_lse[prow] = sum > 0.f || isnan(sum) ? fmaf(m[mt][hf], scale_log2, log2f(sum)) : -INFINITY;
      }
    }
}

#ifdef JETSPEC_WGMMA
// One thread asks the copy engine for key tile `tile` into ring stage `stage`: 4 (head_dim 128) or 2 boxes
// of kKeys x 64 columns each of K and V, completing on the mbarrier `bar`. Keys past the cache's slots
// arrive as zeros; keys in [key_end, slots) arrive as whatever the cache holds (see zero_v_tail).
template <typename Cfg>
__device__ __forceinline__ void copy_kv_tile(const Params& p, const BlockSpan& sp, uint32_t s_k, uint32_t s_v,
                                             uint32_t bar, int tile, int stage) {
  ptx::mbarrier_expect_tx(bar, 2 * Cfg::kKvBytes);
#pragma unroll
  for (int r = 0; r < Cfg::kHeadDim / 64; ++r) {
    const uint32_t off = stage * Cfg::kKvBytes + r * Cfg::kKvRegion;
    ptx::tma_load_4d(s_k + off, &p.k_map, 64 * r, sp.h, tile * Cfg::kKeys, sp.b, bar);
    ptx::tma_load_4d(s_v + off, &p.v_map, 64 * r, sp.h, tile * Cfg::kKeys, sp.b, bar);
  }
}

// Zeroes the V rows [valid_keys, kKeys) of a tile the copy engine filled, by `threads` threads: P is 0
// there, but the cache may hold anything past key_end (NaN included, and 0 * NaN is NaN). The caller
// publishes the zeros to the tensor cores with a barrier.
template <typename Cfg>
__device__ __forceinline__ void zero_v_tail(uint32_t v_tile, int valid_keys, int tid, int threads) {
  for (int c = tid; c < (Cfg::kKeys - valid_keys) * Cfg::kChunks; c += threads)
    ptx::st_shared_zero16(v_tile + swizzle(valid_keys + c / Cfg::kChunks, c % Cfg::kChunks, Cfg::kKvRegion));
  ptx::fence_proxy_async();
}

// S = Q K^T for a warpgroup's kMT m-tiles, both operands from shared memory (descriptors of the
// warpgroup's first Q row and of the stage's K tile). The first product overwrites S: zeroing it first
// would be register writes that ptxas makes wait for the warpgroup's products in flight.
template <typename T, typename Cfg, int kMT, int kKeyTiles>
__device__ __forceinline__ void issue_qk(float (&s)[kMT][kKeyTiles][4], uint64_t q_desc, uint64_t k_desc) {
#pragma unroll
  for (int kk = 0; kk < Cfg::kHeadDim / 16; ++kk) {
    const uint64_t kd = ptx::desc_advance(k_desc, (kk >> 2) * Cfg::kKvRegion + (kk & 3) * 32);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const uint32_t q_off = (kk >> 2) * Cfg::kQRegion + mt * 64 * 128 + (kk & 3) * 32;
      ptx::wgmma_ss<Cfg::kKeys, std::is_same_v<T, __nv_bfloat16>>(reinterpret_cast<float(&)[Cfg::kKeys / 2]>(s[mt]),
                                                                  ptx::desc_advance(q_desc, q_off), kd, kk > 0);
    }
  }
  ptx::wgmma_commit();
}

// O += P V: P from registers, V MN-major in shared memory (descriptor of the stage's V tile).
template <typename T, typename Cfg, int kMT, int kDimTiles>
__device__ __forceinline__ void issue_pv(float (&o)[kMT][kDimTiles][4], const uint32_t (&pa)[Cfg::kKeys / 16][kMT][4],
                                         uint64_t v_desc) {
#pragma unroll
  for (int kk = 0; kk < Cfg::kKeys / 16; ++kk) {
    const uint64_t vd = ptx::desc_advance(v_desc, kk * 16 * 128);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
      ptx::wgmma_rs<Cfg::kHeadDim, std::is_same_v<T, __nv_bfloat16>>(reinterpret_cast<float(&)[Cfg::kHeadDim / 2]>(o[mt]),
                                                                     pa[kk][mt], vd);
  }
  ptx::wgmma_commit();
}
#endif

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) tree_attention_kernel(const __grid_constant__ Params p) {
  constexpr int D = Cfg::kHeadDim, kMT = Cfg::kMTiles, kKeys = Cfg::kKeys, kStages = Cfg::kStages;
  constexpr int kKeyTiles = kKeys / 8;  // 8-key column tiles of S
  constexpr int kDimTiles = D / 8;      // 8-dim column tiles of O
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t s_q = smem_addr(smem);
  const uint32_t s_k = s_q + Cfg::kRows * Cfg::kRowBytes;
  const uint32_t s_v = s_k + kStages * Cfg::kKvBytes;
  const uint32_t s_bar = s_v + kStages * Cfg::kKvBytes;  // mbarrier of stage i at s_bar + 8 i

  const TreeAttentionArgs& a = p.a;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const BlockSpan sp = block_span<Cfg>(p);
  const int tile_begin = sp.tile_begin, tile_end = sp.tile_end, key_end = sp.key_end;

#ifdef JETSPEC_WGMMA
  constexpr bool kWgmma = Cfg::kWarpgroup;
#else
  constexpr bool kWgmma = false && Cfg::kWarpgroup;
#endif
  const float scale_log2 = a.scale * kLog2e;
  float o[kMT][kDimTiles][4];
  float m[kMT][2], l[kMT][2];  // running max (raw scores) and this thread's share of the row sum
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  if (tile_begin < tile_end) {
    load_q<T, Cfg, Cfg::kRows, Cfg::kThreads>(p, sp, s_q, 0, tid);

    // Keys past key_end are never visible; zero-filling them keeps P V finite whatever the cache holds
    // (a.key stands in as the address the zero-filling copies are given: always mapped, never read).
    // A thread copies the same chunk of every kRowStep-th key: one running pointer per K and V and a
    // row count left, rather than a hoisted address per copy.
    const T* k_base = static_cast<const T*>(a.key) + sp.b * a.k_batch_stride + sp.h * a.k_head_stride;
    const T* v_base = static_cast<const T*>(a.value) + sp.b * a.v_batch_stride + sp.h * a.v_head_stride;
    constexpr int kRowStep = Cfg::kThreads / Cfg::kChunks;
    const int my_key = tid / Cfg::kChunks, my_chunk = tid % Cfg::kChunks;
    const T* k_mine = k_base + my_key * a.k_slot_stride + my_chunk * 8;
    const T* v_mine = v_base + my_key * a.v_slot_stride + my_chunk * 8;
    const int64_t k_step = kRowStep * a.k_slot_stride, v_step = kRowStep * a.v_slot_stride;
    auto load_kv = [&](int tile, int stage) {
      const int key0 = tile * kKeys;
      const int left = key_end - key0 - my_key;
      const T* kp = k_mine + key0 * a.k_slot_stride;
      const T* vp = v_mine + key0 * a.v_slot_stride;
#pragma unroll
      for (int i = 0; i < kKeys / kRowStep; ++i) {
        const bool valid = i * kRowStep < left;
        const uint32_t off = stage * Cfg::kKvBytes + swizzle(my_key + i * kRowStep, my_chunk, Cfg::kKvRegion);
        cp_async16(s_k + off, valid ? kp : a.key, valid);
        cp_async16(s_v + off, valid ? vp : a.key, valid);
        kp += k_step;
        vp += v_step;
      }
    };
#ifdef JETSPEC_WGMMA
    const bool tensor_copies = kWgmma && p.tensor_copies;
    if (tensor_copies) {
      if (tid == 0) {
        for (int s = 0; s < kStages; ++s) ptx::mbarrier_init(s_bar + 8 * s, 1);
        ptx::fence_mbarrier_init();
      }
      __syncthreads();
      if (tid == 0)
        for (int s = 0; s < kStages - 1; ++s)
          if (tile_begin + s < tile_end) copy_kv_tile<Cfg>(p, sp, s_k, s_v, s_bar + 8 * s, tile_begin + s, s);
      cp_async_wait<0>();  // Q
      ptx::fence_proxy_async();
    } else
#else
    constexpr bool tensor_copies = false;
#endif
    {
#pragma unroll
      for (int s = 0; s < kStages - 1; ++s) {
        if (tile_begin + s < tile_end) load_kv(tile_begin + s, s);
        cp_async_commit();
      }
    }

    // ldmatrix lane addresses (see the mma.m16n8k16 fragment layouts). Every row read here has
    // row & 7 == lane & 7, so the swizzled address of the even chunk 2 * kk is this lane's address of
    // chunk 0 in region kk / 4, XOR ((kk % 4) << 5): immediates per ldmatrix, no table of per-kk offsets
    // held in registers (row offsets are multiples of 128 bytes, so the XORed bits are the chunk's own).
    const uint32_t q_lane = (tile_row<Cfg>(warp, 0) + (lane & 15)) * 128 + ((((lane >> 4) ^ lane) & 7) << 4);
    const uint32_t k_lane = ((lane & 7) + ((lane >> 4) << 3)) * 128 + (((((lane >> 3) & 1) ^ lane) & 7) << 4);
    const uint32_t v_lane = ((lane & 7) + (((lane >> 3) & 1) << 3)) * 128 + ((((lane >> 4) ^ lane) & 7) << 4);

#ifdef JETSPEC_WGMMA
    const uint64_t q_desc = ptx::smem_desc(s_q, 16, 1024), k_desc = ptx::smem_desc(s_k, 16, 1024),
                   v_desc = ptx::smem_desc(s_v, Cfg::kKvRegion, 1024);
#endif
    for (int t = tile_begin; t < tile_end; ++t) {
      const int it = t - tile_begin;
      const uint32_t k_tile = s_k + (it % kStages) * Cfg::kKvBytes;
      const uint32_t v_tile = s_v + (it % kStages) * Cfg::kKvBytes;
      // A tile that reaches the tree block: its keys [tree_first, tree_end) are masked per row.
      const bool tree = t * kKeys + kKeys > sp.prefix;
      const int tree_first = max(t * kKeys, sp.prefix), tree_end = min(t * kKeys + kKeys, key_end);
      bool poisoned = false;  // one of those keys has a non-finite value
#ifdef JETSPEC_WGMMA
      if (tensor_copies) {
        ptx::mbarrier_wait(s_bar + 8 * (it % kStages), (it / kStages) & 1);
        // Every warp is done with the stage refilled next (and the tile's tree values are made finite).
        if (tree) {
          const bool found = zero_nonfinite_v<T, Cfg>(v_tile, tree_first - t * kKeys, tree_end - t * kKeys, tid);
          ptx::fence_proxy_async();
          poisoned = __syncthreads_or(found);
        } else {
          __syncthreads();
        }
        if (tid == 0 && t + kStages - 1 < tile_end)
          copy_kv_tile<Cfg>(p, sp, s_k, s_v, s_bar + 8 * ((it + kStages - 1) % kStages), t + kStages - 1,
                            (it + kStages - 1) % kStages);
        const int valid_keys = key_end - t * kKeys;
        if (valid_keys < kKeys) {  // the block's last tile
          zero_v_tail<Cfg>(v_tile, valid_keys, tid, Cfg::kThreads);
          __syncthreads();
        }
      } else
#endif
      {
        cp_async_wait<kStages - 2>();
        // This thread's copies of tile t are complete: it makes their tree values finite itself.
        const bool found = tree && zero_nonfinite_v<T, Cfg>(v_tile, tree_first - t * kKeys, tree_end - t * kKeys, tid);
#ifdef JETSPEC_WGMMA
        if constexpr (kWgmma) ptx::fence_proxy_async();  // this thread's copies, before wgmma reads them
#endif
        // Tile t (and Q) visible to all; every warp is done with the stage refilled next.
        if (tree)
          poisoned = __syncthreads_or(found);
        else
          __syncthreads();
        if (t + kStages - 1 < tile_end) load_kv(t + kStages - 1, (it + kStages - 1) % kStages);
        cp_async_commit();
      }

      float s[kMT][kKeyTiles][4];
      if constexpr (kWgmma) {  // S = Q K^T by the warpgroup, both operands from shared memory
#ifdef JETSPEC_WGMMA
        ptx::wgmma_fence();
        issue_qk<T, Cfg>(s, q_desc, ptx::desc_advance(k_desc, (it % kStages) * Cfg::kKvBytes));
        ptx::wgmma_wait<0>();
#endif
      } else {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t qa[kMT][4];
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
            ptx::ldmatrix_x4(qa[mt], s_q + (kk >> 2) * Cfg::kQRegion +
                                         ((q_lane + tile_row<Cfg>(0, mt) * 128) ^ ((kk & 3) << 5)));
#pragma unroll
          for (int np = 0; np < kKeyTiles / 2; ++np) {
            uint32_t kb[4];
            ptx::ldmatrix_x4(kb, k_tile + (kk >> 2) * Cfg::kKvRegion + ((k_lane + np * 16 * 128) ^ ((kk & 3) << 5)));
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              ptx::mma16816<std::is_same_v<T, __nv_bfloat16>>(s[mt][2 * np], qa[mt], kb[0], kb[1]);
              ptx::mma16816<std::is_same_v<T, __nv_bfloat16>>(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
            }
          }
        }
      }

      if (tree) mask_tree_keys<Cfg>(s, p, sp, t, warp, lane);
      float correction[kMT][2];
      if (online_softmax(s, m, l, correction, scale_log2)) rescale(o, correction);
      if (poisoned) add_nonfinite_values<T, Cfg>(o, p, sp, tree_first, tree_end, warp, lane);
      uint32_t pa[kKeys / 16][kMT][4];
      pack_p<T>(s, pa);
      if constexpr (kWgmma) {
#ifdef JETSPEC_WGMMA
        ptx::wgmma_fence();
        issue_pv<T, Cfg>(o, pa, ptx::desc_advance(v_desc, (it % kStages) * Cfg::kKvBytes));
        ptx::wgmma_wait<0>();
#endif
      } else {
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t vb[4];
            ptx::ldmatrix_x4_trans(vb, v_tile + (dp >> 2) * Cfg::kKvRegion + ((v_lane + kk * 16 * 128) ^ ((dp & 3) << 5)));
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              ptx::mma16816<std::is_same_v<T, __nv_bfloat16>>(o[mt][2 * dp], pa[kk][mt], vb[0], vb[1]);
              ptx::mma16816<std::is_same_v<T, __nv_bfloat16>>(o[mt][2 * dp + 1], pa[kk][mt], vb[2], vb[3]);
            }
          }
      }
    }
  }
  store_rows<T, Cfg>(p, sp, o, m, l, scale_log2, warp, lane);
}

// The warp-specialised 128-row block (sm_90a): warps 8-11 are a producer warpgroup whose one thread keeps
// the K/V ring full with tensor copies, gated per stage by an mbarrier the consumers arrive on once done
// with it (no block-wide barrier per tile). Warps 0-7 are two warpgroups of 64 rows each. They take turns at the
// tensor cores (named barriers 1 and 2: a warpgroup issues its products only after the other has issued
// its own), and each overlaps itself: it issues S = Q K^T of tile i together with O += P V of tile i - 1,
// then computes tile i's softmax while both run. P and O are touched only once both are complete (ptxas
// serialises every wgmma of the kernel if an operand or accumulator is written while in flight).
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kLaunchThreads, 1) tree_attention_specialised_kernel(const __grid_constant__ Params p) {
#ifdef JETSPEC_WGMMA
  constexpr int D = Cfg::kHeadDim, kKeys = Cfg::kKeys, kStages = Cfg::kStages;
  constexpr int kKeyTiles = kKeys / 8, kDimTiles = D / 8;
  static_assert(Cfg::kSpecialised && Cfg::kWarps == 8 && Cfg::kMTiles == 1, "two warpgroups of one m-tile each");
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t s_q = smem_addr(smem);
  const uint32_t s_k = s_q + Cfg::kRows * Cfg::kRowBytes;
  const uint32_t s_v = s_k + kStages * Cfg::kKvBytes;
  const uint32_t s_full = s_v + kStages * Cfg::kKvBytes, s_empty = s_full + 8 * kStages;
  const uint32_t s_pin = s_empty + 8 * kStages;  // a word per consumer warp (see the key loop)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const BlockSpan sp = block_span<Cfg>(p);
  const int tiles = max(sp.tile_end - sp.tile_begin, 0);
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(s_full + 8 * s, 1);
      ptx::mbarrier_init(s_empty + 8 * s, Cfg::kWarps);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  // 168 registers a thread at launch (384 threads): the producer warpgroup needs few and gives the rest
  // to the consumers, which hold O (64), S (64) and P (32) and the softmax's temporaries.
  if (warp >= Cfg::kWarps) {
    ptx::setmaxnreg_dec<40>();
    if (warp == Cfg::kWarps && lane == 0)
      for (int it = 0; it < tiles; ++it) {
        const int stage = it % kStages;
        if (it >= kStages) ptx::mbarrier_wait(s_empty + 8 * stage, (it / kStages + 1) & 1);
        copy_kv_tile<Cfg>(p, sp, s_k, s_v, s_full + 8 * stage, sp.tile_begin + it, stage);
      }
    return;
  }

  ptx::setmaxnreg_inc<232>();
  const float scale_log2 = p.a.scale * kLog2e;
  const int wg = warp / 4;
  float o[1][kDimTiles][4];
  float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) o[0][n][0] = o[0][n][1] = o[0][n][2] = o[0][n][3] = 0.f;

  if (tiles > 0) {
    load_q<T, Cfg, 64, 128>(p, sp, s_q, 64 * wg, tid % 128);
    cp_async_wait<0>();
    ptx::fence_proxy_async();
    ptx::named_barrier_sync(3 + wg, 128);
    const uint64_t q_desc = ptx::smem_desc(s_q + 64 * wg * 128, 16, 1024), k_desc = ptx::smem_desc(s_k, 16, 1024),
                   v_desc = ptx::smem_desc(s_v, Cfg::kKvRegion, 1024);
    // Barrier ids as immediates: held in a register, the id was spilled.
    auto take_turn = [&] { if (wg == 0) ptx::named_barrier_sync(1, 2 * 128); else ptx::named_barrier_sync(2, 2 * 128); };
    auto pass_turn = [&] { if (wg == 0) ptx::named_barrier_arrive(2, 2 * 128); else ptx::named_barrier_arrive(1, 2 * 128); };
    // Tree keys [tree_first, tree_end) of the tile last arrived, and whether one has a non-finite value.
    int tree_first = 0, tree_end = 0;
    bool poisoned = false;
    // Waits for tile `it` and returns its stage's byte offset in the K and V rings.
    auto arrived = [&](int it) -> uint32_t {
      const int stage = it % kStages;
      const uint32_t v_tile = s_v + stage * Cfg::kKvBytes;
      ptx::mbarrier_wait(s_full + 8 * stage, (it / kStages) & 1);
      const int key0 = (sp.tile_begin + it) * kKeys, valid_keys = sp.key_end - key0;
      tree_first = max(key0, sp.prefix);
      tree_end = min(key0 + kKeys, sp.key_end);
      poisoned = false;
      if (tree_first < tree_end) {  // the block's last tiles, which reach the tree block
        const bool found = zero_nonfinite_v<T, Cfg>(v_tile, tree_first - key0, tree_end - key0, tid);
        if (valid_keys < kKeys)  // the block's last tile
          zero_v_tail<Cfg>(v_tile, valid_keys, tid, Cfg::kThreads);  // fences both stores
        else
          ptx::fence_proxy_async();
        poisoned = ptx::named_barrier_or(5, Cfg::kThreads, found);
      }
      return stage * Cfg::kKvBytes;
    };
    float s[1][kKeyTiles][4], correction[1][2];
    uint32_t pa[kKeys / 16][1][4];
    // Tile i's scores, once its S = Q K^T is complete: masked, exponentiated; whether O needs a rescale.
    auto softmax = [&](int it) {
      const int t = sp.tile_begin + it;
      if (t * kKeys + kKeys > sp.prefix) mask_tree_keys<Cfg>(s, p, sp, t, warp, lane);
      return online_softmax(s, m, l, correction, scale_log2);
    };

    if (wg == 1) pass_turn();  // warpgroup 0 goes first
    uint32_t stage_off = arrived(0);
    take_turn();
    ptx::wgmma_fence();
    issue_qk<T, Cfg>(s, q_desc, ptx::desc_advance(k_desc, stage_off));
    pass_turn();
    ptx::wgmma_wait<0>();
    softmax(0);  // O is still 0: no rescale
    if (poisoned) add_nonfinite_values<T, Cfg>(o, p, sp, tree_first, tree_end, warp, lane);
    pack_p<T>(s, pa);
    for (int it = 1; it < tiles; ++it) {
      const uint32_t prev_off = stage_off;
      stage_off = arrived(it);
      take_turn();
      ptx::wgmma_fence();
      issue_qk<T, Cfg>(s, q_desc, ptx::desc_advance(k_desc, stage_off));
      issue_pv<T, Cfg>(o, pa, ptx::desc_advance(v_desc, prev_off));
      pass_turn();
      ptx::wgmma_wait<1>();  // S of tile it
      const bool moved = softmax(it);
      // ptxas moves a wgmma wait ahead of register arithmetic (the exponentials would then wait for P V
      // instead of running under it) but not ahead of a shared-memory access: storing a value computed
      // from every exponential (this warp's row sum, to a slot of its own) keeps the softmax before it.
      if (lane == 0) ptx::st_shared_f32(s_pin + 4 * warp, l[0][0] + l[0][1]);
      ptx::wgmma_wait<0>();  // P V of tile it - 1: its stage is free
      if (lane == 0) ptx::mbarrier_arrive(s_empty + 8 * ((it - 1) % kStages));
      if (moved) rescale(o, correction);
      if (poisoned) add_nonfinite_values<T, Cfg>(o, p, sp, tree_first, tree_end, warp, lane);
      pack_p<T>(s, pa);
    }
    take_turn();
    ptx::wgmma_fence();
    issue_pv<T, Cfg>(o, pa, ptx::desc_advance(v_desc, stage_off));
    if (wg == 0) pass_turn();  // warpgroup 1 takes no further turn
    ptx::wgmma_wait<0>();
  }
  store_rows<T, Cfg>(p, sp, o, m, l, scale_log2, warp, lane);
#endif
}

// Merges the splits' partials of one output row per D / 4 threads (4 dims each).
template <typename T, int D>
__global__ void __launch_bounds__(128) tree_attention_combine_kernel(const __grid_constant__ Params p) {
  constexpr int kLanes = D / 4, kRowsPerBlock = 128 / kLanes;
  const TreeAttentionArgs& a = p.a;
  const int64_t rows = static_cast<int64_t>(a.batch) * a.nodes * a.q_heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
  if (row >= rows) return;
  const int col = (threadIdx.x % kLanes) * 4;
  // A NaN log-sum-exp makes top, and so the row, NaN as in the unsplit kernel: fmaxf would skip it, and a
  // row whose other splits are empty would come out 0.
  float top = -INFINITY;
  for (int s = 0; s < p.splits; ++s) {
    const float lse = p.part_lse[s * rows + row];
    top = lse > top || isnan(lse) ? lse : top;
  }
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.f;
  if (top != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const float w = exp2f(p.part_lse[s * rows + row] - top);
      const float4 v = *reinterpret_cast<const float4*>(p.part_o + (s * rows + row) * D + col);
      acc.x = fmaf(w, v.x, acc.x);
      acc.y = fmaf(w, v.y, acc.y);
      acc.z = fmaf(w, v.z, acc.z);
      acc.w = fmaf(w, v.w, acc.w);
      total += w;
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const int64_t head = row % a.q_heads, bn = row / a.q_heads, node = bn % a.nodes, b = bn / a.nodes;
  T* dst = static_cast<T*>(a.out) + b * a.o_batch_stride + node * a.o_node_stride + head * a.o_head_stride + col;
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(acc.x * inv, acc.y * inv), pack2<T>(acc.z * inv, acc.w * inv));
}

template <typename T, typename Cfg>
struct Kernel {
  using Elem = T;
  using Config = Cfg;
  // What runs when the copy engine cannot read the cache views: the specialised block has no other
  // way to fill its ring, so the single-warpgroup wgmma block (with cp.async) takes its place.
  using Fallback = Kernel<T, std::conditional_t<Cfg::kSpecialised, LargeWgmmaTile<Cfg::kHeadDim>, Cfg>>;
  static constexpr auto entry() {
    if constexpr (Cfg::kSpecialised) return &tree_attention_specialised_kernel<T, Cfg>;
    else return &tree_attention_kernel<T, Cfg>;
  }
  // Lets the kernel have its dynamic shared memory (above the 48 KB default).
  static cudaError_t allow_smem() {
    return cudaFuncSetAttribute(entry(), cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  }
  static void launch(const Params& p, dim3 grid, cudaStream_t stream) {
    entry()<<<grid, Cfg::kLaunchThreads, Cfg::kSmem, stream>>>(p);
  }
};

// Calls f(Kernel<element type, tile>{}) for the call's dtype, head_dim and tile kind.
template <typename T, int D, typename F>
cudaError_t with_tile(int kind, F& f) {
  switch (kind) {
    case kSmall: return f(Kernel<T, SmallTile<D>>{});
    case kMedium: return f(Kernel<T, MediumTile<D>>{});
    case kLargeSpecialised: return f(Kernel<T, LargeSpecialisedTile<D>>{});
    default: return f(Kernel<T, LargeTile<D>>{});
  }
}
template <typename T, typename F>
cudaError_t with_dim(int head_dim, int kind, F& f) {
  return head_dim == 64 ? with_tile<T, 64>(kind, f) : with_tile<T, 128>(kind, f);
}
template <typename F>
cudaError_t with_kernel(const TreeAttentionArgs& a, int kind, F&& f) {
  return a.bf16 ? with_dim<__nv_bfloat16>(a.head_dim, kind, f) : with_dim<__half>(a.head_dim, kind, f);
}

#ifdef JETSPEC_SM90A
constexpr bool kBuiltForSm90a = true;
#else
constexpr bool kBuiltForSm90a = false;
#endif

constexpr int kMaxSplits = 128;
constexpr int64_t kMinTilesPerSplit = 2;  // fewer keys per block and the prologue/epilogue dominate

// Flash-decoding's rule: no split when the blocks already (nearly) fill the chip; otherwise as many
// splits as one wave holds. A wave is every block slot for the tiles bound by the tensor cores (and the
// 1-warp decode block, which needs both slots' loads in flight), but one block per SM for the 64-row
// tile, which is bound by K/V bytes: a second one per SM adds partial-buffer traffic and no bandwidth.
// It beat the earlier "fewest splits within 90% of the best wave efficiency" rule on both tile kinds
// (bench/results/h100/wgmma/variants_small_trees.json).
int choose_splits(int64_t blocks, int64_t wave, int64_t slots, int64_t key_tiles) {
  if (5 * blocks >= 4 * slots) return 1;
  const int64_t most = std::min<int64_t>(key_tiles / kMinTilesPerSplit, kMaxSplits);
  return static_cast<int>(std::max<int64_t>(1, std::min(most, wave / blocks)));
}

}  // namespace

cudaError_t tree_attention_plan(const TreeAttentionArgs& a, TreeAttentionPlan* plan) {
  const int rows = a.q_heads / a.kv_heads * a.nodes;
  int device = 0, major = 0, minor = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // wgmma code exists only in an sm_90a build, and only a compute capability 9.0 device runs it.
  const bool wgmma = kBuiltForSm90a && major == 9 && minor == 0;
  const int kind = tile_kind(rows, wgmma);
  plan->tile = kind;
  plan->row_tiles = (rows + tile_rows(kind) - 1) / tile_rows(kind);
  plan->splits = 1;
  plan->tensor_copies = wgmma;
  return with_kernel(a, kind, [&](auto k) -> cudaError_t {
    using K = decltype(k);
    using Cfg = typename K::Config;
    int per_sm = 0;
    err = K::allow_smem();
    if (Cfg::kSpecialised && err == cudaSuccess) err = K::Fallback::allow_smem();  // else the same kernel
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, K::entry(), Cfg::kLaunchThreads, Cfg::kSmem);
    if (err != cudaSuccess) return err;
    const int64_t blocks = static_cast<int64_t>(a.batch) * a.kv_heads * plan->row_tiles;
    const int64_t slots = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    const int64_t key_tiles = (a.max_prefix + a.nodes + Cfg::kKeys - 1) / Cfg::kKeys;
    const int64_t wave = kind == kMedium ? sms : slots;
    plan->splits = choose_splits(blocks, wave, slots, key_tiles);
    return cudaSuccess;
  });
}

using TensorMapEncoder = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                      const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                      CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver the runtime loaded (the extension does not link libcuda).
TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return TensorMapEncoder{nullptr};
    return reinterpret_cast<TensorMapEncoder>(fn);
  }();
  return encoder;
}

// The map of a [batch, slots, kv_heads, head_dim] cache (strides in elements) in boxes of `keys` keys x 64
// columns of one head, 128-byte swizzled as the kernel's K/V tiles are. A stride of a dimension of extent
// 1 is never used; it is replaced by a valid one so that the encoder accepts any such view.
bool kv_tensor_map(CUtensorMap* map, const TreeAttentionArgs& a, const void* base, int64_t batch_stride,
                   int64_t slot_stride, int64_t head_stride, int keys) {
  const TensorMapEncoder encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const int64_t row_bytes = 2 * static_cast<int64_t>(a.head_dim);
  const int64_t head_bytes = a.kv_heads > 1 ? 2 * head_stride : row_bytes;
  const int64_t slot_bytes = 2 * slot_stride;
  const int64_t batch_bytes = a.batch > 1 ? 2 * batch_stride : slot_bytes * a.slots;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(a.head_dim), static_cast<cuuint64_t>(a.kv_heads),
                              static_cast<cuuint64_t>(a.slots), static_cast<cuuint64_t>(a.batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(head_bytes), static_cast<cuuint64_t>(slot_bytes),
                                 static_cast<cuuint64_t>(batch_bytes)};
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(keys), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  return encode(map, a.bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

cudaError_t tree_attention(const TreeAttentionArgs& a, const TreeAttentionPlan& plan, float* partial_out,
                           float* partial_lse, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  Params p{a, a.q_heads / a.kv_heads, plan.row_tiles, plan.splits, partial_out, partial_lse};
  return with_kernel(a, plan.tile, [&](auto k) -> cudaError_t {
    using K = decltype(k);
    using T = typename K::Elem;
    using Cfg = typename K::Config;
    if (plan.tensor_copies && Cfg::kWarpgroup) {  // else, or if the driver cannot encode these views, cp.async
      p.tensor_copies =
          kv_tensor_map(&p.k_map, a, a.key, a.k_batch_stride, a.k_slot_stride, a.k_head_stride, Cfg::kKeys) &&
          kv_tensor_map(&p.v_map, a, a.value, a.v_batch_stride, a.v_slot_stride, a.v_head_stride, Cfg::kKeys);
    }
    const dim3 grid(static_cast<unsigned>(plan.row_tiles * plan.splits), static_cast<unsigned>(a.kv_heads),
                    static_cast<unsigned>(a.batch));
    if (Cfg::kSpecialised && !p.tensor_copies)
      K::Fallback::launch(p, grid, stream);
    else
      K::launch(p, grid, stream);
    if (plan.splits > 1) {
      constexpr int kRowsPerBlock = 128 / (Cfg::kHeadDim / 4);
      const int64_t rows = static_cast<int64_t>(a.batch) * a.nodes * a.q_heads;
      const unsigned blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
      tree_attention_combine_kernel<T, Cfg::kHeadDim><<<blocks, 128, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace jetspec::cuda
