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
// Phase 1 has two paths. The threshold path (half the block) serves the wide trees of many expansions,
// where a chain of single pops is long; the pop path (warp 0) serves the rest, and every tree the
// threshold path cannot settle.
//
// Threshold path (warps 0-15; warps 16-31 meanwhile zero the ancestor rows). Expansion 0 is the
// root's; the others are the best T = ceil((N - 1) / K) - 1 expandable nodes (depth < D) in heap
// order. (1) A bound tau with at least T + 1 such nodes scoring tau or more: every log-prob is
// rounded away from zero to a multiple of h (so a rounded score never exceeds the true one) and a
// histogram of rounded scores over 1024 bins of width h is propagated depth by depth (bin j gains
// bin j - q from each candidate of rounded size q h); the first bin where the running count reaches
// T + 1 gives tau. h spans a score every node of the first full levels holding T + 1 nodes reaches,
// so tau is never below it. (2) Every expandable node scoring tau or more is found, depth by depth:
// a parent's children above tau are a prefix of its candidates, and a warp-wide prefix sum plus one
// shared atomic per warp gives them slots. (3) A bucket sort orders them by score, then by parent,
// then by slot (rank, for siblings). The first T are the expansions when no node among them scores
// the same as a node of another parent: then the heap's order is the score order, and sibling ties
// go by rank as in the heap. Otherwise (a tie between cousins or between a node and its parent, all
// log-probs 0, more than kFound nodes above tau, more than kBucketCrowd in one bucket) the pop path
// builds the tree instead; a log-prob repeated within a row, the common cause of ties, sends the tree
// to the pop path before the threshold path starts.
// Pop path (warp 0): entry e is owned by lane e % 32, which keeps the best candidate of its entries
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
#include "ptx.cuh"

namespace jetspec::cuda {
namespace {

constexpr int kThreads = 1024;  // one thread per node in phase 2
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// Entries are made only by full expansions (K nodes) that leave room for more nodes
// (1 + K * entries < N): with K >= 2 fewer than N / 2 of them, so at most kSlots = 16 per owner
// lane; with K = 1 the tree is a chain and there are fewer than D.
constexpr int kSlots = kTreeMaxNodes / 2 / 32;
// The threshold path runs on the first kGroup threads (barrier 1) while the others zero the ancestor
// rows (a single block stores them at about 10 bytes a cycle). Two score bins per thread; bin counts
// saturate at kCountCap, so that a prefix over all bins fits 32 bits; at most kFound nodes above
// the bound (twice the most expansions).
constexpr int kGroup = 512;
constexpr int kGroupWarps = kGroup / 32;
constexpr int kBins = 2 * kGroup;
constexpr uint32_t kCountCap = 1u << 20;
constexpr int kFound = 1024;
constexpr int kBuckets = 2 * kGroup;  // of the sort by score
constexpr uint32_t kBucketCrowd = 64;
constexpr unsigned kZeroPauseNs = 300;  // see zero_ancestors

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
__device__ __forceinline__ uint64_t encode_score(double score) {
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(score));
  return u ^ (static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | (1ull << 63));
}

__device__ __forceinline__ Key encode(double score, uint32_t w) { return {encode_score(score), w}; }

__device__ __forceinline__ double decode_score(uint64_t score) {
  const uint64_t flip = ~static_cast<uint64_t>(static_cast<int64_t>(score) >> 63) | (1ull << 63);
  return __longlong_as_double(static_cast<long long>(score ^ flip));
}

__device__ __forceinline__ double decode(const Key& k) { return decode_score(k.score); }

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

// The pop path's shared memory, in one struct so that every access is one base register plus an offset.
struct Frontier {
  // cand[32 l + i] is the candidate of entry 32 i + l; slots past kSlots are never used, so that
  // lane i can load slot i of any owner unconditionally.
  uint4 cand[32 * 32];
  double parent_score[32 * kSlots];  // of each entry's parent
};

// The threshold path's shared memory while it counts...
struct Counting {
  uint32_t hist[2][2 * kBins];  // kBins zeros, then nodes per rounded score, at the depth just done and the next
  int step[kTreeMaxDepth * kTreeMaxWidth];  // each candidate's rounded size, in bins
};

// ... and once it has found the nodes above its bound. A node's slot is its index in these arrays
// until the sort, which moves only key and order.
struct Found {
  uint64_t key[kFound];  // encode_score(score)
  // parent field << 10 | slot: ordering by it after the score keeps siblings in rank order.
  uint32_t order[kFound];
  // parent field (0 for the root, else the parent's slot + 1) | depth << 12 | rank << 20; after the
  // sort, the slot's expansion number.
  uint32_t node[kFound];
  uint32_t bucket[kBuckets];  // nodes per score bucket, then the bucket's first position
  uint32_t ranked[kFound];    // slots grouped by bucket (arrival order within one), then in heap order
};

struct Shared {
  double lp[kTreeMaxDepth * kTreeMaxWidth];  // topk_logprobs, widened once as the reference does
  int64_t id[kTreeMaxDepth * kTreeMaxWidth];
  // Expansion x (x = 0 is the root's) creates nodes 1 + K x ... 1 + K x + K - 1 (the last one fewer,
  // where the budget ends); expanded[x] is its popped node | that node's depth << 16.
  uint32_t expanded[kTreeMaxNodes];
  union {
    Frontier frontier;
    Counting counting;
    Found found;
    uint32_t node[kTreeMaxNodes];  // phase 2's node records
  };
  int level_size[kTreeMaxDepth];  // threshold path: nodes found at each depth
  uint64_t warp_total[kGroupWarps];  // threshold path: scan scratch
  double low;                     // threshold path: the lowest score the bins span, or -inf
  int bin;                        // threshold path: the bin that sets the bound
  int count;                      // nodes built
};

// Phase 1, pop path, run by the 32 lanes of warp 0: fills expanded and returns the number of nodes.
__device__ int grow(const double* lp, Frontier& f, uint32_t* expanded, int depth, int width, int budget, int lane) {
  uint4* cand = f.cand;
  double* parent_score = f.parent_score;
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

// The sum of v over the warp's lanes up to this one.
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T v, int lane) {
  for (int o = 1; o < 32; o <<= 1) {
    const T up = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += up;
  }
  return v;
}

// atomicAdd on shared memory, as one instruction: the compiler's own atomicAdd, called by one lane,
// grows a warp-aggregation path of five shuffles.
__device__ __forceinline__ int shared_fetch_add(int* address, int v) {
  int old;
  asm volatile("atom.shared.add.u32 %0, [%1], %2;"
               : "=r"(old)
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(address))), "r"(v)
               : "memory");
  return old;
}

// Barriers of the threshold path's warps alone (barrier 1), while the other warps zero the ancestor rows.
// compute-sanitizer's racecheck reports hazards between accesses that later __syncthreads() separate in
// kernels with such counted barriers, a race-free 20-line kernel included
// (bench/results/h100/build_tree_threshold/named_barrier_repro.cu); synccheck and memcheck are clean.
__device__ __forceinline__ void group_sync() { ptx::named_barrier_sync(1, kGroup); }

__device__ __forceinline__ bool group_sync_or(bool v) {
  uint32_t any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 1, %2, p;\n selp.u32 %0, 1, 0, q;\n}"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(v)), "n"(kGroup)
      : "memory");
  return any != 0;
}

// Exclusive prefix sums over the group's threads, in thread order, of both 32-bit halves of v at once
// (neither half's total reaches 2^32, so no carry crosses); `total` gets the whole group's sums.
// Ends with a group barrier.
__device__ __forceinline__ uint64_t group_exclusive_sum(uint64_t v, uint64_t* warp_total, int tid, uint64_t& total) {
  const int lane = tid & 31, warp = tid >> 5;
  uint64_t prefix = warp_inclusive_sum(v, lane);
  if (lane == 31) warp_total[warp] = prefix;
  group_sync();
  total = 0;
  for (int w = 0; w < kGroupWarps; ++w) {
    const uint64_t t = warp_total[w];
    total += t;
    if (w < warp) prefix += t;
  }
  return prefix - v;
}

__device__ __forceinline__ uint64_t pair(uint32_t low, uint32_t high) {
  return static_cast<uint64_t>(high) << 32 | low;
}

// Exclusive prefix sum over the warp's lanes of v < 64: one ballot per bit, all independent.
__device__ __forceinline__ uint32_t warp_exclusive_small_sum(uint32_t v, int lane) {
  const uint32_t below = (1u << lane) - 1;
  uint32_t sum = 0;
#pragma unroll
  for (int bit = 0; bit < 6; ++bit) sum += static_cast<uint32_t>(__popc(__ballot_sync(kFull, (v >> bit) & 1) & below)) << bit;
  return sum;
}

// Phase 1, threshold path, run by the first kGroup threads: fills s.expanded and returns the number
// of nodes, or -1 (the same in every thread) when the scores do not settle the heap's order.
__device__ int grow_by_threshold(Shared& s, int depth, int width, int budget, int tid) {
  const int lane = tid & 31, warp = tid >> 5;
  const int wanted = (budget - 2) / width;  // expansions beyond the root's: ceil((N - 1) / K) - 1
  if (warp == 0) {
    // The first full levels (every candidate taken) that hold wanted + 1 nodes: their lowest score
    // is the sum of each depth's last candidate (lane d: depths 1 .. d + 1). Without such levels the
    // whole tree is wanted; so it is, when a last candidate is -inf, if it fits.
    const bool level = lane < depth - 1;
    const double low = warp_inclusive_sum(level ? s.lp[lane * width + width - 1] : 0.0, lane);
    int nodes = 0, power = 1;  // nodes of depths 1 .. lane + 1
    for (int d = 0; d <= lane && level; ++d) {
      power = min(power * width, static_cast<int>(kCountCap));
      nodes += power;
    }
    const uint32_t enough = __ballot_sync(kFull, level && nodes > wanted);
    const double first_low = __shfl_sync(kFull, low, enough ? __ffs(enough) - 1 : 0);
    if (lane == 0) {
      s.low = enough ? first_low : -INFINITY;
      s.bin = -1;
    }
    s.level_size[lane] = 0;
  }
  group_sync();
  double bound = -INFINITY;  // every expandable node scoring bound or more is found
  if (s.low != -INFINITY) {
    const double low = s.low;
    if (!(low < 0.0)) return -1;  // all-zero log-probs: every score ties
    // Rounding adds at most one bin per depth: 2 D bins to spare keep every node scoring `low` in range.
    const double h = -low / (kBins - 1 - 2 * depth);
    Counting& c = s.counting;
    for (int f = tid; f < (depth - 1) * width; f += kGroup) {
      const double bins = -s.lp[f] / h;
      c.step[f] = bins < kBins - 1 ? static_cast<int>(floor(bins)) + 1 : kBins;  // -inf: out of range
    }
    // Thread t counts bins t and t + kGroup (so that a warp's loads hit distinct banks); below bin 0
    // the histograms read kBins zeros.
    const int bin = tid;
    for (int i = tid; i < 2 * kBins; i += kGroup) c.hist[0][i] = c.hist[1][i] = i == kBins;  // the root: bin 0
    group_sync();
    uint32_t at_or_above[2] = {0, 0};  // expandable nodes in this thread's bins, all depths
    for (int d = 0, cur = 0; d < depth - 1; ++d, cur ^= 1) {
      const int* step = c.step + d * width;
      const uint32_t* from = c.hist[cur] + kBins + bin;
      uint32_t n0 = 0, n1 = 0;
#pragma unroll 4
      for (int r = 0; r < width; ++r) {
        n0 += from[-step[r]];
        n1 += from[kGroup - step[r]];
      }
      n0 = min(n0, kCountCap);
      n1 = min(n1, kCountCap);
      c.hist[cur ^ 1][kBins + bin] = n0;
      c.hist[cur ^ 1][kBins + bin + kGroup] = n1;
      at_or_above[0] = min(at_or_above[0] + n0, kCountCap);
      at_or_above[1] = min(at_or_above[1] + n1, kCountCap);
      if (!group_sync_or((n0 | n1) != 0)) break;  // no node of this depth in range, nor deeper
    }
    // The first bin where the running count passes `wanted`: bins in order are the threads' first
    // bins, then their second ones.
    const uint32_t need = static_cast<uint32_t>(wanted);
    uint64_t totals;
    const uint64_t before = group_exclusive_sum(pair(at_or_above[0], at_or_above[1]), s.warp_total, tid, totals);
    const uint32_t before0 = static_cast<uint32_t>(before);
    const uint32_t before1 = static_cast<uint32_t>(totals) + static_cast<uint32_t>(before >> 32);
    if (before0 <= need && before0 + at_or_above[0] > need) s.bin = bin;
    if (before1 <= need && before1 + at_or_above[1] > need) s.bin = bin + kGroup;
    group_sync();
    if (s.bin < 0) return -1;  // not reached: the bins hold every node of the full levels
    // Rounded scores are exact multiples of h, true ones at least as high; the margin covers the
    // float64 rounding of the quotient and of the sums.
    bound = -(s.bin * h) * (1.0 + 0x1p-40);
  }

  // Find every expandable node scoring `bound` or more, depth by depth: depth d's parents are
  // slots [lo, hi) (the root for d = 1), its nodes take the slots from hi on.
  Found& f = s.found;
  for (int i = tid; i < kBuckets; i += kGroup) f.bucket[i] = 0;  // ordered before the sort by the barriers below
  int lo = 0, hi = 0;
  for (int d = 1; d < depth; ++d) {
    const int parents = d == 1 ? 1 : hi - lo;
    const double* row = s.lp + (d - 1) * width;
    for (int first = 0; first < parents; first += kGroup) {
      if (first + warp * 32 >= parents) continue;  // warp-uniform: the scan below needs every lane
      const int p = first + tid;
      const bool real = p < parents;
      const double parent_score = d == 1 || !real ? 0.0 : decode_score(f.key[lo + p]);
      int take = 0;  // children scoring `bound` or more: a prefix of the descending candidates
      if (real) {
#pragma unroll 4
        for (int r = 0; r < width; ++r) take += parent_score + row[r] >= bound;
      }
      const int before = static_cast<int>(warp_exclusive_small_sum(static_cast<uint32_t>(take), lane));
      int base = 0;
      if (lane == 31) base = shared_fetch_add(&s.level_size[d], before + take);
      const int slot0 = hi + __shfl_sync(kFull, base, 31) + before;
      const uint32_t parent_field = d == 1 ? 0u : static_cast<uint32_t>(lo + p + 1);
      for (int r = 0; r < take && slot0 + r < kFound; ++r) {
        const int slot = slot0 + r;
        f.key[slot] = encode_score(parent_score + row[r]);
        f.order[slot] = parent_field << 10 | static_cast<uint32_t>(slot);
        f.node[slot] = parent_field | static_cast<uint32_t>(d) << 12 | static_cast<uint32_t>(r) << 20;
      }
    }
    group_sync();
    const int filled = hi + s.level_size[d];  // no thread adds to level d any more
    if (filled > kFound) return -1;
    if (filled == hi) break;  // no node at depth d, so none deeper
    lo = hi;
    hi = filled;
  }
  const int found = hi;

  // Bucket sort into heap order: buckets of equal score width from the best node (depth 1, rank 0)
  // down to `bound` (any monotone bucketing is exact; equal widths keep buckets small), a prefix sum
  // for their positions, then each node ranks itself among its bucket's few others. Equal scores
  // share a bucket, so that is also where ties show: a node among the first `taken` scoring the same
  // as a node of another parent (the heap would order them by creation) sends the tree to the pop path.
  const int taken = min(wanted, found);  // < kGroup
  const double top = s.lp[0];
  const double scale = bound > -INFINITY && top > bound ? kBuckets / (top - bound) : kBuckets / 64.0;
  int bucket[kFound / kGroup], arrival[kFound / kGroup];
#pragma unroll
  for (int k = 0; k < kFound / kGroup; ++k) {
    const int e = tid + k * kGroup;
    if (e < found) {
      // -inf scores go last; the clamp at 0 only guards rows that break the contract (not descending).
      const double x = fmax(fmin((top - decode_score(f.key[e])) * scale, kBuckets - 1.0), 0.0);
      bucket[k] = static_cast<int>(x);
      arrival[k] = static_cast<int>(atomicAdd(&f.bucket[bucket[k]], 1u));
    }
  }
  group_sync();
  const uint32_t count0 = f.bucket[tid], count1 = f.bucket[tid + kGroup];
  uint64_t totals;
  const uint64_t first = group_exclusive_sum(pair(count0, count1), s.warp_total, tid, totals);
  f.bucket[tid] = static_cast<uint32_t>(first);
  f.bucket[tid + kGroup] = static_cast<uint32_t>(totals) + static_cast<uint32_t>(first >> 32);
  // Ranking within a bucket is quadratic in its size: a crowded bucket (scores bunched or equal) is
  // the pop path's tree.
  if (group_sync_or(count0 > kBucketCrowd || count1 > kBucketCrowd)) return -1;
#pragma unroll
  for (int k = 0; k < kFound / kGroup; ++k) {
    const int e = tid + k * kGroup;
    if (e < found) f.ranked[f.bucket[bucket[k]] + arrival[k]] = static_cast<uint32_t>(e);
  }
  group_sync();
  int position[kFound / kGroup];
  bool tie = false;
#pragma unroll
  for (int k = 0; k < kFound / kGroup; ++k) {
    const int e = tid + k * kGroup;
    if (e >= found) continue;
    const int start = static_cast<int>(f.bucket[bucket[k]]);
    const int end = bucket[k] + 1 < kBuckets ? static_cast<int>(f.bucket[bucket[k] + 1]) : found;
    const uint64_t key = f.key[e];
    const uint32_t order = f.order[e];
    int ahead = 0;
    bool tied = false;
    for (int u = start; u < end; ++u) {
      const uint32_t v = f.ranked[u];
      const uint64_t other_key = f.key[v];
      const uint32_t other_order = f.order[v];
      ahead += other_key > key || (other_key == key && other_order < order);
      tied |= other_key == key && (other_order >> 10) != (order >> 10);
    }
    position[k] = start + ahead;
    tie |= tied && position[k] < taken;
  }
  if (group_sync_or(tie)) return -1;
#pragma unroll
  for (int k = 0; k < kFound / kGroup; ++k) {
    const int e = tid + k * kGroup;
    if (e < found) f.ranked[position[k]] = static_cast<uint32_t>(e);
  }
  group_sync();

  uint32_t mine = 0, slot = 0;
  if (tid < taken) {
    slot = f.ranked[tid];
    mine = f.node[slot];
  }
  group_sync();  // every expansion's node is read before any becomes an expansion number
  if (tid < taken) f.node[slot] = static_cast<uint32_t>(tid) + 1;
  group_sync();
  uint32_t parent_expansion = 0;
  if (tid < taken) {
    const uint32_t parent_field = mine & 0x7ff;
    parent_expansion = parent_field == 0 ? 0u : f.node[parent_field - 1];
  }
  // Every parent expands before its children whenever the contract holds (rows descending); rows that
  // break it could leave a parent outside the expansions, and phase 2's walk up the parents would
  // then not end: such trees go to the pop path, which builds some tree from any rows.
  if (group_sync_or(tid < taken && parent_expansion > static_cast<uint32_t>(tid))) return -1;
  if (tid < taken)
    s.expanded[tid + 1] =
        (1 + static_cast<uint32_t>(width) * parent_expansion + (mine >> 20)) | ((mine >> 12) & 0x3f) << 16;
  if (tid == 0) s.expanded[0] = 0;
  return min(budget, 1 + width * (taken + 1));
}

// Zeroes ancestor rows [0, budget) of one tree (its rows start at `anc`), as warp `index` of `count`:
// 16-byte stores when the rows are one dense, aligned block (a quarter of the store instructions), else
// one word per lane. With `pause_ns`, each 16-byte store is followed by a sleep: a burst of stores
// fills the memory pipeline's queue and delays the shared-memory loads of the warps working meanwhile
// (the stall cycles with and without the pauses: bench/results/h100/kernel_notes.md).
__device__ void zero_ancestors(const BuildTreeArgs& a, int32_t* anc, int budget, int words, int index, int count,
                               int lane, unsigned pause_ns) {
  const int total = budget * words;
  if (a.ancestors_stride[2] == 1 && a.ancestors_stride[1] == words && total % 4 == 0 &&
      reinterpret_cast<uintptr_t>(anc) % 16 == 0) {
    int4* block = reinterpret_cast<int4*>(anc);
    for (int i = index * 32 + lane; i < total / 4; i += count * 32) {
      block[i] = make_int4(0, 0, 0, 0);
      if (pause_ns) __nanosleep(pause_ns);
    }
    return;
  }
  for (int i = index; i < budget; i += count)
    for (int w = lane; w < words; w += 32) anc[i * a.ancestors_stride[1] + w * a.ancestors_stride[2]] = 0;
}

__global__ void __launch_bounds__(kThreads) build_tree_kernel(BuildTreeArgs a) {
  __shared__ Shared s;

  const int64_t b = blockIdx.x;
  const int depth = static_cast<int>(a.depth), width = static_cast<int>(a.width), budget = static_cast<int>(a.nodes);
  const int words = (budget + 31) / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Loaded now, used after phase 1: the global round trip overlaps it.
  const int64_t root = a.root_token[b * a.root_stride], base = a.base_pos[b * a.base_stride];
  // A log-prob equal to the one ranked above it, at a depth whose nodes expand: cousins below them tie,
  // which the threshold path would find only at its end, so such trees go straight to the pop path.
  bool repeated = false;
  for (int f = tid; f < depth * width; f += kThreads) {
    const int d = f / width, r = f - d * width;
    const float* x = a.logprobs + b * a.logprobs_stride[0] + d * a.logprobs_stride[1] + r * a.logprobs_stride[2];
    s.lp[f] = widen(*x);
    s.id[f] = a.ids[b * a.ids_stride[0] + d * a.ids_stride[1] + r * a.ids_stride[2]];
    repeated |= r > 0 && d < depth - 1 && *x == *(x - a.logprobs_stride[2]);
  }
  int32_t* anc = a.ancestors + b * a.ancestors_stride[0];
  const bool repeats = __syncthreads_or(repeated);

  const bool threshold_first =
      depth >= 2 && width >= 2 && (budget - 2) / width >= kThresholdMinExpansions && !repeats;
  if (threshold_first) {
    if (warp < kGroupWarps) {
      const int n = grow_by_threshold(s, depth, width, budget, tid);
      if (tid == 0) s.count = n;
    } else {
      zero_ancestors(a, anc, budget, words, warp - kGroupWarps, kWarps - kGroupWarps, lane, kZeroPauseNs);
    }
    __syncthreads();
  }
  if (warp == 0) {
    if (!threshold_first || s.count < 0) {  // no tree yet: the pop path builds it
      const int n = grow(s.lp, s.frontier, s.expanded, depth, width, budget, lane);
      if (lane == 0) s.count = n;
    }
  } else if (!threshold_first && warp % 4 != 0) {
    // Warps 4, 8, ... would share warp 0's scheduler (warps are dealt to the SM's four schedulers in
    // turn) and take issue slots from its chain of pops: they stay idle.
    zero_ancestors(a, anc, budget, words, warp - 1 - warp / 4, kWarps - 1 - (kWarps - 1) / 4, lane, 0);
  }
  __syncthreads();  // also orders the zeros before the ancestor words stored below

  const int count = s.count;
  for (int i = 1 + tid; i < count; i += kThreads) {
    const int x = (i - 1) / width;
    const uint32_t popped = s.expanded[x];
    s.node[i] = ((popped & 0xffff) + 1) << 16 | ((popped >> 16) + 1) << 8 | static_cast<uint32_t>(i - 1 - x * width);
  }
  if (tid == 0) s.node[0] = 0;  // parent -1, depth 0
  __syncthreads();

  for (int i = tid; i < budget; i += kThreads) {
    int64_t token = 0, parent = -1, node_depth = 0;
    int32_t* row = anc + i * a.ancestors_stride[1];
    int word = i >> 5;
    uint32_t bits = 1u << (i & 31);
    if (i < count) {
      const uint32_t rec = s.node[i];
      parent = parent_of(rec);
      node_depth = (rec >> 8) & 0xff;
      token = i == 0 ? root : s.id[(node_depth - 1) * width + (rec & 0xff)];
      for (int j = static_cast<int>(parent); j >= 0; j = parent_of(s.node[j])) {
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
