// jetspec::kv_compact — keep the accepted path's cache rows, in every layer, in one launch.
//
//   kv_compact(Tensor(a!) cache, Tensor accepted, Tensor accept_len, Tensor base) -> ()
//
//   cache      [P, B, S, *row]  any dtype. P planes (e.g. layers x {K, V} of one stacked cache),
//                               B sequences, S slots. The row dims must be dense; P/B/S strides are free.
//   accepted   [B, M] int64     accepted tree-node offsets in path order (accept_greedy's output):
//                               strictly increasing, accepted[b, j] >= j.
//   accept_len [B] int64        valid entries of accepted per row, 0 <= accept_len[b] <= M.
//   base       [B] int64        cache slot of tree node 0 (the committed prefix length), 0 <= base[b] <= S.
//
//   For every plane p, row b and j < accept_len[b]:
//       cache[p, b, base[b] + j] = cache[p, b, base[b] + accepted[b, j]]   (values before the op)
//   Slots past base[b] + accept_len[b] are left as they are.
//
// The ordering precondition is what tree paths satisfy (a child's index exceeds
// its parent's) and what makes an in-place, single-pass move safe although the
// source and destination ranges overlap. The CPU kernel checks it; the CUDA
// kernel cannot without a host sync, and skips out-of-range slots instead of faulting.
// All tensors share one device; 'cache' shares no memory with the index tensors.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

#include "checks.h"
#include "cuda_glue.h"
#ifdef JETSPEC_WITH_CUDA
#include "kv_compact.cuh"
#endif

namespace jetspec {
namespace {

constexpr const char* kOp = "kv_compact";

int64_t row_numel(const at::Tensor& cache) {
  int64_t n = 1;
  for (int64_t d = 3; d < cache.dim(); ++d) n *= cache.size(d);
  return n;
}

void check_args(const at::Tensor& cache, const at::Tensor& accepted, const at::Tensor& accept_len,
                const at::Tensor& base) {
  const Named all[] = {{&cache, "cache"}, {&accepted, "accepted"}, {&accept_len, "accept_len"}, {&base, "base"}};
  check_same_device(kOp, all);
  check_no_overlap(kOp, {all[0]}, all);
  TORCH_CHECK_VALUE(cache.dim() >= 3, message(kOp, "'cache' must be [planes, batch, slots, *row], got shape ", cache.sizes()));
  TORCH_CHECK_VALUE(dense_from(cache, 3),
                    message(kOp, "the row dims (3..) of 'cache' must be dense, got strides ", cache.strides()));
  check_dtype(kOp, accepted, "accepted", at::kLong);
  check_dtype(kOp, accept_len, "accept_len", at::kLong);
  check_dtype(kOp, base, "base", at::kLong);
  check_dim(kOp, accepted, "accepted", 2);
  check_dim(kOp, accept_len, "accept_len", 1);
  check_dim(kOp, base, "base", 1);
  const int64_t batch = cache.size(1);
  check_size(kOp, accepted, "accepted", 0, batch);
  check_size(kOp, accept_len, "accept_len", 0, batch);
  check_size(kOp, base, "base", 0, batch);
}

void kv_compact_cpu(at::Tensor& cache, const at::Tensor& accepted, const at::Tensor& accept_len,
                    const at::Tensor& base) {
  check_args(cache, accepted, accept_len, base);
  const auto acc = accepted.contiguous();
  const auto len = accept_len.contiguous();
  const auto start = base.contiguous();
  const int64_t planes = cache.size(0), batch = cache.size(1), slots = cache.size(2);
  const int64_t max_accept = acc.size(1);
  const int64_t row_bytes = row_numel(cache) * cache.element_size();
  const int64_t* acc_p = acc.data_ptr<int64_t>();
  const int64_t* len_p = len.data_ptr<int64_t>();
  const int64_t* base_p = start.data_ptr<int64_t>();

  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len_p[b], slot0 = base_p[b];
    TORCH_CHECK_VALUE(0 <= n && n <= max_accept,
                      message(kOp, "accept_len[", b, "] = ", n, " is outside [0, ", max_accept, "]"));
    TORCH_CHECK_VALUE(0 <= slot0 && slot0 <= slots,
                      message(kOp, "base[", b, "] = ", slot0, " is outside the cache's [0, ", slots, "] slots"));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t a = acc_p[b * max_accept + j];
      TORCH_CHECK_VALUE(a >= j && (j == 0 || a > acc_p[b * max_accept + j - 1]),
                        message(kOp, "accepted[", b, "] must be strictly increasing with accepted[j] >= j; entry ", j,
                                " is ", a));
      // Compared against the room left, not as base + a < slots: that sum can wrap around.
      TORCH_CHECK_VALUE(a < slots - slot0, message(kOp, "slot base[", b, "] + accepted[", b, ", ", j, "] (", slot0,
                                                   " + ", a, ") is outside the cache's ", slots, " slots"));
    }
  }
  if (row_bytes == 0) return;

  char* data = static_cast<char*>(cache.data_ptr());
  const int64_t es = cache.element_size();
  const int64_t sp = cache.stride(0) * es, sb = cache.stride(1) * es, ss = cache.stride(2) * es;
  at::parallel_for(0, planes * batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pb = begin; pb < end; ++pb) {
      const int64_t p = pb / batch, b = pb % batch;
      char* seq = data + p * sp + b * sb + base_p[b] * ss;
      // In path order: a destination row can only be the source of an earlier, already-copied row.
      for (int64_t j = 0; j < len_p[b]; ++j) {
        const int64_t a = acc_p[b * max_accept + j];
        if (a != j) std::memcpy(seq + j * ss, seq + a * ss, row_bytes);
      }
    }
  });
}

#ifdef JETSPEC_WITH_CUDA
void kv_compact_cuda(at::Tensor& cache, const at::Tensor& accepted, const at::Tensor& accept_len,
                     const at::Tensor& base) {
  check_args(cache, accepted, accept_len, base);
  TORCH_CHECK_VALUE(cache.size(0) <= 65535 && cache.size(1) <= 65535,
                    message(kOp, "CUDA supports up to 65535 planes and 65535 sequences, got 'cache' shape ",
                            cache.sizes()));
  // The long-path kernel stages path offsets as 32-bit integers.
  TORCH_CHECK_VALUE(cache.size(2) <= std::numeric_limits<int32_t>::max(),
                    message(kOp, "CUDA supports up to 2^31 - 1 slots, got 'cache' shape ", cache.sizes()));
  const c10::cuda::CUDAGuard guard(cache.device());
  const auto acc = accepted.contiguous();
  const auto len = accept_len.contiguous();
  const auto start = base.contiguous();
  const int64_t es = cache.element_size();
  cuda::KvCompactArgs args{};
  args.cache = static_cast<char*>(cache.data_ptr());
  args.planes = cache.size(0);
  args.batch = cache.size(1);
  args.slots = cache.size(2);
  args.row_bytes = row_numel(cache) * es;
  args.plane_stride = cache.stride(0) * es;
  args.batch_stride = cache.stride(1) * es;
  args.slot_stride = cache.stride(2) * es;
  args.accepted = acc.data_ptr<int64_t>();
  args.max_accept = acc.size(1);
  args.accept_len = len.data_ptr<int64_t>();
  args.base = start.data_ptr<int64_t>();
  if (args.row_bytes == 0) return;
  check_launch(cuda::kv_compact(args, current_stream(cache)), kOp);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(jetspec, m) {
  m.def("kv_compact(Tensor(a!) cache, Tensor accepted, Tensor accept_len, Tensor base) -> ()");
}

TORCH_LIBRARY_IMPL(jetspec, BackendSelect, m) { m.impl("kv_compact", same_device_kernel()); }

TORCH_LIBRARY_IMPL(jetspec, CPU, m) { m.impl("kv_compact", &kv_compact_cpu); }

#ifdef JETSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(jetspec, CUDA, m) { m.impl("kv_compact", &kv_compact_cuda); }
#endif

}  // namespace jetspec
