// build_tree: the best-first tree of the CPU reference (a float64 heap), node for node, one block per tree.
//
// Why a frontier of sibling cursors pops in the heap's order. The heap pops the smallest of its
// keys (-score, node index), all distinct. A node's children are created together, in rank order,
// and score score(parent) + logprob[d][r] with logprob descending in r; float64 addition is
// monotone, so siblings' keys increase with rank. Among the unpopped nodes, the smallest key is
// therefore the next unpopped child of some expanded node. The frontier keeps one entry per
// expanded node, holding that child as its candidate; a pop takes the best candidate and moves its
// entry on to the next sibling. Nodes at depth D never expand (the reference pops them and does
// nothing), so no entry is kept for the children of a node at depth D - 1. Scores are computed
// exactly as the reference does: score(child) = score(parent) + (double)logprob, the root scoring
// +0.0 (so no score is ever -0.0 and bit patterns order like values), and ties go to the lower node
// index because the node index sits in the top bits of the word compared last.
//
// Phase 1 (warp 0): entry e is owned by lane e % 32, which keeps its candidate in shared memory and
// the best of its own entries in registers. A pop is a warp-wide argmax of the lane bests: a
// reduction on the high word of the score, which almost always leaves one lane (then two shuffles
// fetch the rest of its key), else reductions on the low word and the node index. The popped
// node's K children are written by K lanes at once; only the popped entry's owner rescans its
// entries (at most ceil(N / K / 32) of them) and only the owner of a new entry updates its best.
// Meanwhile the other warps zero the ancestor rows.
// Phase 2 (whole block): one thread per node writes its token, parent, depth and position
// (coalesced) and its ancestor words: it walks its parent chain (at most D + 1 nodes, indices
// decreasing), ORs the bits of each 32-node word in a register and stores each non-zero word once.
#include "build_tree.cuh"

namespace jetspec::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// Entries are made only by expansions that leave room for more nodes (1 + K * entries < N): with
// K >= 2 fewer than N / 2 of them; with K = 1 the tree is a chain and fewer than D.
constexpr int kMaxEntries = kTreeMaxNodes / 2;

// A candidate in the reference heap's order: higher score first, then lower node index. `score` is the
// float64 bit pattern mapped so that unsigned order is numeric order; w packs the node index (bits
// 20-29, so that comparing w compares indices), its entry (10-19), rank (5-9) and the candidates' row
// of topk_logprobs (0-4). The dead key loses to every score, -inf included (no score maps to 0).
struct Key {
  uint64_t score;
  uint32_t w;
};
__device__ __forceinline__ Key dead() { return {0ull, ~0u}; }

// Branch-free: a lane's best is updated with selects, not divergent jumps.
__device__ __forceinline__ Key best_of(const Key& a, const Key& b) {
  const bool a_wins = (a.score > b.score) | ((a.score == b.score) & (a.w < b.w));
  return {a_wins ? a.score : b.score, a_wins ? a.w : b.w};
}

__device__ __forceinline__ Key encode(double score, uint32_t w) {
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(score));
  return {u ^ ((u >> 63) ? ~0ull : (1ull << 63)), w};
}

__device__ __forceinline__ double decode(const Key& k) {
  return __longlong_as_double(static_cast<long long>(k.score ^ ((k.score >> 63) ? (1ull << 63) : ~0ull)));
}

__device__ __forceinline__ uint32_t pack(int node, int entry, int rank, int row) {
  return static_cast<uint32_t>(node) << 20 | static_cast<uint32_t>(entry) << 10 | static_cast<uint32_t>(rank) << 5 |
         static_cast<uint32_t>(row);
}

// --use_fast_math would widen a float32 subnormal to 0.0 (cvt.ftz); the reference widens it exactly.
__device__ __forceinline__ double widen(float x) {
  double y;
  asm("cvt.f64.f32 %0, %1;" : "=d"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void store(uint4* slot, const Key& k) {
  *slot = make_uint4(static_cast<uint32_t>(k.score >> 32), static_cast<uint32_t>(k.score), k.w, 0u);
}

__device__ __forceinline__ Key load(const uint4* slot) {
  const uint4 v = *slot;
  return {static_cast<uint64_t>(v.x) << 32 | v.y, v.z};
}

// The best of the 32 lanes' keys, known to every lane, from reductions on 32-bit words: the lanes
// holding the highest high word of the score (almost always one) give the low word and w; only
// when several hold it does w need a reduction of its own among equal scores.
__device__ __forceinline__ Key warp_best(const Key& k) {
  const uint32_t my_hi = static_cast<uint32_t>(k.score >> 32), my_lo = static_cast<uint32_t>(k.score);
  const uint32_t hi = __reduce_max_sync(kFull, my_hi);
  const bool holder = my_hi == hi;
  const uint32_t holders = __ballot_sync(kFull, holder);
  const uint32_t lo = __reduce_max_sync(kFull, holder ? my_lo : 0u);
  uint32_t w = __reduce_min_sync(kFull, holder ? k.w : ~0u);
  if (holders & (holders - 1)) w = __reduce_min_sync(kFull, holder && my_lo == lo ? k.w : ~0u);
  return {static_cast<uint64_t>(hi) << 32 | lo, w};
}

// Node record in shared memory: parent + 1 (bits 16-26), depth (8-13), rank among its siblings (0-4).
__device__ __forceinline__ int parent_of(uint32_t node) { return static_cast<int>(node >> 16) - 1; }

// Phase 1, run by the 32 lanes of warp 0: fills node[0, n) and returns n. Lane l owns entries l,
// l + 32, ..., at most kSlots of them. All but the stores is uniform across the lanes and branch-free,
// so that the loads of the popped entry's next key, of the new entry's key and of every lane's own
// entries are in flight together and the rescan is a balanced tree of selects.
template <int kSlots>
__device__ int grow(const double* lp, uint32_t* node, uint4* cand, double* parent_score, int depth, int width,
                    int budget, int lane) {
  int n = 1, entries = 0;
  // The popped node: first the root, which scores +0.0 and belongs to no entry.
  int popped = 0, popped_depth = 0, entry = -1, rank = 0;
  double score = 0.0;
  node[0] = 0;  // parent -1, depth 0
  // Frontier candidates are never at depth D: only the root (when D = 0) can fail this.
  while (popped_depth < depth) {
    // Every load of this pop first, unconditionally, so that they are all in flight together: the
    // popped entry's parent score and next candidate (the root, which has no entry, reads lp[0] as a
    // stand-in, never used), the first candidate of the popped node's children, and this lane's entries.
    const int row = popped_depth - 1;
    const double parent = *(entry >= 0 ? &parent_score[entry] : lp);
    const double next_lp = lp[max(row, 0) * width + min(rank + 1, width - 1)];
    const double first_lp = lp[popped_depth * width];
    Key mine[kSlots];
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int j = lane + 32 * i;
      mine[i] = j < entries && j != entry ? load(&cand[j]) : dead();
    }
    const int first = n, kids = min(width, budget - n);
    if (lane < kids) node[first + lane] = static_cast<uint32_t>(popped + 1) << 16 | (popped_depth + 1) << 8 | lane;
    n += kids;
    if (n == budget) break;
    // The popped node's entry moves on to its next sibling, if any; its children become an entry when
    // they can expand.
    const bool more = entry >= 0 && rank + 1 < width;
    const bool grows = popped_depth + 1 < depth;
#pragma unroll
    for (int stride = 1; stride < kSlots; stride *= 2)
#pragma unroll
      for (int i = 0; i + stride < kSlots; i += 2 * stride) mine[i] = best_of(mine[i], mine[i + stride]);
    Key best = mine[0];
    const Key next = more ? encode(parent + next_lp, pack(popped + 1, entry, rank + 1, row)) : dead();
    const Key fresh = encode(score + first_lp, pack(first, entries, 0, popped_depth));
    if (entry >= 0 && lane == (entry & 31)) {
      store(&cand[entry], next);
      best = best_of(best, next);
    }
    if (grows) {
      if (lane == (entries & 31)) {
        store(&cand[entries], fresh);
        parent_score[entries] = score;
        best = best_of(best, fresh);
      }
      ++entries;
    }
    __syncwarp();  // orders parent_score's store before other lanes load it
    const Key top = warp_best(best);
    if (top.score == 0) break;  // no candidate left: every unexpanded node is at depth D
    popped = static_cast<int>(top.w >> 20);
    entry = static_cast<int>(top.w >> 10) & 1023;
    rank = static_cast<int>(top.w >> 5) & 31;
    popped_depth = static_cast<int>(top.w & 31) + 1;
    score = decode(top);
  }
  return n;
}

template <int kSlots>
__global__ void __launch_bounds__(kThreads) build_tree_kernel(BuildTreeArgs a) {
  __shared__ double lp_s[kTreeMaxDepth * kTreeMaxWidth];  // widened once, as the reference does
  __shared__ int64_t id_s[kTreeMaxDepth * kTreeMaxWidth];
  __shared__ uint32_t node_s[kTreeMaxNodes];
  __shared__ uint4 cand_s[kMaxEntries];  // each entry's candidate, touched only by its owner lane
  __shared__ double parent_score_s[kMaxEntries];
  __shared__ int count_s;

  const int64_t b = blockIdx.x;
  const int depth = static_cast<int>(a.depth), width = static_cast<int>(a.width), budget = static_cast<int>(a.nodes);
  const int words = (budget + 31) / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Loaded now, used after phase 1: the global round trip overlaps it.
  const int64_t root = a.root_token[b * a.root_stride], base = a.base_pos[b * a.base_stride];
  for (int f = tid; f < depth * width; f += kThreads) {
    const int d = f / width, r = f - d * width;
    lp_s[f] = widen(a.logprobs[b * a.logprobs_stride[0] + d * a.logprobs_stride[1] + r * a.logprobs_stride[2]]);
    id_s[f] = a.ids[b * a.ids_stride[0] + d * a.ids_stride[1] + r * a.ids_stride[2]];
  }
  int32_t* anc = a.ancestors + b * a.ancestors_stride[0];
  __syncthreads();

  if (warp == 0) {
    const int n = grow<kSlots>(lp_s, node_s, cand_s, parent_score_s, depth, width, budget, lane);
    if (lane == 0) count_s = n;
  } else {
    for (int i = warp - 1; i < budget; i += kWarps - 1)
      for (int w = lane; w < words; w += 32) anc[i * a.ancestors_stride[1] + w * a.ancestors_stride[2]] = 0;
  }
  __syncthreads();  // also orders the zeros before the ancestor words stored below

  const int count = count_s;
  for (int i = tid; i < budget; i += kThreads) {
    int64_t token = 0, parent = -1, node_depth = 0;
    int32_t* row = anc + i * a.ancestors_stride[1];
    int word = i >> 5;
    uint32_t bits = 1u << (i & 31);
    if (i < count) {
      const uint32_t rec = node_s[i];
      parent = parent_of(rec);
      node_depth = (rec >> 8) & 0xff;
      token = i == 0 ? root : id_s[(node_depth - 1) * width + (rec & 0xff)];
      for (int j = static_cast<int>(parent); j >= 0; j = parent_of(node_s[j])) {
        if ((j >> 5) != word) {
          row[word * a.ancestors_stride[2]] = static_cast<int32_t>(bits);
          word = j >> 5;
          bits = 0;
        }
        bits |= 1u << (j & 31);
      }
    }
    row[word * a.ancestors_stride[2]] = static_cast<int32_t>(bits);
    a.tokens[b * a.tokens_stride[0] + i * a.tokens_stride[1]] = token;
    a.parents[b * a.parents_stride[0] + i * a.parents_stride[1]] = parent;
    a.depths[b * a.depths_stride[0] + i * a.depths_stride[1]] = node_depth;
    a.positions[b * a.positions_stride[0] + i * a.positions_stride[1]] = base + node_depth;
  }
  if (tid == 0) a.num_nodes[b * a.num_nodes_stride] = count;
}

// Most entries one tree can need. Each is made by a full expansion (K nodes) after which the tree is
// still short of N nodes, by a node at depth <= D - 2.
int64_t max_entries(const BuildTreeArgs& a) {
  if (a.nodes < 2 || a.depth < 2) return 0;
  const int64_t by_budget = (a.nodes - 2) / a.width;
  int64_t by_depth = 0, level = 1;
  for (int64_t d = 0; d <= a.depth - 2 && by_depth < by_budget; ++d, level *= a.width) by_depth += level;
  return by_depth < by_budget ? by_depth : by_budget;
}

template <int kSlots>
cudaError_t launch(const BuildTreeArgs& a, cudaStream_t stream) {
  build_tree_kernel<kSlots><<<static_cast<unsigned>(a.batch), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t build_tree(const BuildTreeArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (a.depth < 0 || a.depth > kTreeMaxDepth || a.width < 1 || a.width > kTreeMaxWidth || a.nodes < 1 ||
      a.nodes > kTreeMaxNodes || a.batch > 0x7fffffff)
    return cudaErrorInvalidValue;
  // The fewest entry slots per lane that hold every entry: fewer loads and selects per pop.
  const int64_t slots = (max_entries(a) + 31) / 32;
  if (slots <= 1) return launch<1>(a, stream);
  if (slots <= 2) return launch<2>(a, stream);
  if (slots <= 4) return launch<4>(a, stream);
  if (slots <= 8) return launch<8>(a, stream);
  return launch<kMaxEntries / 32>(a, stream);
}

}  // namespace jetspec::cuda
