// jetspec::accept_sample — lossless speculative sampling of a verified token tree, on the device.
//
//   accept_sample(Tensor tokens, Tensor parents, Tensor logits, Tensor num_nodes, Tensor temperature,
//                 Tensor top_k, Tensor top_p, Tensor seed, Tensor(d!) offset,
//                 Tensor(a!) accepted, Tensor(b!) accept_len, Tensor(c!) bonus) -> ()
//
//   tokens      [B, N]    int64   token of each tree node; node 0 is the root (the anchor).
//   parents     [B, N]    int64   parent node of each node: -1 for the root, in [0, i) for node i.
//   logits      [B, N, V] float32/bfloat16/float16  the target's next-token logits at every node,
//                                 1 <= V < 2^20 (CUDA: V <= 327680). Any strides (a strided last dim is
//                                 copied first).
//   num_nodes   [B]       int64   nodes in use per row, 1 <= num_nodes[b] <= N (the rest is padding).
//   temperature [B]       float32 >= 0 and finite; 0 = greedy.
//   top_k       [B]       int64   >= 0; 0 (or >= V) = off.
//   top_p       [B]       float32 in [0, 1]; 1 = off.
//   seed        [1] or [] int64   the Philox key.
//   offset      [1] or [] int64   in [0, 2^32 - 1): the Philox counter's call word; out: offset + 1.
//   accepted    [B, M]    int64   out: node indices of the accepted path, root first; -1 past its end.
//   accept_len  [B]       int64   out: nodes on the accepted path, root included (1 <= accept_len <= M).
//   bonus       [B]       int64   out: the token drawn at the path's last node — the next anchor.
//   seed, offset, temperature, top_k and top_p are read on the op's device: nothing syncs with the host.
//
//   The walk (exact and optimal for a tree of distinct-per-parent candidates): at the current node draw
//   one token y from the target's processed distribution there; if fewer than M nodes are on the path
//   and a child c has tokens[c] == y (children with equal tokens: the highest index wins, as in
//   accept_greedy), step to c and repeat; otherwise bonus = y and stop. Committed tokens this round:
//   tokens[accepted[1:accept_len]] followed by bonus — distributed exactly as sampling token by token
//   from the target. Each node draws with its own uniform, so the draw at a node does not depend on
//   the path that reached it.
//
//   The draw at node i of row b (l = logits[b, i] in float32, T = temperature[b]; the float steps are
//   single IEEE float32 operations, spelled out in cuda/accept_sample_math.cuh):
//   1. a = argmax l, the first maximal index (NaN counts as maximal): torch.argmax. If T == 0, or
//      zmax = l[a] / T is not finite, the draw is a. With T == 0 the op is accept_greedy with
//      target_ids = logits.argmax(-1).
//   2. z = l / T (HF's temperature warper). Top-k (0 < k < V): keep the tokens with z >= the k-th largest
//      z, ties included (HF's TopKLogitsWarper).
//   3. e_j = qexp(z_j - zmax) for kept tokens (0 for the others), q_j = floor(e_j * 2^43): integer
//      probabilities proportional to softmax(z) over the kept tokens, to float32 precision (qexp is within
//      ~1 ulp of exp); tokens below 2^-43 of the top token get 0.
//   4. Top-p (top_p < 1): with Q = sum q, keep token j iff q_j > 0 and the mass of the tokens with a larger
//      e is below max(1, ceil(floor(top_p * 2^32) * Q / 2^32)). This is HF's TopPLogitsWarper (sort
//      ascending, drop the tokens whose cumulative probability is <= 1 - top_p, always keep the top one)
//      in exact arithmetic, except that tokens tied with the boundary token are kept with it (HF keeps a
//      sort-order-dependent part of them).
//   5. Q' = the kept mass, t = floor(u53 * Q' / 2^53) for the node's uniform u53; the draw is the lowest j
//      whose inclusive prefix sum of kept q over the vocabulary exceeds t (the inverse CDF, vocabulary order).
//
//   Uniforms: u53(b, i) is Philox4x32-10 with key (seed mod 2^32, seed >> 32) at counter
//   (i, b, offset mod 2^32, 0); its output words x0, x1 give u53 = (x1 * 2^32 + x0) >> 11, the uniform
//   u53 / 2^53 in [0, 1). Only the nodes on the walk draw. The op advances offset by 1 per call (on CUDA
//   inside the kernel), so each call, eager or a CUDA-graph replay, draws fresh numbers with no host work;
//   jetspec.ops.reference.philox_uniforms gives the same uniforms for jetspec.ops.reference.accept_sample.
//
//   Every sum of probabilities is an exact integer and every float step is a single rounded operation, so
//   the CPU and CUDA kernels give identical outputs for identical inputs, whatever the CUDA kernel's
//   split of the vocabulary over threads and blocks.
//
// The CPU kernel validates the tree and the sampling values and raises on bad ones; the CUDA kernel
// cannot raise without a host sync: it clamps num_nodes to [1, N], treats an out-of-range parent as a
// non-matching node, a temperature that is negative, NaN or infinite as 0, top_k < 0 as off, top_p NaN
// or >= 1 as off and top_p < 0 as 0. While the CUDA kernel runs, its blocks count themselves in the upper
// 32 bits of offset (the last block to start removes the count and adds the 1), so offset must stay
// below 2^32 - 1, and two launches must not share an offset tensor at the same time.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <vector>

#include "accept_sample_math.cuh"
#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "accept_sample.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "accept_sample";
constexpr int64_t kMaxOffset = (int64_t{1} << 32) - 1;  // offset < this (it is advanced to at most this)

void check_apart(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  const auto status = at::get_overlap_status(a, b);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                    message(kOp, "'", a_name, "' must not overlap '", b_name, "'"));
}

void check_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logits,
                const at::Tensor& num_nodes, const at::Tensor& temperature, const at::Tensor& top_k,
                const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& accepted,
                const at::Tensor& accept_len, const at::Tensor& bonus) {
  using Named = std::pair<const at::Tensor*, const char*>;
  const Named longs[] = {{&tokens, "tokens"},   {&parents, "parents"},   {&num_nodes, "num_nodes"},
                         {&top_k, "top_k"},     {&seed, "seed"},         {&offset, "offset"},
                         {&accepted, "accepted"}, {&accept_len, "accept_len"}, {&bonus, "bonus"}};
  for (const auto& [t, name] : longs) check_dtype(kOp, *t, name, at::kLong);
  check_dtype(kOp, temperature, "temperature", at::kFloat);
  check_dtype(kOp, top_p, "top_p", at::kFloat);
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                        logits.scalar_type() == at::kHalf,
                    message(kOp, "'logits' must be float32, bfloat16 or float16, got ", logits.scalar_type()));
  const Named all[] = {{&parents, "parents"},       {&logits, "logits"},   {&num_nodes, "num_nodes"},
                       {&temperature, "temperature"}, {&top_k, "top_k"},   {&top_p, "top_p"},
                       {&seed, "seed"},             {&offset, "offset"},   {&accepted, "accepted"},
                       {&accept_len, "accept_len"}, {&bonus, "bonus"}};
  for (const auto& [t, name] : all) check_device(kOp, *t, name, tokens, "tokens");

  check_dim(kOp, tokens, "tokens", 2);
  const int64_t batch = tokens.size(0), nodes = tokens.size(1);
  TORCH_CHECK_VALUE(nodes >= 1, message(kOp, "a tree has at least its root node; 'tokens' has shape ", tokens.sizes()));
  check_dim(kOp, parents, "parents", 2);
  check_size(kOp, parents, "parents", 0, batch);
  check_size(kOp, parents, "parents", 1, nodes);
  check_dim(kOp, logits, "logits", 3);
  check_size(kOp, logits, "logits", 0, batch);
  check_size(kOp, logits, "logits", 1, nodes);
  const int64_t vocab = logits.size(2);
  TORCH_CHECK_VALUE(1 <= vocab && vocab <= sample::kMaxVocab,
                    message(kOp, "the vocabulary (logits' last dim) must be in [1, ", sample::kMaxVocab, "], got ", vocab));
  for (const auto& [t, name] : {Named{&num_nodes, "num_nodes"}, Named{&temperature, "temperature"},
                                Named{&top_k, "top_k"}, Named{&top_p, "top_p"}, Named{&accept_len, "accept_len"},
                                Named{&bonus, "bonus"}}) {
    check_dim(kOp, *t, name, 1);
    check_size(kOp, *t, name, 0, batch);
  }
  for (const auto& [t, name] : {Named{&seed, "seed"}, Named{&offset, "offset"}})
    TORCH_CHECK_VALUE(t->dim() <= 1 && t->numel() == 1,
                      message(kOp, "'", name, "' must hold one value (shape [] or [1]), got shape ", t->sizes()));
  check_dim(kOp, accepted, "accepted", 2);
  check_size(kOp, accepted, "accepted", 0, batch);
  TORCH_CHECK_VALUE(accepted.size(1) >= 1, message(kOp, "'accepted' needs room for the root, got shape ", accepted.sizes()));

  // The mutated tensors: dense, and apart from each other and from every input.
  const Named outs[] = {{&accepted, "accepted"}, {&accept_len, "accept_len"}, {&bonus, "bonus"}, {&offset, "offset"}};
  const Named ins[] = {{&tokens, "tokens"},     {&parents, "parents"}, {&logits, "logits"},
                       {&num_nodes, "num_nodes"}, {&temperature, "temperature"}, {&top_k, "top_k"},
                       {&top_p, "top_p"},         {&seed, "seed"}};
  for (size_t i = 0; i < std::size(outs); ++i) {
    const auto& [t, name] = outs[i];
    TORCH_CHECK_VALUE(t->is_contiguous(), message(kOp, "output '", name, "' must be contiguous"));
    for (size_t j = 0; j < i; ++j) check_apart(*t, name, *outs[j].first, outs[j].second);
    for (const auto& [u, u_name] : ins) check_apart(*t, name, *u, u_name);
  }
}

// The CPU kernel also checks the values the CUDA kernel can only clamp.
void check_values(const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                  const at::Tensor& offset) {
  const auto temp = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  for (int64_t b = 0; b < temp.numel(); ++b) {
    const float t = temp.data_ptr<float>()[b], pb = p.data_ptr<float>()[b];
    const int64_t kb = k.data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(std::isfinite(t) && t >= 0, message(kOp, "temperature[", b, "] must be finite and >= 0"));
    TORCH_CHECK_VALUE(kb >= 0, message(kOp, "top_k[", b, "] = ", kb, " must be >= 0"));
    TORCH_CHECK_VALUE(pb >= 0 && pb <= 1, message(kOp, "top_p[", b, "] must be in [0, 1]"));
  }
  const int64_t off = offset.reshape({-1}).data_ptr<int64_t>()[0];
  TORCH_CHECK_VALUE(0 <= off && off < kMaxOffset, message(kOp, "offset = ", off, " must be in [0, 2^32 - 1)"));
}

struct Scratch {
  std::vector<float> l, e, sorted;
  std::vector<int64_t> order;
};

// The draw of one node, step by step as the contract says.
template <typename scalar_t>
int64_t draw(const scalar_t* row, int64_t vocab, float temperature, int64_t top_k, float top_p, uint64_t u53,
             Scratch& s) {
  using namespace sample;
  s.l.resize(vocab);
  int64_t a = 0;
  uint32_t best = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    s.l[j] = static_cast<float>(row[j]);
    const uint32_t key = float_key(s.l[j]);
    if (j == 0 || key > best) best = key, a = j;
  }
  if (!(temperature > 0)) return a;
  const float zmax = div_rn(s.l[a], temperature);
  if (!is_finite(s.l[a]) || !is_finite(zmax)) return a;  // no NaN below: a NaN would be the maximum

  const bool use_k = top_k > 0 && top_k < vocab;
  float z_cut = 0;
  if (use_k) {
    s.sorted.assign(s.l.begin(), s.l.end());
    std::nth_element(s.sorted.begin(), s.sorted.begin() + (top_k - 1), s.sorted.end(), std::greater<float>());
    z_cut = div_rn(s.sorted[top_k - 1], temperature);  // the k-th largest z (z is monotone in l)
  }
  s.e.resize(vocab);
  uint64_t total = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    const float z = div_rn(s.l[j], temperature);
    s.e[j] = use_k && !(z >= z_cut) ? 0.0f : qexp(sub_rn(z, zmax));
    total += quantize(s.e[j]);
  }

  uint32_t kept_bits = kMinPositiveBits;  // kept: bits(e) >= kept_bits (q > 0 at least)
  if (top_p < 1) {
    const uint64_t cut = top_p_cut(top_p, total);
    s.order.clear();
    for (int64_t j = 0; j < vocab; ++j)
      if (to_bits(s.e[j]) >= kMinPositiveBits) s.order.push_back(j);
    std::sort(s.order.begin(), s.order.end(), [&](int64_t x, int64_t y) { return s.e[x] > s.e[y]; });
    uint64_t above = 0;  // mass of the tokens with a larger e than the current group
    for (size_t i = 0; i < s.order.size();) {
      const float v = s.e[s.order[i]];
      if (above >= cut) break;
      kept_bits = to_bits(v);
      for (; i < s.order.size() && s.e[s.order[i]] == v; ++i) above += quantize(v);
    }
  }
  uint64_t kept = 0;
  for (int64_t j = 0; j < vocab; ++j)
    if (to_bits(s.e[j]) >= kept_bits) kept += quantize(s.e[j]);
  const uint64_t target = scale_uniform(u53, kept);
  uint64_t prefix = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    if (to_bits(s.e[j]) < kept_bits) continue;
    prefix += quantize(s.e[j]);
    if (prefix > target) return j;
  }
  return a;  // unreachable: target < kept
}

void accept_sample_cpu(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logits,
                       const at::Tensor& num_nodes, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& seed, at::Tensor& offset, at::Tensor& accepted,
                       at::Tensor& accept_len, at::Tensor& bonus) {
  check_args(tokens, parents, logits, num_nodes, temperature, top_k, top_p, seed, offset, accepted, accept_len, bonus);
  check_values(temperature, top_k, top_p, offset);
  const auto tok = tokens.contiguous(), par = parents.contiguous(), cnt = num_nodes.contiguous();
  const auto temp = temperature.contiguous(), kk = top_k.contiguous(), pp = top_p.contiguous();
  const auto lg = logits.stride(2) == 1 ? logits : logits.contiguous();
  const int64_t batch = tok.size(0), nodes = tok.size(1), vocab = lg.size(2), max_accept = accepted.size(1);
  const uint64_t key = static_cast<uint64_t>(seed.reshape({-1}).data_ptr<int64_t>()[0]);
  int64_t* off = offset.data_ptr<int64_t>();
  const uint64_t call = static_cast<uint64_t>(*off);
  int64_t* acc = accepted.data_ptr<int64_t>();
  check_trees(kOp, par.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), batch, nodes);  // before any output
  Scratch scratch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lg.scalar_type(), "accept_sample_cpu", [&] {
    const scalar_t* base = lg.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* t = tok.data_ptr<int64_t>() + b * nodes;
      const int64_t* p = par.data_ptr<int64_t>() + b * nodes;
      const int64_t n = cnt.data_ptr<int64_t>()[b];
      int64_t cur = 0, len = 1, y = 0;
      acc[b * max_accept] = 0;
      while (true) {
        const scalar_t* row = base + b * lg.stride(0) + cur * lg.stride(1);
        const uint64_t u53 = sample::philox_u53(key, call, static_cast<uint32_t>(b), static_cast<uint32_t>(cur));
        y = draw(row, vocab, temp.data_ptr<float>()[b], kk.data_ptr<int64_t>()[b], pp.data_ptr<float>()[b], u53, scratch);
        if (len >= max_accept) break;
        int64_t child = -1;
        for (int64_t i = cur + 1; i < n; ++i)
          if (p[i] == cur && t[i] == y) child = i;
        if (child < 0) break;
        cur = child;
        acc[b * max_accept + len++] = cur;
      }
      for (int64_t j = len; j < max_accept; ++j) acc[b * max_accept + j] = -1;
      accept_len.data_ptr<int64_t>()[b] = len;
      bonus.data_ptr<int64_t>()[b] = y;
    }
  });
  *off += 1;
}

#ifdef JETSPEC_WITH_CUDA
void accept_sample_cuda(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logits,
                        const at::Tensor& num_nodes, const at::Tensor& temperature, const at::Tensor& top_k,
                        const at::Tensor& top_p, const at::Tensor& seed, at::Tensor& offset, at::Tensor& accepted,
                        at::Tensor& accept_len, at::Tensor& bonus) {
  check_args(tokens, parents, logits, num_nodes, temperature, top_k, top_p, seed, offset, accepted, accept_len, bonus);
  TORCH_CHECK_VALUE(logits.size(2) <= cuda::kSampleMaxVocab,
                    message(kOp, "the CUDA kernel supports vocabularies of up to ", cuda::kSampleMaxVocab,
                            " tokens, got ", logits.size(2)));
  TORCH_CHECK_VALUE(tokens.size(1) <= std::numeric_limits<int32_t>::max(),
                    message(kOp, "the CUDA kernel supports trees of up to 2^31 - 1 nodes, got ", tokens.size(1)));
  const c10::cuda::CUDAGuard guard(tokens.device());
  const auto tok = tokens.contiguous(), par = parents.contiguous(), cnt = num_nodes.contiguous();
  const auto temp = temperature.contiguous(), kk = top_k.contiguous(), pp = top_p.contiguous();
  const auto lg = logits.stride(2) == 1 ? logits : logits.contiguous();
  cuda::AcceptSampleArgs args{};
  args.tokens = tok.data_ptr<int64_t>();
  args.parents = par.data_ptr<int64_t>();
  args.logits = lg.data_ptr();
  args.logits_stride0 = lg.stride(0);
  args.logits_stride1 = lg.stride(1);
  args.dtype = lg.scalar_type() == at::kBFloat16 ? cuda::SampleDtype::kBFloat16
               : lg.scalar_type() == at::kHalf   ? cuda::SampleDtype::kFloat16
                                                 : cuda::SampleDtype::kFloat32;
  args.num_nodes = cnt.data_ptr<int64_t>();
  args.temperature = temp.data_ptr<float>();
  args.top_k = kk.data_ptr<int64_t>();
  args.top_p = pp.data_ptr<float>();
  args.seed = seed.data_ptr<int64_t>();
  args.offset = offset.data_ptr<int64_t>();
  args.accepted = accepted.data_ptr<int64_t>();
  args.accept_len = accept_len.data_ptr<int64_t>();
  args.bonus = bonus.data_ptr<int64_t>();
  args.batch = tok.size(0);
  args.nodes = tok.size(1);
  args.vocab = lg.size(2);
  args.max_accept = accepted.size(1);
  check_launch(cuda::accept_sample(args, current_stream(tokens)), kOp);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def(
      "accept_sample(Tensor tokens, Tensor parents, Tensor logits, Tensor num_nodes, Tensor temperature, "
      "Tensor top_k, Tensor top_p, Tensor seed, Tensor(d!) offset, Tensor(a!) accepted, Tensor(b!) accept_len, "
      "Tensor(c!) bonus) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("accept_sample", &accept_sample_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("accept_sample", &accept_sample_cuda); }
#endif

}  // namespace jetspec
