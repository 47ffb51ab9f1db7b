// accept_sample: the sampling walk of a verified tree, one launch, no host sync (contract in
// cpp/accept_sample.cpp; shared arithmetic in accept_sample_math.cuh).
//
// One thread-block cluster per batch row walks the path; the C CTAs of the cluster (C <= 16: as many as
// the chip has room for at this batch, 16 only where such a cluster can be scheduled) each own a
// contiguous slice of the vocabulary. A draw needs a few
// reductions over V, and one SM alone would spend ~10 us per node on the exps of a 152k vocabulary, so
// every reduction is block-wide then cluster-wide: each CTA folds its slice, leaves its partial in its
// shared memory, and after one cluster barrier every CTA reads all C partials through distributed shared
// memory and combines them in the same way, so all CTAs take the same branches with no second barrier.
// Probabilities are integers (q = floor(e * 2^43)), so every sum is exact and the result does not depend
// on C, the thread count or the order of atomics: the CUDA kernel equals the CPU kernel bit for bit.
//
// Per visited node (reductions = cluster barriers):
//   A. one pass over the node's logits (global loads, 16 bytes a thread): the argmax (first max, as a
//      packed key) and, with top-k, the first radix level of the logits' keys. T == 0 ends here (greedy).
//   K. top-k: radix select of the k-th largest logit (64 bins a level, each level one pass over the slice,
//      an L2 hit). As soon as the tokens at or above the current bin number at most kCand, they are
//      collected (with z at or above the bin's z, so that ties created by the division by T are in) and the
//      draw finishes among them in shared memory: exact top-k by rank, top-p, the draw.
//   B. otherwise one pass computing every token's e (0 for tokens top-k removed) into a shared-memory
//      cache of the slice, the slice's mass and, with top-p, the first radix level of e's bits.
//   P. top-p: radix select over the cached e by mass (5 levels of 6 bits over e's 29 significant bits),
//      finishing among the candidates as soon as the tokens at or above the boundary bin are few.
//   L. the draw: the CTA whose slice holds the target position scans its cache in per-thread chunks.
// Then every CTA looks for the child with the drawn token (the highest index wins) and the walk moves on.
// The row's tree (up to kTreeNodes nodes) is read into shared memory once; a node's children are listed
// before its draw and their logits (each CTA its slice) prefetched into L2 while the node is sampled.
//
// Measured (H200, Qwen3 vocabulary, bf16, B = 1, 16-CTA clusters, L2-hot graph replays): ~8 us for a root-
// only walk, then ~5.6 us per further visited node at T = 0 and ~15 us at T = 1; about 5x above what the
// passes' bytes and exps predict, so per-node fixed latencies (barriers, dependent smem/DSMEM round trips)
// dominate and are the thing to profile next (bench/bench_accept_sample.py; ncu was not run yet).
//
// Histograms have one column per lane (bins x 32 lanes, atomics only between warps), which keeps the
// heavily shared bins (most of a vocabulary sits in a few) from serialising a warp's atomics.
//
// offset: each CTA adds 2^32 to it with one atomic at the start and reads the call's offset from the low
// word of the old value; the CTA that sees itself last (old >> 32 == gridDim - 1) subtracts the count and
// adds 1. Every CTA read its value in its own atomic before that, so all rows use the same offset.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <type_traits>

#include "accept_sample.cuh"
#include "accept_sample_math.cuh"

namespace jetspec::cuda {
namespace {

namespace cg = cooperative_groups;
using namespace jetspec::sample;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kDigit = 6;              // radix bits a level
constexpr int kBins = 1 << kDigit;     // 64
constexpr int kCand = 256;             // candidates the shared-memory finish takes
constexpr int kTreeNodes = 1024;       // trees up to this size are read into shared memory once
constexpr int kMaxKids = 32;          // children of a node listed (and prefetched) before its draw
constexpr int kEBits = 29;             // e's bits above 2^-43: bits(e) - bits(2^-43) < 2^29
constexpr unsigned kFull = 0xffffffffu;
static_assert(kThreads == kBins * 16, "hist_fold maps 16 threads to a bin");

struct Shared {
  uint64_t red[kWarps];
  uint64_t mail[2][4];                 // per-CTA values exchanged through the cluster (parity buffers)
  uint64_t bin_mass[2][kBins];         // per-CTA histogram, exchanged
  uint32_t bin_count[2][kBins];
  uint64_t lane_mass[kBins][32];       // this CTA's histogram, one column per lane
  uint32_t lane_count[kBins][32];
  uint64_t total_mass[kBins];          // the cluster's histogram of the current level
  uint32_t total_count[kBins];
  uint64_t above_mass[kBins];          // per bin: the cluster's totals of the bins above it
  uint32_t above_count[kBins];
  uint64_t rank_mass[kSampleMaxCluster];
  int32_t rank_count[kSampleMaxCluster];
  int32_t cand_count;                  // this CTA's candidates, exchanged
  int32_t cand_idx[kCand];
  float cand_val[kCand];
  int32_t all_idx[kCand];              // the cluster's candidates
  float all_val[kCand];
  float all_z[kCand];
  float all_e[kCand];
  uint64_t all_q[kCand];
  uint8_t all_keep[kCand];
  uint64_t offset;
  uint64_t u53;                        // the current node's uniform
  int32_t tree_tokens[kTreeNodes];     // the row's tree, when it has at most kTreeNodes nodes
  int32_t tree_parents[kTreeNodes];
  int32_t kids[kMaxKids];              // the current node's children
  int32_t kid_count;
  int32_t result;
  int32_t select;
  int32_t child;
};

// ---- loads ----------------------------------------------------------------------------------------------

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kPerVec = 4;
  __device__ static float load(const float* p) { return __ldg(p); }
  __device__ static void unpack(const uint4& v, float (&out)[4]) {
    out[0] = __uint_as_float(v.x), out[1] = __uint_as_float(v.y), out[2] = __uint_as_float(v.z),
    out[3] = __uint_as_float(v.w);
  }
};
template <>
struct Elem<__nv_bfloat16_raw> {
  static constexpr int kPerVec = 8;
  __device__ static float load(const __nv_bfloat16_raw* p) {
    return __uint_as_float(static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
  }
  __device__ static void unpack(const uint4& v, float (&out)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) out[2 * i] = __uint_as_float(w[i] << 16), out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
};
template <>
struct Elem<__half> {
  static constexpr int kPerVec = 8;
  __device__ static float load(const __half* p) { return __half2float(__ldg(p)); }
  __device__ static void unpack(const uint4& v, float (&out)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      out[2 * i] = __low2float(h), out[2 * i + 1] = __high2float(h);
    }
  }
};

// f(j, logit) for every vocabulary index j of [lo, hi) this thread owns; lo is a multiple of 8. With kVec the
// row is 16-byte aligned and read in 16-byte pieces, two pieces in flight per thread.
template <typename T, bool kVec, typename F>
__device__ __forceinline__ void for_slice(const T* row, int lo, int hi, F&& f) {
  if constexpr (kVec) {
    constexpr int E = Elem<T>::kPerVec, U = 2;
    const int nvec = (hi - lo) / E;
    const uint4* vec = reinterpret_cast<const uint4*>(row + lo);
    for (int v0 = threadIdx.x; v0 < nvec; v0 += kThreads * U) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (v0 + u * kThreads < nvec) raw[u] = __ldg(vec + v0 + u * kThreads);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (v0 + u * kThreads >= nvec) break;
        float vals[E];
        Elem<T>::unpack(raw[u], vals);
#pragma unroll
        for (int i = 0; i < E; ++i) f(lo + (v0 + u * kThreads) * E + i, vals[i]);
      }
    }
    for (int j = lo + nvec * E + threadIdx.x; j < hi; j += kThreads) f(j, Elem<T>::load(row + j));
  } else {
    for (int j = lo + threadIdx.x; j < hi; j += kThreads) f(j, Elem<T>::load(row + j));
  }
}

// ---- block reductions -------------------------------------------------------------------------------------

template <bool kMax>
__device__ uint64_t block_reduce(uint64_t v, Shared& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(kFull, v, o);
    v = kMax ? (w > v ? w : v) : v + w;
  }
  __syncthreads();  // the previous reduction's readers are done with s.red
  if ((threadIdx.x & 31) == 0) s.red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = s.red[0];
#pragma unroll 8
  for (int w = 1; w < kWarps; ++w) v = kMax ? (s.red[w] > v ? s.red[w] : v) : v + s.red[w];
  return v;
}

// Exclusive prefix sum over the block's threads in thread order.
__device__ uint64_t block_exclusive_scan(uint64_t v, Shared& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t w = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += w;
  }
  __syncthreads();
  if (lane == 31) s.red[warp] = incl;
  __syncthreads();
  uint64_t before = 0;
  for (int w = 0; w < warp; ++w) before += s.red[w];
  return before + incl - v;
}

// ---- histograms ---------------------------------------------------------------------------------------------

__device__ void hist_clear(Shared& s) {
  for (int i = threadIdx.x; i < kBins * 32; i += kThreads) {
    (&s.lane_mass[0][0])[i] = 0;
    (&s.lane_count[0][0])[i] = 0;
  }
}

__device__ __forceinline__ void hist_add(Shared& s, uint32_t bin, uint64_t mass) {
  const int lane = threadIdx.x & 31;
  atomicAdd(&s.lane_count[bin][lane], 1u);
  if (mass) atomicAdd(reinterpret_cast<unsigned long long*>(&s.lane_mass[bin][lane]), mass);
}

// After a __syncthreads: this CTA's histogram into bin_*[par], for the cluster to read.
__device__ void hist_fold(Shared& s, int par) {
  const int bin = threadIdx.x >> 4, part = threadIdx.x & 15;
  uint64_t m = s.lane_mass[bin][part] + s.lane_mass[bin][part + 16];
  uint32_t c = s.lane_count[bin][part] + s.lane_count[bin][part + 16];
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) {
    m += __shfl_xor_sync(kFull, m, o);
    c += __shfl_xor_sync(kFull, c, o);
  }
  if (part == 0) s.bin_mass[par][bin] = m, s.bin_count[par][bin] = c;
}

// After the cluster barrier: the cluster's totals of bin_*[par], and per bin the totals of the bins above it.
__device__ void hist_totals(Shared& s, cg::cluster_group& cluster, int par) {
  // One remote read per thread (rank, bin), staged in this CTA's lane arrays (free until the next level).
  const int t = threadIdx.x, nranks = static_cast<int>(cluster.num_blocks());
  for (int i = t; i < nranks * kBins; i += kThreads) {
    const int r = i / kBins, bin = i % kBins;
    s.lane_mass[bin][r] = *cluster.map_shared_rank(&s.bin_mass[par][bin], r);
    s.lane_count[bin][r] = *cluster.map_shared_rank(&s.bin_count[par][bin], r);
  }
  __syncthreads();
  if (t < kBins) {
    uint64_t m = 0;
    uint32_t c = 0;
    for (int r = 0; r < nranks; ++r) m += s.lane_mass[t][r], c += s.lane_count[t][r];
    s.total_mass[t] = m;
    s.total_count[t] = c;
  }
  __syncthreads();
  if (t < kBins) {
    uint64_t m = 0;
    uint32_t c = 0;
    for (int b = t + 1; b < kBins; ++b) m += s.total_mass[b], c += s.total_count[b];
    s.above_mass[t] = m;
    s.above_count[t] = c;
  }
  __syncthreads();
}

// ---- the finish among candidates ----------------------------------------------------------------------------

// The draw among the n <= kCand candidates in s.all_idx / s.all_val, every CTA alike.
//  kFromLogits: all_val holds logits, and the candidates are every token with z >= some bound at or below the
//    k-th largest z: the survivors of top-k are found by rank (fewer than k candidates with a larger z), the
//    total is theirs.
//  otherwise: all_val holds e, the candidates are every token with q > 0 and e >= some bound at or below the
//    top-p boundary, and `total` is the (top-k filtered) total mass.
template <bool kFromLogits>
__device__ int64_t finish(Shared& s, int n, float temperature, float zmax, int64_t top_k, bool use_p, float top_p,
                          uint64_t total, uint64_t u53) {
  for (int i = threadIdx.x; i < n; i += kThreads) {
    float e = s.all_val[i];
    if constexpr (kFromLogits) {
      const float z = div_rn(e, temperature);
      s.all_z[i] = z;
      e = qexp(sub_rn(z, zmax));
    }
    s.all_e[i] = e;
    s.all_q[i] = quantize(e);
  }
  __syncthreads();
  // Candidate i is handled by a group of g lanes (a power of two <= 32) that split the loop over j.
  int g = 32;
  while (g > 1 && g * n > kThreads) g >>= 1;
  const int i = threadIdx.x / g, part = threadIdx.x % g;
  const bool active = i < n;
  auto group_sum = [&](uint64_t v) {
    for (int o = g >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
  };
  uint64_t larger = 0;
  if constexpr (kFromLogits) {
    const float zi = active ? s.all_z[i] : 0.0f;
    for (int j = part; active && j < n; j += g) larger += s.all_z[j] > zi;
  }
  larger = group_sum(larger);
  if (active && part == 0) s.all_keep[i] = (!kFromLogits || larger < static_cast<uint64_t>(top_k)) && s.all_q[i] > 0;
  uint64_t kept_total = total;
  if constexpr (kFromLogits) {
    uint64_t mine = 0;
    __syncthreads();
    if (active && part == 0 && s.all_keep[i]) mine = s.all_q[i];
    kept_total = block_reduce<false>(mine, s);
  }
  __syncthreads();
  if (use_p) {
    const uint64_t cut = top_p_cut(top_p, kept_total);
    const float ei = active ? s.all_e[i] : 0.0f;
    uint64_t above = 0;
    for (int j = part; active && j < n; j += g) above += (s.all_keep[j] && s.all_e[j] > ei) ? s.all_q[j] : 0;
    above = group_sum(above);
    __syncthreads();
    if (active && part == 0) s.all_keep[i] = s.all_keep[i] && above < cut;
    __syncthreads();
  }
  uint64_t mine = 0;
  if (active && part == 0 && s.all_keep[i]) mine = s.all_q[i];
  const uint64_t target = scale_uniform(u53, block_reduce<false>(mine, s));
  const int idx = active ? s.all_idx[i] : 0;
  uint64_t before = 0;
  for (int j = part; active && j < n; j += g) before += (s.all_keep[j] && s.all_idx[j] < idx) ? s.all_q[j] : 0;
  before = group_sum(before);
  if (active && part == 0 && s.all_keep[i] && before <= target && target < before + s.all_q[i]) s.result = idx;
  __syncthreads();
  return s.result;
}

// Each CTA leaves its s.cand_* (count already in s.cand_count); after the barrier all CTAs gather the cluster's
// candidates. Returns their number, or -1 when there are more than kCand.
__device__ int gather(Shared& s, cg::cluster_group& cluster, int par) {
  if (threadIdx.x == 0) s.mail[par][1] = static_cast<uint64_t>(s.cand_count);
  cluster.sync();
  const int c = static_cast<int>(cluster.num_blocks());
  if (threadIdx.x < c) s.rank_count[threadIdx.x] = static_cast<int32_t>(*cluster.map_shared_rank(&s.mail[par][1], threadIdx.x));
  __syncthreads();
  int n = 0;
  for (int r = 0; r < c; ++r) n += s.rank_count[r];
  if (n > kCand) return -1;
  int start = 0;
  for (int r = 0; r < c; ++r) {
    const int32_t* idx = cluster.map_shared_rank(s.cand_idx, r);
    const float* val = cluster.map_shared_rank(s.cand_val, r);
    for (int i = threadIdx.x; i < s.rank_count[r]; i += kThreads) {
      s.all_idx[start + i] = idx[i];
      s.all_val[start + i] = val[i];
    }
    start += s.rank_count[r];
  }
  __syncthreads();
  return n;
}

__device__ __forceinline__ void push_candidate(Shared& s, int j, float v) {
  const int pos = atomicAdd(&s.cand_count, 1);
  if (pos < kCand) s.cand_idx[pos] = j, s.cand_val[pos] = v;
}

// The smallest key whose float l has l / T >= z_bound, given that hi_key's does (keys of non-NaN floats
// from -inf up): the survivors of a cut on z are exactly the tokens with a key at least this.
__device__ uint32_t low_key(float z_bound, float temperature, uint32_t hi_key) {
  uint32_t lo = 0x007FFFFFu;  // key of -inf
  auto pred = [&](uint32_t key) { return div_rn(key_float(key), temperature) >= z_bound; };
  if (pred(lo)) return lo;
  if (!pred(hi_key - 1)) return hi_key;
  while (hi_key - lo > 1) {
    const uint32_t mid = lo + (hi_key - lo) / 2;
    if (pred(mid)) hi_key = mid;
    else lo = mid;
  }
  return hi_key;
}

// ---- the kernel -----------------------------------------------------------------------------------------------

struct RowParams {
  int64_t b;
  int lo, hi;  // this CTA's slice of the vocabulary
  int64_t vocab;
  float temperature, top_p;
  int64_t top_k;
  bool use_k, use_p;
  uint64_t seed, offset;
};

// This CTA's value of mail[par][slot] to every CTA of the cluster: write, barrier, read all into s.rank_mass.
__device__ void exchange_rank_values(Shared& s, cg::cluster_group& cluster, int par, uint64_t mine) {
  if (threadIdx.x == 0) s.mail[par][0] = mine;
  cluster.sync();
  if (threadIdx.x < static_cast<int>(cluster.num_blocks()))
    s.rank_mass[threadIdx.x] = *cluster.map_shared_rank(&s.mail[par][0], threadIdx.x);
  __syncthreads();
}

// The draw at `node`; every thread of every CTA of the cluster returns it. `par` is the parity of the next
// exchange buffers (the same in every CTA: all take the same branches, decided on exchanged values).
template <typename T, bool kVec>
__device__ int64_t draw(const AcceptSampleArgs& a, const RowParams& rp, int64_t node, Shared& s, float* cache,
                        cg::cluster_group& cluster, int& par) {
  constexpr int kDrop = sizeof(T) == 4 ? 0 : (std::is_same_v<T, __half> ? 13 : 16);  // key bits constant per sign
  constexpr int kKeyBits = 32 - kDrop;
  const T* row = static_cast<const T*>(a.logits) + rp.b * a.logits_stride0 + node * a.logits_stride1;
  const int tid = threadIdx.x;
  const int nranks = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int len = rp.hi - rp.lo;
  const float temp = rp.temperature;

  // A: argmax, and top-k's first radix level.
  if (rp.use_k) hist_clear(s);
  __syncthreads();
  uint64_t best = 0;
  for_slice<T, kVec>(row, rp.lo, rp.hi, [&](int j, float l) {
    const uint32_t key = float_key(l);
    const uint64_t packed = (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(j));
    best = packed > best ? packed : best;
    if (rp.use_k) hist_add(s, (key >> kDrop) >> (kKeyBits - kDigit), 0);
  });
  best = block_reduce<true>(best, s);
  if (rp.use_k) hist_fold(s, par);
  if (tid == 0) s.mail[par][0] = best;
  cluster.sync();
  if (tid < nranks) s.rank_mass[tid] = *cluster.map_shared_rank(&s.mail[par][0], tid);
  __syncthreads();
  for (int r = 0; r < nranks; ++r) best = s.rank_mass[r] > best ? s.rank_mass[r] : best;
  if (rp.use_k) hist_totals(s, cluster, par);
  par ^= 1;
  const int64_t argmax = 0xFFFFFFFFu - static_cast<uint32_t>(best);
  const float lmax = key_float(static_cast<uint32_t>(best >> 32));
  if (!(temp > 0)) return argmax;
  const float zmax = div_rn(lmax, temp);
  if (!is_finite(lmax) || !is_finite(zmax)) return argmax;
  if (tid == 0) s.u53 = philox_u53(rp.seed, rp.offset, static_cast<uint32_t>(rp.b), static_cast<uint32_t>(node));
  // (read after the next __syncthreads, which every path below passes before it needs the uniform)
#define u53 (s.u53)

  // K: the k-th largest logit by radix select over the keys (kKeyBits significant bits), 64 bins a level.
  uint32_t survivor_key = 0;  // the survivors of top-k: float_key(l) >= survivor_key
  if (rp.use_k) {
    uint32_t prefix = 0;
    uint64_t k_rem = static_cast<uint64_t>(rp.top_k), count_above = 0;
    for (int hi = kKeyBits;;) {
      const int lo = hi > kDigit ? hi - kDigit : 0;
      if (hi != kKeyBits) {  // the first level came with pass A
        hist_clear(s);
        __syncthreads();
        for_slice<T, kVec>(row, rp.lo, rp.hi, [&](int, float l) {
          const uint32_t key = float_key(l) >> kDrop;
          if ((key >> hi) == prefix) hist_add(s, (key >> lo) & (kBins - 1), 0);
        });
        __syncthreads();
        hist_fold(s, par);
        cluster.sync();
        hist_totals(s, cluster, par);
        par ^= 1;
      }
      if (tid == 0) s.select = -1;
      __syncthreads();
      if (tid < kBins && s.above_count[tid] < k_rem && k_rem <= s.above_count[tid] + s.total_count[tid]) s.select = tid;
      __syncthreads();
      const int bin = s.select;
      k_rem -= s.above_count[bin];
      count_above += s.above_count[bin];
      prefix = (prefix << (hi - lo)) | static_cast<uint32_t>(bin);
      if (count_above + s.total_count[bin] <= kCand) {
        // Few tokens at or above this bin: collect every token whose z reaches the bin's lowest z, finish there.
        uint32_t bound = (prefix << lo) << kDrop;
        bound = bound > 0x007FFFFFu ? bound : 0x007FFFFFu;  // not below -inf's key
        const uint32_t low = low_key(div_rn(key_float(bound), temp), temp, bound);
        if (tid == 0) s.cand_count = 0;
        __syncthreads();
        for_slice<T, kVec>(row, rp.lo, rp.hi, [&](int j, float l) {
          if (float_key(l) >= low) push_candidate(s, j, l);
        });
        __syncthreads();
        const int n = gather(s, cluster, par);
        par ^= 1;
        if (n >= 0) return finish<true>(s, n, temp, zmax, rp.top_k, rp.use_p, rp.top_p, 0, u53);
        // More than kCand (ties made by the division by T): go on narrowing.
      }
      if (lo == 0) break;
      hi = lo;
    }
    // prefix is the k-th largest key without its constant low bits: all zero for >= +0, all one below.
    const uint32_t tau = (prefix << kDrop) | ((prefix >> (kKeyBits - 1)) ? 0u : (1u << kDrop) - 1u);
    survivor_key = low_key(div_rn(key_float(tau), temp), temp, tau);
  }

  // B: every token's e into the cache, the slice's mass, and top-p's first radix level.
  if (rp.use_p) hist_clear(s);
  __syncthreads();
  uint64_t mass = 0;
  const bool unit = temp == 1.0f;  // l / 1 == l exactly: skip the division
  for_slice<T, kVec>(row, rp.lo, rp.hi, [&](int j, float l) {
    const float e = float_key(l) >= survivor_key ? qexp(sub_rn(unit ? l : div_rn(l, temp), zmax)) : 0.0f;
    cache[j - rp.lo] = e;
    const uint64_t q = quantize(e);
    mass += q;
    if (rp.use_p && q) hist_add(s, (to_bits(e) - kMinPositiveBits) >> (kEBits - kDigit), q);
  });
  mass = block_reduce<false>(mass, s);
  if (rp.use_p) hist_fold(s, par);
  exchange_rank_values(s, cluster, par, mass);
  if (rp.use_p) hist_totals(s, cluster, par);
  par ^= 1;
  uint64_t total = 0;
  for (int r = 0; r < nranks; ++r) total += s.rank_mass[r];

  // P: top-p by radix select over e's bits, by mass.
  uint32_t kept_bits = kMinPositiveBits;  // kept: bits(e) >= kept_bits
  if (rp.use_p) {
    const uint64_t cut = top_p_cut(rp.top_p, total);
    uint32_t prefix = 0;
    uint64_t mass_above = 0, count_above = 0;
    for (int hi = kEBits;;) {
      const int lo = hi > kDigit ? hi - kDigit : 0;
      if (hi != kEBits) {
        hist_clear(s);
        __syncthreads();
        for (int i = tid; i < len; i += kThreads) {
          const uint32_t bits = to_bits(cache[i]);
          if (bits < kMinPositiveBits) continue;
          const uint32_t key = bits - kMinPositiveBits;
          if ((key >> hi) == prefix) hist_add(s, (key >> lo) & (kBins - 1), quantize(cache[i]));
        }
        __syncthreads();
        hist_fold(s, par);
        cluster.sync();
        hist_totals(s, cluster, par);
        par ^= 1;
      }
      // The lowest non-empty bin whose largest e still has less than `cut` above it.
      if (tid == 0) s.select = kBins;
      __syncthreads();
      if (tid < kBins && s.total_count[tid] > 0 && mass_above + s.above_mass[tid] < cut) atomicMin(&s.select, tid);
      __syncthreads();
      const int bin = s.select;
      mass_above += s.above_mass[bin];
      count_above += s.above_count[bin];
      prefix = (prefix << (hi - lo)) | static_cast<uint32_t>(bin);
      if (count_above + s.total_count[bin] <= kCand) {
        const uint32_t bound = kMinPositiveBits + (prefix << lo);
        if (tid == 0) s.cand_count = 0;
        __syncthreads();
        for (int i = tid; i < len; i += kThreads)
          if (to_bits(cache[i]) >= bound) push_candidate(s, rp.lo + i, cache[i]);
        __syncthreads();
        const int n = gather(s, cluster, par);
        par ^= 1;
        if (n >= 0) return finish<false>(s, n, temp, zmax, 0, true, rp.top_p, total, u53);
      }
      if (lo == 0) break;
      hi = lo;
    }
    kept_bits = kMinPositiveBits + prefix;
    uint64_t mine = 0;
    for (int i = tid; i < len; i += kThreads)
      if (to_bits(cache[i]) >= kept_bits) mine += quantize(cache[i]);
    mine = block_reduce<false>(mine, s);
    exchange_rank_values(s, cluster, par, mine);
    par ^= 1;
  }

  // L: the target position among the kept tokens in vocabulary order; the CTA whose slice holds it finds it.
  uint64_t kept_total = 0;
  for (int r = 0; r < nranks; ++r) kept_total += s.rank_mass[r];
  const uint64_t target = scale_uniform(u53, kept_total);
  int owner = 0;
  uint64_t before = 0;
  for (; owner < nranks - 1 && target >= before + s.rank_mass[owner]; ++owner) before += s.rank_mass[owner];
  if (rank == owner) {
    const uint64_t local = target - before;
    const int chunk = ((len + kThreads - 1) / kThreads) | 1;  // odd: the threads' reads spread over the banks
    const int c0 = min(len, tid * chunk), c1 = min(len, c0 + chunk);
    uint64_t mine = 0;
    for (int i = c0; i < c1; ++i)
      if (to_bits(cache[i]) >= kept_bits) mine += quantize(cache[i]);
    uint64_t acc = block_exclusive_scan(mine, s);
    if (acc <= local && local < acc + mine) {
      for (int i = c0; i < c1; ++i) {
        if (to_bits(cache[i]) >= kept_bits) acc += quantize(cache[i]);
        if (acc > local) {
          s.mail[par][0] = static_cast<uint64_t>(rp.lo + i);
          break;
        }
      }
    }
  }
  cluster.sync();
  if (tid == 0) s.result = static_cast<int32_t>(*cluster.map_shared_rank(&s.mail[par][0], owner));
  __syncthreads();
  par ^= 1;
  return s.result;
#undef u53
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) accept_sample_kernel(const AcceptSampleArgs a, const int slice) {
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char smem[];
  Shared& s = *reinterpret_cast<Shared*>(smem);
  float* cache = reinterpret_cast<float*>(smem + sizeof(Shared));
  const int tid = threadIdx.x;
  const int nranks = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());

  if (tid == 0) {  // the call's offset; the last CTA to get it advances it (see the top of this file)
    unsigned long long* offset = reinterpret_cast<unsigned long long*>(a.offset);
    const unsigned long long blocks = gridDim.x;
    const unsigned long long old = atomicAdd(offset, 1ull << 32);
    if ((old >> 32) == blocks - 1) atomicAdd(offset, 1ull - (blocks << 32));
    s.offset = old & 0xFFFFFFFFull;
  }
  __syncthreads();
  const int64_t b = blockIdx.x / nranks;
  if (b >= a.batch) return;  // the lone CTA of an empty batch

  RowParams rp;
  rp.b = b;
  rp.vocab = a.vocab;
  const int64_t lo = static_cast<int64_t>(rank) * slice;
  rp.lo = static_cast<int>(lo < a.vocab ? lo : a.vocab);
  rp.hi = static_cast<int>(rp.lo + slice < a.vocab ? rp.lo + slice : a.vocab);
  float temperature = a.temperature[b];
  if (!(temperature > 0) || !is_finite(temperature)) temperature = 0;
  rp.temperature = temperature;
  rp.top_k = a.top_k[b];
  rp.use_k = temperature > 0 && rp.top_k > 0 && rp.top_k < a.vocab;
  float top_p = a.top_p[b];
  rp.use_p = temperature > 0 && top_p < 1;
  rp.top_p = top_p > 0 ? top_p : 0.0f;
  rp.seed = static_cast<uint64_t>(*a.seed);
  rp.offset = s.offset;

  const int64_t* tokens = a.tokens + b * a.nodes;
  const int64_t* parents = a.parents + b * a.nodes;
  int64_t* accepted = a.accepted + b * a.max_accept;
  int64_t n = a.num_nodes[b];
  n = n < 1 ? 1 : (n > a.nodes ? a.nodes : n);
  const bool in_smem = n <= kTreeNodes;
  if (in_smem) {
    for (int64_t i = tid; i < n; i += kThreads) {
      s.tree_tokens[i] = static_cast<int32_t>(tokens[i] < 0 || tokens[i] > INT32_MAX ? -1 : tokens[i]);  // never a vocab id
      s.tree_parents[i] = static_cast<int32_t>(parents[i] < 0 || parents[i] >= i ? -1 : parents[i]);
    }
  }
  auto parent_of = [&](int64_t i) -> int64_t { return in_smem ? s.tree_parents[i] : parents[i]; };
  auto token_of = [&](int64_t i) -> int64_t { return in_smem ? s.tree_tokens[i] : tokens[i]; };
  const bool writer = rank == 0 && tid == 0;
  if (writer) accepted[0] = 0;
  int par = 0;
  int64_t cur = 0, len = 1, y = 0;
  while (true) {
    // The children of cur, listed before its draw so that their logits (this CTA's slice of them) are on
    // their way to L2 while cur is sampled: the next node's first pass then reads L2, not memory.
    const bool stepping = len < a.max_accept;
    __syncthreads();
    if (tid == 0) s.kid_count = 0, s.child = -1;
    __syncthreads();
    if (stepping) {
      for (int64_t i = cur + 1 + tid; i < n; i += kThreads) {
        if (parent_of(i) != cur) continue;
        const int pos = atomicAdd(&s.kid_count, 1);
        if (pos < kMaxKids) s.kids[pos] = static_cast<int>(i);
      }
      __syncthreads();
      if constexpr (kVec) {
        const uint32_t bytes = static_cast<uint32_t>((rp.hi - rp.lo) * sizeof(T)) & ~15u;
        if (tid < min(s.kid_count, kMaxKids) && bytes > 0) {
          const T* kid_row = static_cast<const T*>(a.logits) + b * a.logits_stride0 + s.kids[tid] * a.logits_stride1 + rp.lo;
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(kid_row), "r"(bytes) : "memory");
        }
      }
    }
    y = draw<T, kVec>(a, rp, cur, s, cache, cluster, par);
    if (!stepping) break;
    const int kids = s.kid_count;
    if (kids <= kMaxKids) {
      if (tid < kids && token_of(s.kids[tid]) == y) atomicMax(&s.child, s.kids[tid]);
    } else {
      for (int64_t i = cur + 1 + tid; i < n; i += kThreads)
        if (parent_of(i) == cur && token_of(i) == y) atomicMax(&s.child, static_cast<int>(i));
    }
    __syncthreads();
    const int child = s.child;
    if (child < 0) break;
    cur = child;
    if (writer) accepted[len] = cur;
    ++len;
  }
  if (rank == 0) {
    for (int64_t j = len + tid; j < a.max_accept; j += kThreads) accepted[j] = -1;
    if (tid == 0) {
      a.accept_len[b] = len;
      a.bonus[b] = y;
    }
  }
  cluster.sync();  // no CTA leaves while another may still read its shared memory
}

template <typename T>
cudaError_t launch(const AcceptSampleArgs& a, bool vec, int cluster, int min_cluster, cudaStream_t stream) {
  auto kernel = vec ? accept_sample_kernel<T, true> : accept_sample_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  for (;; cluster /= 2) {
    const int64_t slice = ((a.vocab + cluster - 1) / cluster + 7) / 8 * 8;
    const size_t smem = sizeof(Shared) + static_cast<size_t>(slice) * sizeof(float);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>((a.batch > 0 ? a.batch : 1) * cluster));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr = {};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = static_cast<unsigned>(cluster);
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    if (cluster > min_cluster && cluster > kSamplePortableCluster / 2) {
      // A large cluster needs that many free SMs in one GPC: fall back to a smaller one where it never fits.
      int active = 0;
      if (cudaOccupancyMaxActiveClusters(&active, kernel, &cfg) != cudaSuccess || active < 1) {
        (void)cudaGetLastError();
        continue;
      }
    }
    return cudaLaunchKernelEx(&cfg, kernel, a, static_cast<int>(slice));
  }
}

}  // namespace

cudaError_t accept_sample(const AcceptSampleArgs& a, cudaStream_t stream) {
  if (a.nodes < 1 || a.vocab < 1 || a.vocab > kSampleMaxVocab || a.max_accept < 1) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // The fewest CTAs a row that fit its slice in shared memory, doubled while the batch leaves SMs idle and
  // each CTA keeps at least kMinSlice tokens. JETSPEC_ACCEPT_SAMPLE_CLUSTER (a power of two) overrides the
  // doubling, for tuning.
  constexpr int64_t kMinSlice = 2048;
  int min_cluster = 1;
  while (min_cluster * kSampleMaxSlice < a.vocab) min_cluster *= 2;
  int cluster = min_cluster;
  while (cluster < kSampleMaxCluster && a.batch * 2 * cluster <= sms && a.vocab / (2 * cluster) >= kMinSlice) cluster *= 2;
  if (const char* forced = std::getenv("JETSPEC_ACCEPT_SAMPLE_CLUSTER")) {
    const int want = std::atoi(forced);
    if (want >= 1 && want <= kSampleMaxCluster && (want & (want - 1)) == 0) cluster = want > min_cluster ? want : min_cluster;
  }
  if (a.batch == 0) cluster = min_cluster = 1;
  const int64_t es = a.dtype == SampleDtype::kFloat32 ? 4 : 2;
  const bool vec = reinterpret_cast<uintptr_t>(a.logits) % 16 == 0 &&
                   (a.batch <= 1 || (a.logits_stride0 * es) % 16 == 0) &&
                   (a.nodes <= 1 || (a.logits_stride1 * es) % 16 == 0);
  switch (a.dtype) {
    case SampleDtype::kBFloat16:
      return launch<__nv_bfloat16_raw>(a, vec, cluster, min_cluster, stream);
    case SampleDtype::kFloat16:
      return launch<__half>(a, vec, cluster, min_cluster, stream);
    default:
      return launch<float>(a, vec, cluster, min_cluster, stream);
  }
}

}  // namespace jetspec::cuda
