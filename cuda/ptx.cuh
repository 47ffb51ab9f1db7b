// PTX wrappers the kernels share (draft_topk, tree_attention, skinny_gemm, rms_norm; build_tree's named
// barrier): programmatic dependent launch,
// shared-memory addresses, loads and stores, named barriers, cp.async group waits, ldmatrix, the m16n8k16 MMA
// with fp32 accumulation and, on sm_90a, the warpgroup MMA (wgmma) with its shared-memory descriptors
// and fences, mbarriers and tensor copies (TMA).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace jetspec::cuda::ptx {

// Programmatic dependent launch (sm_90): a kernel launched with programmatic stream serialization may
// start while the kernel before it in the stream still runs; launch_dependents lets the next one start,
// wait_for_prerequisites waits for the ones before it to finish before their outputs are read. Without
// the launch attribute both do nothing.
__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prerequisites() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether launches ask for programmatic dependent launch: yes unless JETSPEC_PDL=0, read at every launch
// so that a benchmark can compare both (a graph keeps what its capture saw).
inline bool pdl_requested() {
  const char* v = std::getenv("JETSPEC_PDL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}

__device__ __forceinline__ void st_shared_zero16(uint32_t addr) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// Named barrier `id` (1-15; 0 is __syncthreads) over `threads` threads, a multiple of 32: sync waits for
// all of them, arrive counts this warp and goes on.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// named_barrier_sync that also returns whether `value` was true in any of the threads.
__device__ __forceinline__ bool named_barrier_or(int id, int threads, bool value) {
  int any;
  asm volatile("{\n.reg .pred p, q;\nsetp.ne.s32 q, %2, 0;\nbar.red.or.pred p, %1, %3, q;\nselp.s32 %0, 1, 0, p;\n}\n"
               : "=r"(any) : "r"(id), "r"(static_cast<int>(value)), "r"(threads) : "memory");
  return any != 0;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for a 16x16 (row) by 16x8 (col) tile of bf16 (kBF16) or fp16 operands.
template <bool kBF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Warpgroup MMA (sm_90a only: wgmma is an architecture-specific feature, absent from plain sm_90 code).
// A warpgroup is 4 consecutive warps; warp w of it owns rows [16 w, 16 w + 16) of the 64-row tile, and
// both the register operand A and the fp32 accumulators use the mma.m16n8k16 fragment layouts per 8
// columns, so fragments move between mma.sync and wgmma code unchanged.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JETSPEC_WGMMA 1

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Moves this warpgroup's per-thread register budget to N (a multiple of 8 in [24, 256]): a
// warp-specialised block launches with an even budget and then hands the producer's spare registers to
// the consumers. Every warp of the warpgroup executes it.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Waits until at most kPending of this warpgroup's committed product groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes (cp.async included) before async-proxy
// (wgmma) reads of them that a later barrier publishes.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarrier with a transaction count, completed by tensor copies (the copy engine, TMA) into shared memory.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes initialised mbarriers visible to the copy engine (before the barrier that publishes them).
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Arrives on `bar` and expects `bytes` more to land before its phase completes.
__device__ __forceinline__ void mbarrier_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Arrives on `bar` (no transaction).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of `bar` with this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// Copies the box at coordinates (c0 innermost .. c3) of a 4-d tensor map into shared memory at `dst`;
// the box's bytes count towards the transaction of `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, int c0, int c1, int c2, int c3, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
      ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
}

// Descriptor of a shared-memory operand in the 128-byte swizzle: 8-row x 128-byte atoms, 1024-byte
// aligned, 16-byte chunk c of row r stored at chunk c ^ (r & 7). `lead` is the byte stride between atoms
// along M/N for an MN-major operand (unused when K-major), `stride` the byte stride between 8-row groups.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lead, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(lead >> 4) << 16) |
         (static_cast<uint64_t>(stride >> 4) << 32) | (1ull << 62);
}

// The descriptor of the operand `bytes` further on: the start address is the descriptor's low 14 bits (in
// 16-byte units) and shared memory ends below 2^18 bytes, so the add never carries into the other fields.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

#define JETSPEC_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define JETSPEC_F16(i) JETSPEC_F4(i), JETSPEC_F4(i + 4), JETSPEC_F4(i + 8), JETSPEC_F4(i + 12)
#define JETSPEC_F32(i) JETSPEC_F16(i), JETSPEC_F16(i + 16)
#define JETSPEC_F64(i) JETSPEC_F32(i), JETSPEC_F32(i + 32)
#define JETSPEC_WGMMA_SS32(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY "\n" \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},\n" \
               "%16, %17, p, 1, 1, 0, 0;\n}\n" \
               : JETSPEC_F16(0) : "l"(a), "l"(b), "r"(accumulate))
#define JETSPEC_WGMMA_SS64(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY "\n" \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},\n" \
               "%32, %33, p, 1, 1, 0, 0;\n}\n" \
               : JETSPEC_F32(0) : "l"(a), "l"(b), "r"(accumulate))
#define JETSPEC_WGMMA_SS128(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY "\n" \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},\n" \
               "%64, %65, p, 1, 1, 0, 0;\n}\n" \
               : JETSPEC_F64(0) : "l"(a), "l"(b), "r"(accumulate))
#define JETSPEC_WGMMA_RS64(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY "\n" \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},\n" \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
               : JETSPEC_F32(0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
#define JETSPEC_WGMMA_RS128(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY "\n" \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},\n" \
               "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
               : JETSPEC_F64(0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))

// d[64 x N] = A[64 x 16] * B[16 x N] (+ d when `accumulate`), A and B K-major in shared memory
// (descriptors a, b).
template <int N, bool kBF16>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  static_assert(N == 32 || N == 64 || N == 128, "instantiated shapes");
  if constexpr (N == 32) {
    if constexpr (kBF16) JETSPEC_WGMMA_SS32("bf16"); else JETSPEC_WGMMA_SS32("f16");
  } else if constexpr (N == 64) {
    if constexpr (kBF16) JETSPEC_WGMMA_SS64("bf16"); else JETSPEC_WGMMA_SS64("f16");
  } else {
    if constexpr (kBF16) JETSPEC_WGMMA_SS128("bf16"); else JETSPEC_WGMMA_SS128("f16");
  }
}

// d[64 x N] += A[64 x 16] * B[16 x N], A in registers (this warp's m16k16 fragment), B MN-major in
// shared memory (descriptor b).
template <int N, bool kBF16>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  static_assert(N == 64 || N == 128, "instantiated shapes");
  if constexpr (N == 64) {
    if constexpr (kBF16) JETSPEC_WGMMA_RS64("bf16"); else JETSPEC_WGMMA_RS64("f16");
  } else {
    if constexpr (kBF16) JETSPEC_WGMMA_RS128("bf16"); else JETSPEC_WGMMA_RS128("f16");
  }
}
#undef JETSPEC_WGMMA_SS32
#undef JETSPEC_WGMMA_SS64
#undef JETSPEC_WGMMA_SS128
#undef JETSPEC_WGMMA_RS64
#undef JETSPEC_WGMMA_RS128
#undef JETSPEC_F64
#undef JETSPEC_F32
#undef JETSPEC_F16
#undef JETSPEC_F4
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace jetspec::cuda::ptx
