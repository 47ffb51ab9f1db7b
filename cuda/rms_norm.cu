// rms_norm: residual add + RMSNorm of [rows, hidden], one launch, each row read from memory once.
//
// The op is a stream: it reads x (and the residual) and writes out (and h = x + residual), so its floor is
// those bytes at memory bandwidth; the weight (hidden elements) stays in L1/L2 after the first rows.
//
// A row belongs to `tpr` consecutive threads of a CTA (a power of two, 16..1024), which hold the whole row
// in registers between the sum of squares and the scaling: up to kMaxVecs packs per thread, pack j of the
// row at thread j % tpr, slot j / tpr (so a warp's loads are consecutive 16-byte pieces of the row). A CTA
// of max(tpr, 256) threads takes 256 / tpr rows when a row needs fewer than 256 threads (the 128-element
// q/k norms of a Qwen3 attention take 16 per row, 16 rows per CTA). The vector path moves 16-byte packs
// (every pointer 16-byte aligned, every row stride and hidden a multiple of 16 bytes); anything else takes
// the scalar path, one element per pack, same code.
//
// Numerics are HF's Qwen3RMSNorm / LlamaRMSNorm after the decoder layer's `residual + hidden_states`:
// h = (x + residual) rounded to the dtype, the sum of h^2 in float32, inv = rsqrt(sum / hidden + eps)
// (correctly rounded division and rsqrt), normed = (h * inv) rounded to the dtype, out = (weight * normed)
// rounded to the dtype. Only the order of the float32 sum differs from the CPU reference.
//
// Bytes in flight: x and residual packs are issued for every slot before the first is used, 16-byte
// ld.global.nc.L1::no_allocate (read once); at hidden 4096 that is 128 bytes per thread and, with three
// 256-thread CTAs per SM, ~96 KiB per SM, what HBM needs to stay busy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ptx.cuh"
#include "rms_norm.cuh"

namespace jetspec::cuda {
namespace {

constexpr int kMinBlock = 256;
constexpr unsigned kFull = 0xffffffffu;

// Element bits <-> float for each dtype. Elements travel as raw bits in 32-bit words: a 16-byte pack is
// 4 words (8 half-width elements, 2 per word, element 2i in the low half), a scalar pack one word.
template <RmsNormDtype D>
struct Elem {
  static constexpr int kBytes = D == RmsNormDtype::kFloat32 ? 4 : 2;
  __device__ static __forceinline__ float to_float(uint32_t bits) {
    if constexpr (D == RmsNormDtype::kBFloat16) return __uint_as_float(bits << 16);
    else if constexpr (D == RmsNormDtype::kFloat16) return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    else return __uint_as_float(bits);
  }
  // Rounded to nearest even, as torch's casts.
  __device__ static __forceinline__ uint32_t from_float(float v) {
    if constexpr (D == RmsNormDtype::kBFloat16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    else if constexpr (D == RmsNormDtype::kFloat16) return __half_as_ushort(__float2half_rn(v));
    else return __float_as_uint(v);
  }
};

template <RmsNormDtype D, int VEC>
struct PackOf {
  static constexpr int kBytes = VEC * Elem<D>::kBytes;
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  static constexpr int kPerWord = VEC / kWords;  // elements per word: 1 or 2
  static_assert(kBytes == 16 || VEC == 1, "16-byte packs or single elements");

  __device__ static __forceinline__ uint32_t get(const uint32_t (&w)[kWords], int e) {
    if constexpr (kPerWord == 1) return w[e];
    else return (w[e / 2] >> (16 * (e % 2))) & 0xffffu;
  }
  __device__ static __forceinline__ void set(uint32_t (&w)[kWords], int e, uint32_t bits) {
    if constexpr (kPerWord == 1) w[e] = bits;
    else w[e / 2] = (e % 2) ? (w[e / 2] & 0xffffu) | (bits << 16) : (w[e / 2] & 0xffff0000u) | bits;
  }

  // A row piece read once: bypasses L1.
  __device__ static __forceinline__ void load_stream(uint32_t (&w)[kWords], const char* p) {
    if constexpr (kBytes == 16) {
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
          : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
          : "l"(p));
    } else if constexpr (kBytes == 4) {
      asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(w[0]) : "l"(p));
    } else {
      unsigned short v;
      asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
      w[0] = v;
    }
  }
  // The weight, read by every row: cached.
  __device__ static __forceinline__ void load_cached(uint32_t (&w)[kWords], const char* p) {
    if constexpr (kBytes == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (kBytes == 4) {
      w[0] = __ldg(reinterpret_cast<const unsigned*>(p));
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
    }
  }
  __device__ static __forceinline__ void store(char* p, const uint32_t (&w)[kWords]) {
    if constexpr (kBytes == 16) *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    else if constexpr (kBytes == 4) *reinterpret_cast<unsigned*>(p) = w[0];
    else *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(w[0]);
  }
};

// Programmatic dependent launch (ptx.cuh): the CTAs may start while the kernel before it is still
// running and wait for it before the first load; the launch latency overlaps the previous kernel's tail.
using ptx::launch_dependents;
using ptx::wait_for_prerequisites;

struct Problem {
  const char* x;
  int64_t x_stride;  // bytes, as every stride here
  const char* residual;
  int64_t residual_stride;
  const char* weight;
  char* out;
  int64_t out_stride;
  char* residual_out;
  int64_t residual_out_stride;
  int64_t rows;
  int hidden;
  int packs;     // packs per row: hidden / VEC
  int tpr_log2;  // threads per row = 1 << tpr_log2
  float eps;
};

// kMaxVecs packs per thread; kMaxBlock the launch bound (registers: 64 per thread at 1024 threads).
template <RmsNormDtype D, int VEC, int kMaxVecs, int kMaxBlock>
__global__ void __launch_bounds__(kMaxBlock) rms_norm_kernel(const Problem p) {
  using E = Elem<D>;
  using P = PackOf<D, VEC>;
  constexpr int kWords = P::kWords;
  __shared__ float warp_sums[kMaxBlock / 32];

  const int tpr = 1 << p.tpr_log2;
  const int sub = threadIdx.x & (tpr - 1);
  const int row_in_cta = threadIdx.x >> p.tpr_log2;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> p.tpr_log2) + row_in_cta;
  // Slots i < slots hold packs of the row (none past the last row).
  const int slots = row < p.rows ? (p.packs - sub + tpr - 1) >> p.tpr_log2 : 0;

  launch_dependents();
  wait_for_prerequisites();

  // h, then the output, as raw element bits; every pack of x and residual is in flight before the first
  // is used.
  uint32_t h[kMaxVecs][kWords], r[kMaxVecs][kWords];
  const char* x_row = p.x + row * p.x_stride;
  const char* r_row = p.residual != nullptr ? p.residual + row * p.residual_stride : nullptr;
#pragma unroll
  for (int i = 0; i < kMaxVecs; ++i) {
    const int v = sub + i * tpr;
    if (i < slots) {
      P::load_stream(h[i], x_row + static_cast<int64_t>(v) * P::kBytes);
      if (p.residual != nullptr) P::load_stream(r[i], r_row + static_cast<int64_t>(v) * P::kBytes);
    }
  }

  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxVecs; ++i) {
    const int v = sub + i * tpr;
    if (i < slots) {
      if (p.residual != nullptr) {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          P::set(h[i], e, E::from_float(E::to_float(P::get(h[i], e)) + E::to_float(P::get(r[i], e))));
        if (p.residual_out != nullptr)
          P::store(p.residual_out + row * p.residual_out_stride + static_cast<int64_t>(v) * P::kBytes, h[i]);
      } else if (p.residual_out != nullptr) {
        P::store(p.residual_out + row * p.residual_out_stride + static_cast<int64_t>(v) * P::kBytes, h[i]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float f = E::to_float(P::get(h[i], e));
        ss = fmaf(f, f, ss);
      }
    }
  }

  // The row's sum: its threads are aligned groups of a warp (tpr <= 32) or whole warps.
  if (tpr <= 32) {
    for (int off = tpr >> 1; off > 0; off >>= 1) ss += __shfl_xor_sync(kFull, ss, off);
  } else {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(kFull, ss, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
    __syncthreads();
    const int first = (row_in_cta << p.tpr_log2) >> 5, warps = tpr >> 5;
    ss = 0.f;
    for (int w = 0; w < warps; ++w) ss += warp_sums[first + w];
  }
  const float inv = __frsqrt_rn(__fdiv_rn(ss, static_cast<float>(p.hidden)) + p.eps);

  char* out_row = p.out + row * p.out_stride;
#pragma unroll
  for (int i = 0; i < kMaxVecs; ++i) {
    const int v = sub + i * tpr;
    if (i < slots) {
      uint32_t w[kWords];
      P::load_cached(w, p.weight + static_cast<int64_t>(v) * P::kBytes);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float normed = E::to_float(E::from_float(E::to_float(P::get(h[i], e)) * inv));
        P::set(h[i], e, E::from_float(E::to_float(P::get(w, e)) * normed));
      }
      P::store(out_row + static_cast<int64_t>(v) * P::kBytes, h[i]);
    }
  }
}

// ---- host --------------------------------------------------------------------------------------------

int ceil_log2(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

template <RmsNormDtype D, int VEC, int kMaxVecs, int kMaxBlock>
cudaError_t launch(const RmsNormArgs& a, Problem p, bool pdl, cudaStream_t stream) {
  p.packs = static_cast<int>(a.hidden / VEC);
  const int64_t need = (p.packs + kMaxVecs - 1) / kMaxVecs;  // threads a row needs
  p.tpr_log2 = ceil_log2(need > 32 ? need : (p.packs < 32 ? p.packs : 32));
  const int tpr = 1 << p.tpr_log2;
  if (tpr > kMaxBlock) return cudaErrorInvalidValue;
  const int block = tpr > kMinBlock ? tpr : kMinBlock;
  const int64_t rows_per_cta = block / tpr;
  const int64_t grid = (a.rows + rows_per_cta - 1) / rows_per_cta;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(block), 1, 1);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, rms_norm_kernel<D, VEC, kMaxVecs, kMaxBlock>, p);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <RmsNormDtype D>
cudaError_t dispatch(const RmsNormArgs& a, const Problem& p, bool pdl, cudaStream_t stream) {
  constexpr int es = Elem<D>::kBytes, vec = 16 / es;
  const auto fits = [&](const void* ptr, int64_t stride_bytes) {
    return ptr == nullptr || (aligned16(ptr) && (a.rows <= 1 || stride_bytes % 16 == 0));
  };
  const bool vector = (a.hidden * es) % 16 == 0 && aligned16(a.weight) && fits(a.x, p.x_stride) &&
                      fits(a.residual, p.residual_stride) && fits(a.out, p.out_stride) &&
                      fits(a.residual_out, p.residual_out_stride);
  // kMaxVecs: the vector path fits kRmsNormMaxHidden in 512 threads, the scalar path in 1024.
  constexpr int kVecs = kRmsNormMaxHidden / vec / 512;
  constexpr int kScalarVecs = kRmsNormMaxHidden / 1024;
  return vector ? launch<D, vec, kVecs, 512>(a, p, pdl, stream) : launch<D, 1, kScalarVecs, 1024>(a, p, pdl, stream);
}

}  // namespace

cudaError_t rms_norm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.hidden < 1 || a.hidden > kRmsNormMaxHidden || a.rows < 0 || !(a.eps >= 0.f) || a.x == nullptr ||
      a.weight == nullptr || a.out == nullptr)
    return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  const int64_t es = a.dtype == RmsNormDtype::kFloat32 ? 4 : 2;
  Problem p{};
  p.x = static_cast<const char*>(a.x);
  p.x_stride = a.x_stride * es;
  p.residual = static_cast<const char*>(a.residual);
  p.residual_stride = a.residual_stride * es;
  p.weight = static_cast<const char*>(a.weight);
  p.out = static_cast<char*>(a.out);
  p.out_stride = a.out_stride * es;
  p.residual_out = static_cast<char*>(a.residual_out);
  p.residual_out_stride = a.residual_out_stride * es;
  p.rows = a.rows;
  p.hidden = static_cast<int>(a.hidden);
  p.eps = a.eps;
  // Programmatic dependent launch on sm_90 and later, unless JETSPEC_PDL=0 (read at every launch).
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  const bool pdl = major >= 9 && ptx::pdl_requested();
  switch (a.dtype) {
    case RmsNormDtype::kBFloat16: return dispatch<RmsNormDtype::kBFloat16>(a, p, pdl, stream);
    case RmsNormDtype::kFloat16: return dispatch<RmsNormDtype::kFloat16>(a, p, pdl, stream);
    default: return dispatch<RmsNormDtype::kFloat32>(a, p, pdl, stream);
  }
}

}  // namespace jetspec::cuda
