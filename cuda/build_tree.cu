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
// Phase 1 (warp 0): entry e is owned by lane e % 32, which keeps the best candidate of its entries
// in a register; the candidates live in shared memory, each owner's side by side. A pop is a
// warp-wide argmax: reductions on the high word of the score, which almost always leave one lane,
// then on the low word and the node index. After a pop only the popped entry's owner has a stale
// best: its (at most 16) candidates are loaded one per lane, with the moved entry's new candidate
// (and the new entry's, if it is the owner's) substituted, and the next pop is the argmax over the
// other lanes' bests and these, while a second argmax over them alone, interleaved with the first,
// refreshes the owner's best. So a pop costs the same whatever K is: one round of shared loads,
// two float64 additions and two interleaved reductions. A pop records only the popped node: every
// expansion but the last adds exactly K nodes, so a node's index tells its expansion and rank.
// Meanwhile the warps that do not share warp 0's scheduler zero the ancestor rows.
// Phase 2 (whole block): each node's record (parent, depth, rank) is derived from its expansion;
// then one thread per node writes its token, parent, depth and position (coalesced) and its
// ancestor words: it walks its parent chain (at most D + 1 nodes, indices decreasing), ORs the bits
// of each 32-node word in a register and stores each non-zero word once.
#include "build_tree.cuh"

namespace jetspec::cuda {
namespace {

constexpr int kThreads = 1024;  // one thread per node in phase 2
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// Entries are made only by full expansions (K nodes) that leave room for more nodes
// (1 + K * entries < N): with K >= 2 fewer than N / 2 of them, so at most kSlots = 16 per owner
// lane; with K = 1 the tree is a chain and there are fewer than D.
constexpr int kSlots = kTreeMaxNodes / 2 / 32;

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

// Negative scores get every bit flipped, the others their sign bit set: then unsigned order is
// numeric order (a shift and two logic ops, no branch).
__device__ __forceinline__ Key encode(double score, uint32_t w) {
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(score));
  return {u ^ (static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | (1ull << 63)), w};
}

__device__ __forceinline__ double decode(const Key& k) {
  const uint64_t flip = ~static_cast<uint64_t>(static_cast<int64_t>(k.score) >> 63) | (1ull << 63);
  return __longlong_as_double(static_cast<long long>(k.score ^ flip));
}

__device__ __forceinline__ uint32_t pack(int node, int entry, int rank, int row) {
  return static_cast<uint32_t>(node) << 20 | static_cast<uint32_t>(entry) << 10 | static_cast<uint32_t>(rank) << 5 |
         static_cast<uint32_t>(row);
}

// A plain cast compiles to cvt.ftz.f64.f32 under --use_fast_math, which PTX allows to flush float32
// subnormals to 0.0; the reference widens them exactly, and so does cvt without .ftz.
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

// The best of the 32 lanes' keys `a`, and of their keys `b`, known to every lane: two independent
// argmaxes side by side, so that their reductions overlap. Reductions work on 32-bit words: the
// lanes holding the highest high word of the score (almost always one) give the low word and w;
// only when several hold it does w need a reduction of its own among equal scores.
__device__ __forceinline__ void warp_best(const Key& a, const Key& b, Key& best_a, Key& best_b) {
  const uint32_t a_hi = static_cast<uint32_t>(a.score >> 32), a_lo = static_cast<uint32_t>(a.score);
  const uint32_t b_hi = static_cast<uint32_t>(b.score >> 32), b_lo = static_cast<uint32_t>(b.score);
  const uint32_t hi_a = __reduce_max_sync(kFull, a_hi), hi_b = __reduce_max_sync(kFull, b_hi);
  const bool holds_a = a_hi == hi_a, holds_b = b_hi == hi_b;
  const uint32_t holders_a = __ballot_sync(kFull, holds_a), holders_b = __ballot_sync(kFull, holds_b);
  const uint32_t lo_a = __reduce_max_sync(kFull, holds_a ? a_lo : 0u);
  const uint32_t lo_b = __reduce_max_sync(kFull, holds_b ? b_lo : 0u);
  uint32_t w_a = __reduce_min_sync(kFull, holds_a ? a.w : ~0u), w_b = __reduce_min_sync(kFull, holds_b ? b.w : ~0u);
  if (holders_a & (holders_a - 1)) w_a = __reduce_min_sync(kFull, holds_a && a_lo == lo_a ? a.w : ~0u);
  if (holders_b & (holders_b - 1)) w_b = __reduce_min_sync(kFull, holds_b && b_lo == lo_b ? b.w : ~0u);
  best_a = {static_cast<uint64_t>(hi_a) << 32 | lo_a, w_a};
  best_b = {static_cast<uint64_t>(hi_b) << 32 | lo_b, w_b};
}

// Node record in shared memory: parent + 1 (bits 16-26), depth (8-13), rank among its siblings (0-4).
__device__ __forceinline__ int parent_of(uint32_t node) { return static_cast<int>(node >> 16) - 1; }

// Shared memory of phase 1, in one struct so that every access is one base register plus an offset.
struct Frontier {
  double lp[kTreeMaxDepth * kTreeMaxWidth];  // topk_logprobs, widened once as the reference does
  // cand[32 l + i] is the candidate of entry 32 i + l; slots past kSlots are never used, so that
  // lane i can load slot i of any owner unconditionally.
  uint4 cand[32 * 32];
  double parent_score[32 * kSlots];  // of each entry's parent
  // Expansion x (x = 0 is the root's) creates nodes 1 + K x ... 1 + K x + K - 1 (the last one fewer,
  // where the budget ends); expanded[x] is its popped node | that node's depth << 16.
  uint32_t expanded[kTreeMaxNodes];
};

// Phase 1, run by the 32 lanes of warp 0: fills f.expanded and returns the number of nodes.
__device__ int grow(Frontier& f, int depth, int width, int budget, int lane) {
  const double* lp = f.lp;
  uint4* cand = f.cand;
  double* parent_score = f.parent_score;
  uint32_t* expanded = f.expanded;
  // The root pops first: it scores +0.0, and expands unless D = 0.
  if (depth == 0) return 1;
  int n = 1 + min(width, budget - 1), entries = 0, expansions = 1;
  if (lane == 0) expanded[0] = 0;
  Key best = dead(), view = dead();  // this lane's best candidate; one candidate of the last popped entry's owner
  int owner = -1;                    // that owner: its best is dead, `view` holds its candidates
  if (depth > 1 && n < budget) {     // the root's children can expand: they are entry 0
    best = lane == 0 ? encode(0.0 + lp[0], pack(1, 0, 0, 0)) : dead();
    if (lane == 0) {
      store(&cand[0], best);
      parent_score[0] = 0.0;
    }
    entries = 1;
  }
  while (n < budget) {
    __syncwarp();  // orders the last pop's stores before other lanes load them
    // The next pop is the best of the other lanes' bests and the owner's candidates; a second
    // argmax over the latter alone refreshes the owner's best.
    Key top, owner_best;
    warp_best(best_of(best, view), view, top, owner_best);
    if (lane == owner) best = owner_best;
    if (top.score == 0) break;  // no candidate left: every unexpanded node is at depth D
    const int popped = static_cast<int>(top.w >> 20), entry = static_cast<int>(top.w >> 10) & 1023;
    const int rank = static_cast<int>(top.w >> 5) & 31, row = static_cast<int>(top.w & 31);
    const int popped_depth = row + 1;  // < D: frontier candidates are never at depth D
    const double score = decode(top);
    owner = entry & 31;
    if (lane == owner) best = dead();  // it was the popped candidate; `view` stands in until refreshed
    // Every load of this pop first, so that they are in flight together: the popped entry's parent
    // score and next candidate, the first candidate of the popped node's children, and the owner's
    // candidates, one per lane.
    const double parent = parent_score[entry];
    const double next_lp = lp[row * width + min(rank + 1, width - 1)];
    const double first_lp = lp[popped_depth * width];
    const Key stored = load(&cand[owner * 32 + lane]);
    view = lane < (entries - owner + 31) >> 5 ? stored : dead();  // entries owner, owner + 32, ...
    if (lane == 0) expanded[expansions] = static_cast<uint32_t>(popped) | static_cast<uint32_t>(popped_depth) << 16;
    ++expansions;
    const int first = n;
    n += min(width, budget - n);
    if (n == budget) break;
    // The popped entry moves on to its next sibling (node and rank one up), if any; the popped node's
    // children become an entry when they can expand. A candidate is stored by the lane that loads
    // its slot (lane i loads slot i), so that no lane writes what another reads before the next
    // __syncwarp.
    const Key next = rank + 1 < width ? encode(parent + next_lp, top.w + (1u << 20) + (1u << 5)) : dead();
    if (lane == entry >> 5) {
      view = next;
      store(&cand[owner * 32 + lane], next);
    }
    if (popped_depth + 1 < depth) {
      const Key fresh = encode(score + first_lp, pack(first, entries, 0, popped_depth));
      if (lane == (entries & 31)) best = best_of(best, fresh);
      if (lane == entries >> 5) {
        if ((entries & 31) == owner) view = fresh;
        store(&cand[(entries & 31) * 32 + lane], fresh);
        parent_score[entries] = score;
      }
      ++entries;
    }
  }
  return n;
}

__global__ void __launch_bounds__(kThreads) build_tree_kernel(BuildTreeArgs a) {
  __shared__ Frontier frontier;
  __shared__ int64_t id_s[kTreeMaxDepth * kTreeMaxWidth];
  __shared__ uint32_t node_s[kTreeMaxNodes];
  __shared__ int count_s;

  const int64_t b = blockIdx.x;
  const int depth = static_cast<int>(a.depth), width = static_cast<int>(a.width), budget = static_cast<int>(a.nodes);
  const int words = (budget + 31) / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Loaded now, used after phase 1: the global round trip overlaps it.
  const int64_t root = a.root_token[b * a.root_stride], base = a.base_pos[b * a.base_stride];
  for (int f = tid; f < depth * width; f += kThreads) {
    const int d = f / width, r = f - d * width;
    frontier.lp[f] = widen(a.logprobs[b * a.logprobs_stride[0] + d * a.logprobs_stride[1] + r * a.logprobs_stride[2]]);
    id_s[f] = a.ids[b * a.ids_stride[0] + d * a.ids_stride[1] + r * a.ids_stride[2]];
  }
  int32_t* anc = a.ancestors + b * a.ancestors_stride[0];
  __syncthreads();

  if (warp == 0) {
    const int n = grow(frontier, depth, width, budget, lane);
    if (lane == 0) count_s = n;
  } else if (warp % 4 != 0) {
    // Warps 4, 8, ... would share warp 0's scheduler (warps are dealt to the SM's four schedulers in
    // turn) and take issue slots from its chain of pops: they stay idle.
    const int zeroing = warp - 1 - warp / 4;
    for (int i = zeroing; i < budget; i += kWarps - kWarps / 4)
      for (int w = lane; w < words; w += 32) anc[i * a.ancestors_stride[1] + w * a.ancestors_stride[2]] = 0;
  }
  __syncthreads();  // also orders the zeros before the ancestor words stored below

  const int count = count_s;
  for (int i = 1 + tid; i < count; i += kThreads) {
    const int x = (i - 1) / width;
    const uint32_t popped = frontier.expanded[x];
    node_s[i] = ((popped & 0xffff) + 1) << 16 | ((popped >> 16) + 1) << 8 | static_cast<uint32_t>(i - 1 - x * width);
  }
  if (tid == 0) node_s[0] = 0;  // parent -1, depth 0
  __syncthreads();

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

}  // namespace

cudaError_t build_tree(const BuildTreeArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (a.depth < 0 || a.depth > kTreeMaxDepth || a.width < 1 || a.width > kTreeMaxWidth || a.nodes < 1 ||
      a.nodes > kTreeMaxNodes || a.batch > 0x7fffffff)
    return cudaErrorInvalidValue;
  build_tree_kernel<<<static_cast<unsigned>(a.batch), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jetspec::cuda
