// skinny_gemm: y = x @ W^T for a few rows of x (1..64) against an nn.Linear weight, with the epilogue
// fused, in one pass over the weight.
//
// The op is a weight stream (64 rows of x make 64 FLOP per weight byte, far below the tensor cores'
// ~200 FLOP/byte balance), so its floor is the weight's bytes at memory bandwidth; everything else has to
// hide under that stream.
//
// Tiles. A CTA (256 threads) owns a tile of 128 weight rows (for the SiLU-mul epilogue: 64 gate rows and
// the 64 matching up rows, so that both halves of an output meet in one CTA) and streams them, with the x
// rows, through a ring of shared-memory stages filled by 16-byte cp.async (L2::256B prefetch): each stage
// holds 128 bytes of every row (64 elements of K), XOR-swizzled by row. 4 to 6 stages, sized so that two
// CTAs share an SM: 96-108 KiB of ring per CTA, 3-5 stages of 16 KiB of weight in flight per CTA, so
// ~100-160 KiB per SM.
//
// Products. Tensor cores (mma.sync m16n8k16, fp32 accumulate) with the weight as the A operand (16 weight
// rows as stored, ldmatrix) and x as the column-major B operand (8 x rows per n8 block): one x row costs
// one n8 block, where x as A would pad every x row to 16. NB n8 blocks cover the rows (1, 2, 4, 8 for up
// to 8, 16, 32, 64 rows). Warps: for up to 32 rows each of the 8 warps owns 16 weight rows and every
// block; for 64 rows a warp owns 32 weight rows and half the blocks (4 x 2 warps), which halves the
// shared-memory reads of x per stage (x is read by 4 warps instead of 8) at the cost of reading each
// weight fragment twice: 64 + 24 KiB of shared-memory traffic per 16 KiB of weight instead of 80 + 24.
//
// Split K. When the weight has too few row tiles to give every SM a CTA (Qwen3-8B's o_proj: 32 tiles), K is
// split S ways (S <= 8, as many as fit in one wave of resident CTAs) and the S CTAs of a tile form a
// thread-block cluster: each leaves its fp32 partial tile in its shared memory, and after a cluster
// barrier CTA s sums slice s of the tile over the S partials through distributed shared memory (in rank
// order: deterministic) and applies the epilogue. No workspace, no second kernel, nothing to reset.
//
// Epilogue. Rounding follows the HF modules the op replaces: y rounded to the dtype; SiLU-mul as
// act_fn(gate_proj(x)) * up_proj(x) (gate and up rounded, silu rounded, product rounded); residual as
// residual + o_proj(x) (y rounded, then the sum rounded). The epilogue runs from a [rows, 128] fp32 tile
// in shared memory, so the writes of out (and the reads of residual) are coalesced along the row, for
// any strides.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>
#include <mutex>
#include <tuple>

#include "ptx.cuh"
#include "skinny_gemm.cuh"

namespace jetspec::cuda {
namespace {

using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::smem_addr;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 128;    // weight rows per CTA tile
constexpr int kHalfTile = kTileRows / 2;
constexpr int kChunkBytes = 128;  // bytes of every row per pipeline stage
constexpr int kPieces = kChunkBytes / 16;
constexpr int kMaxSplit = 8;      // the portable cluster size
constexpr int kMinSplitStages = 4;  // stages per CTA below which K is not split further
constexpr int kSmemPerSm = 228 * 1024;  // sm_90
constexpr int kSmemPerBlockReserved = 1024;
constexpr int kMaxStages = 6;

constexpr int cmin(int a, int b) { return a < b ? a : b; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Shared memory for NB n8 blocks of x rows: the stage ring; after the main loop, the fp32 tile
// red[x row][tile row] (row pitch padded by 4 floats: the accumulator fragments store without conflicts).
template <int NB>
struct Layout {
  static constexpr int kXRows = 16 * ((NB + 1) / 2);  // ldmatrix x4 reads x rows in pairs of blocks
  static constexpr int kStageBytes = (kTileRows + kXRows) * kChunkBytes;
  static constexpr int kStages = cmin(kMaxStages, (kSmemPerSm / 2 - kSmemPerBlockReserved) / kStageBytes);
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kRedPitch = kTileRows + 4;
  static constexpr int kRedBytes = kXRows * kRedPitch * 4;
  static constexpr int kBytes = cmax(kRingBytes, kRedBytes);
  static_assert(kStages >= 3, "a ring needs a stage landing, one being read and one being filled");
};

struct Problem {
  const char* x;
  int64_t x_stride;  // bytes
  const char* weight;
  int64_t weight_stride;  // bytes
  int rows;
  int64_t n;          // weight rows
  int64_t half;       // SiLU-mul: I = n / 2, the up rows' offset; else 0
  int64_t n_out;      // output columns: n, or I
  int64_t row_bytes;  // K * element size, a multiple of 16
  int k_stages;       // ceil(row_bytes / kChunkBytes)
  int epilogue;
  const char* residual;
  int64_t residual_stride0, residual_stride1;  // bytes
  char* out;
  int64_t out_stride0, out_stride1;  // bytes
};

// ---- clusters (sm_90) -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t cluster_rank() {
#if __CUDA_ARCH__ >= 900
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#else
  return 0;
#endif
}

// Every thread of every CTA of the cluster: the shared-memory writes before it are visible to the
// cluster's reads after it.
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// The 4 floats at shared-memory address `addr` (16-byte aligned, of this CTA's layout) in the CTA of
// cluster rank `rank`.
__device__ __forceinline__ float4 ld_cluster_v4(uint32_t addr, uint32_t rank) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#if __CUDA_ARCH__ >= 900
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(remote)
               : "memory");
#endif
  return v;
}

// ---- programmatic dependent launch (sm_90) ---------------------------------------------------------
//
// Launched with programmatic stream serialization, the kernel may start while the kernel before it in
// the stream is still running: it lets the next kernel launch at once, streams the first stages of the
// weight (which no kernel of a forward writes), and waits for the kernels before it only before it
// touches x, residual or out (ptx.cuh).
using ptx::launch_dependents;
using ptx::wait_for_prerequisites;

// ---- streaming --------------------------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1; zero-fills when !valid (src is then never read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ int swizzle(int row, int piece) { return row * kChunkBytes + ((piece ^ (row & 7)) << 4); }

// The weight row behind row j of tile `tile`, or -1 past the weight: SiLU-mul tiles take gate rows
// [64 tile, 64 tile + 64) and the up rows I above them.
__device__ __forceinline__ int64_t weight_row(const Problem& p, int64_t tile, int j) {
  if (p.epilogue == static_cast<int>(SkinnyEpilogue::kSiluMul)) {
    const int64_t i = tile * kHalfTile + (j & (kHalfTile - 1));
    return i < p.half ? i + (j >= kHalfTile ? p.half : 0) : -1;
  }
  const int64_t n = tile * kTileRows + j;
  return n < p.n ? n : -1;
}

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Rounded to nearest even, as torch's casts.
template <bool kBF16>
__device__ __forceinline__ float round_to(float v) {
  if constexpr (kBF16) return __bfloat162float(__float2bfloat16_rn(v));
  else return __half2float(__float2half_rn(v));
}

template <bool kBF16>
__device__ __forceinline__ void store(char* p, float v) {
  if constexpr (kBF16) *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
  else *reinterpret_cast<__half*>(p) = __float2half_rn(v);
}

template <bool kBF16>
__device__ __forceinline__ float load(const char* p) {
  if constexpr (kBF16) return to_float(*reinterpret_cast<const __nv_bfloat16*>(p));
  else return to_float(*reinterpret_cast<const __half*>(p));
}

// ---- the kernel ---------------------------------------------------------------------------------------
//
// NB: n8 blocks of x rows; MW: m16 tiles of weight rows per warp (and warps along x). acc[mi][j]: weight
// rows (of the tile) wn * 16 MW + 16 mi + g (+ 8), x rows 8 (wx * NB / MW + j) + 2 t (+ 1), in the
// m16n8 accumulator layout (g = lane / 4, t = lane % 4).

template <bool kBF16, int NB, int MW>
__global__ void __launch_bounds__(kThreads, 2) skinny_gemm_kernel(const Problem p) {
  using L = Layout<NB>;
  constexpr int kStages = L::kStages;
  constexpr int kWN = kWarps / MW;  // warps along the weight rows
  constexpr int kNBW = NB / MW;     // n8 blocks per warp
  static_assert(NB % MW == 0 && kWN * 16 * MW == kTileRows, "warp grid covers the tile");
  extern __shared__ __align__(128) unsigned char smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % kWN, wx = warp / kWN;
  const int64_t tile = blockIdx.x;
  const int split = blockIdx.y, splits = gridDim.y;
  const int k_begin = static_cast<int>(static_cast<int64_t>(split) * p.k_stages / splits);
  const int k_end = static_cast<int>(static_cast<int64_t>(split + 1) * p.k_stages / splits);
  const int stages = k_end - k_begin;

  // This thread's cp.async sources: piece `piece` of weight rows threadIdx.x / 8 + 32 i and of x rows
  // (threadIdx.x + 256 i) / 8, at the start of this CTA's K range (nullptr: zero-filled).
  const int piece = threadIdx.x % kPieces;
  constexpr int kWLoads = kTileRows * kPieces / kThreads;
  constexpr int kXLoads = (L::kXRows * kPieces + kThreads - 1) / kThreads;
  const int64_t k0 = static_cast<int64_t>(k_begin) * kChunkBytes + piece * 16;
  const char* w_src[kWLoads];
  const char* x_src[kXLoads];
#pragma unroll
  for (int i = 0; i < kWLoads; ++i) {
    const int64_t row = weight_row(p, tile, threadIdx.x / kPieces + i * (kThreads / kPieces));
    w_src[i] = row >= 0 ? p.weight + row * p.weight_stride + k0 : nullptr;
  }
#pragma unroll
  for (int i = 0; i < kXLoads; ++i) {
    const int row = (threadIdx.x + i * kThreads) / kPieces;
    x_src[i] = row < p.rows ? p.x + row * p.x_stride + k0 : nullptr;
  }

  // Stage s (0-based in this CTA's range) into ring slot `slot`: the weight pieces, then the x pieces.
  auto load_weight = [&](int s, int slot) {
    const uint32_t base = smem_addr(smem + slot * L::kStageBytes);
    const int64_t offset = static_cast<int64_t>(s) * kChunkBytes;
    const bool k_ok = k0 + offset < p.row_bytes;
#pragma unroll
    for (int i = 0; i < kWLoads; ++i) {
      const int row = threadIdx.x / kPieces + i * (kThreads / kPieces);
      const bool ok = k_ok && w_src[i] != nullptr;
      cp_async16(base + swizzle(row, piece), ok ? w_src[i] + offset : p.weight, ok);
    }
  };
  auto load_x = [&](int s, int slot) {
    const uint32_t x_base = smem_addr(smem + slot * L::kStageBytes) + kTileRows * kChunkBytes;
    const int64_t offset = static_cast<int64_t>(s) * kChunkBytes;
    const bool k_ok = k0 + offset < p.row_bytes;
#pragma unroll
    for (int i = 0; i < kXLoads; ++i) {
      const int row = (threadIdx.x + i * kThreads) / kPieces;
      if (row < L::kXRows) {
        const bool ok = k_ok && x_src[i] != nullptr;
        cp_async16(x_base + swizzle(row, piece), ok ? x_src[i] + offset : p.x, ok);
      }
    }
  };

  float acc[MW][kNBW][4] = {};
  const int q = lane >> 3, r8 = lane & 7;
  const int a_row = wn * 16 * MW + (q & 1) * 8 + r8;     // + 16 mi
  const int b_row = wx * kNBW * 8 + (q >> 1) * 8 + r8;  // + 16 jp

  // Loads run kStages - 1 stages ahead of the products; stage i lives in slot i % kStages. The first
  // stages' weight pieces are in flight before the wait for the kernels before this one (one group per
  // stage, empty or not, so that wait_group counts stages; the first group also holds those pieces).
  launch_dependents();
  for (int i = 0; i < kStages - 1; ++i)
    if (i < stages) load_weight(i, i);
  wait_for_prerequisites();
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < stages) load_x(i, i);
    cp_async_commit();
  }
  int loaded = kStages - 1 < stages ? kStages - 1 : stages, load_slot = kStages - 1;
  int slot = 0;
  for (int i = 0; i < stages; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for every thread; slot (i - 1) % kStages is free to refill
    if (loaded < stages) {
      load_weight(loaded, load_slot);
      load_x(loaded++, load_slot);
      load_slot = load_slot + 1 == kStages ? 0 : load_slot + 1;
    }
    cp_async_commit();
    const uint32_t w_base = smem_addr(smem + slot * L::kStageBytes), x_base = w_base + kTileRows * kChunkBytes;
#pragma unroll
    for (int ks = 0; ks < kPieces / 2; ++ks) {
      uint32_t a[MW][4];
#pragma unroll
      for (int mi = 0; mi < MW; ++mi) ldmatrix_x4(a[mi], w_base + swizzle(a_row + 16 * mi, 2 * ks + (q >> 1)));
#pragma unroll
      for (int jp = 0; jp < (kNBW + 1) / 2; ++jp) {
        uint32_t b[4];
        ldmatrix_x4(b, x_base + swizzle(b_row + 16 * jp, 2 * ks + (q & 1)));
#pragma unroll
        for (int mi = 0; mi < MW; ++mi) {
          ptx::mma16816<kBF16>(acc[mi][2 * jp], a[mi], b[0], b[1]);
          if (2 * jp + 1 < kNBW) ptx::mma16816<kBF16>(acc[mi][2 * jp + 1], a[mi], b[2], b[3]);
        }
      }
    }
    slot = slot + 1 == kStages ? 0 : slot + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring: it becomes the fp32 tile

  float* red = reinterpret_cast<float*>(smem);
  {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MW; ++mi)
#pragma unroll
      for (int j = 0; j < kNBW; ++j) {
        const int wrow = wn * 16 * MW + 16 * mi + g, xrow = (wx * kNBW + j) * 8 + 2 * t;
        red[xrow * L::kRedPitch + wrow] = acc[mi][j][0];
        red[(xrow + 1) * L::kRedPitch + wrow] = acc[mi][j][1];
        red[xrow * L::kRedPitch + wrow + 8] = acc[mi][j][2];
        red[(xrow + 1) * L::kRedPitch + wrow + 8] = acc[mi][j][3];
      }
  }
  if (splits > 1) cluster_sync();
  else __syncthreads();

  // Slice `rank` of the tile's outputs, 4 columns per thread: the sum over the cluster's partial tiles,
  // in rank order (all S loads in flight at once), then the epilogue.
  const uint32_t red_addr = smem_addr(red);
  auto total4 = [&](int xrow, int col) {
    const int offset = xrow * L::kRedPitch + col;
    if (splits == 1) return *reinterpret_cast<const float4*>(red + offset);
    float4 part[kMaxSplit];
#pragma unroll
    for (int s = 0; s < kMaxSplit; ++s)
      if (s < splits) part[s] = ld_cluster_v4(red_addr + offset * 4, s);
    float4 v = part[0];
#pragma unroll
    for (int s = 1; s < kMaxSplit; ++s)
      if (s < splits) v.x += part[s].x, v.y += part[s].y, v.z += part[s].z, v.w += part[s].w;
    return v;
  };
  const int rank = splits > 1 ? static_cast<int>(cluster_rank()) : 0;
  if (p.epilogue == static_cast<int>(SkinnyEpilogue::kSiluMul)) {
    constexpr int kGroups = kHalfTile / 4;
    for (int idx = rank * kThreads + threadIdx.x; idx < p.rows * kGroups; idx += kThreads * splits) {
      const int xrow = idx / kGroups, col = idx % kGroups * 4;
      const float4 gate4 = total4(xrow, col), up4 = total4(xrow, kHalfTile + col);
      const float gate[4] = {gate4.x, gate4.y, gate4.z, gate4.w}, up[4] = {up4.x, up4.y, up4.z, up4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = tile * kHalfTile + col + e;
        if (i < p.n_out) {
          const float g = round_to<kBF16>(gate[e]);
          const float act = round_to<kBF16>(__fdiv_rn(g, 1.f + __expf(-g)));
          store<kBF16>(p.out + xrow * p.out_stride0 + i * p.out_stride1, act * round_to<kBF16>(up[e]));
        }
      }
    }
  } else {
    constexpr int kGroups = kTileRows / 4;
    const bool add = p.epilogue == static_cast<int>(SkinnyEpilogue::kResidual);
    for (int idx = rank * kThreads + threadIdx.x; idx < p.rows * kGroups; idx += kThreads * splits) {
      const int xrow = idx / kGroups, col = idx % kGroups * 4;
      const float4 y4 = total4(xrow, col);
      const float y[4] = {y4.x, y4.y, y4.z, y4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t n = tile * kTileRows + col + e;
        if (n < p.n_out) {
          float v = round_to<kBF16>(y[e]);
          if (add) v += load<kBF16>(p.residual + xrow * p.residual_stride0 + n * p.residual_stride1);
          store<kBF16>(p.out + xrow * p.out_stride0 + n * p.out_stride1, v);
        }
      }
    }
  }
  if (splits > 1) cluster_sync();  // no CTA leaves while the cluster still reads its tile
}

// ---- host --------------------------------------------------------------------------------------------

using Kernel = void (*)(Problem);

template <bool kBF16>
Kernel kernel_for(int nb, int* smem) {
  switch (nb) {
    case 1: *smem = Layout<1>::kBytes; return skinny_gemm_kernel<kBF16, 1, 1>;
    case 2: *smem = Layout<2>::kBytes; return skinny_gemm_kernel<kBF16, 2, 1>;
    case 4: *smem = Layout<4>::kBytes; return skinny_gemm_kernel<kBF16, 4, 1>;
    default: *smem = Layout<8>::kBytes; return skinny_gemm_kernel<kBF16, 8, 2>;
  }
}

struct DeviceInfo {
  int sms = 0;
  bool clusters = false;  // sm_90 and later: clusters and programmatic dependent launch
};

// Per (device, kernel): the kernel's attributes are set once; per (device, kernel, split): how many
// clusters of `split` CTAs are resident at once (0: the launch would fail).
struct Cache {
  std::mutex mutex;
  std::map<int, DeviceInfo> devices;
  std::map<std::tuple<int, Kernel, int>, int> resident;  // split 0: attributes set
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no teardown order issues at exit
  return *c;
}

cudaError_t device_info(int device, DeviceInfo* out) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (auto it = c.devices.find(device); it != c.devices.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  int major = 0;
  cudaError_t err = cudaDeviceGetAttribute(&out->sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  out->clusters = major >= 9;
  c.devices[device] = *out;
  return cudaSuccess;
}

// A launch of tiles x split CTAs in clusters of `split` (attrs: room for 2), with programmatic stream
// serialization when `pdl`.
cudaLaunchConfig_t config(int64_t tiles, int split, int smem, bool pdl, cudaStream_t stream, cudaLaunchAttribute* attrs) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(split), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = 0;
  if (split > 1) {
    cudaLaunchAttribute& a = attrs[cfg.numAttrs++];
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = 1;
    a.val.clusterDim.y = static_cast<unsigned>(split);
    a.val.clusterDim.z = 1;
  }
  if (pdl) {
    cudaLaunchAttribute& a = attrs[cfg.numAttrs++];
    a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a.val.programmaticStreamSerializationAllowed = 1;
  }
  return cfg;
}

// Clusters of `split` CTAs of `kernel` resident at once on `device` (split 1: CTAs).
cudaError_t resident(int device, Kernel kernel, int smem, int split, int* out) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.resident.find({device, kernel, 0}) == c.resident.end()) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    // All of L1 as shared memory (the weight bypasses L1): two CTAs' rings per SM.
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
    c.resident[{device, kernel, 0}] = 1;
  }
  if (auto it = c.resident.find({device, kernel, split}); it != c.resident.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  int n = 0;
  cudaError_t err;
  if (split == 1) {
    int sms = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem);
    n *= sms;
  } else {
    cudaLaunchAttribute attrs[2];
    const cudaLaunchConfig_t cfg = config(1, split, smem, false, nullptr, attrs);
    err = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg);
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a cluster size the device cannot place: not an error of the launch
    n = 0;
  }
  c.resident[{device, kernel, split}] = n;
  *out = n;
  return cudaSuccess;
}

}  // namespace

cudaError_t skinny_gemm(const SkinnyGemmArgs& a, cudaStream_t stream) {
  const int64_t es = 2;
  const int64_t row_bytes = a.k * es;
  const bool silu = a.epilogue == SkinnyEpilogue::kSiluMul;
  if (a.rows < 1 || a.rows > kSkinnyGemmMaxRows || a.n < 1 || a.k < 1 || row_bytes % 16 != 0 ||
      (silu && a.n % 2 != 0) || (a.epilogue == SkinnyEpilogue::kResidual && a.residual == nullptr))
    return cudaErrorInvalidValue;

  const int nb = a.rows <= 8 ? 1 : a.rows <= 16 ? 2 : a.rows <= 32 ? 4 : 8;
  int smem = 0;
  const Kernel kernel = a.dtype == SkinnyGemmDtype::kBFloat16 ? kernel_for<true>(nb, &smem) : kernel_for<false>(nb, &smem);

  Problem p{};
  p.x = static_cast<const char*>(a.x);
  p.x_stride = a.x_stride * es;
  p.weight = static_cast<const char*>(a.weight);
  p.weight_stride = a.weight_stride * es;
  p.rows = static_cast<int>(a.rows);
  p.n = a.n;
  p.half = silu ? a.n / 2 : 0;
  p.n_out = silu ? a.n / 2 : a.n;
  p.row_bytes = row_bytes;
  p.k_stages = static_cast<int>((row_bytes + kChunkBytes - 1) / kChunkBytes);
  p.epilogue = static_cast<int>(a.epilogue);
  p.residual = static_cast<const char*>(a.residual);
  p.residual_stride0 = a.residual_stride0 * es;
  p.residual_stride1 = a.residual_stride1 * es;
  p.out = static_cast<char*>(a.out);
  p.out_stride0 = a.out_stride0 * es;
  p.out_stride1 = a.out_stride1 * es;
  const int64_t tiles = silu ? (p.half + kHalfTile - 1) / kHalfTile : (a.n + kTileRows - 1) / kTileRows;
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;

  int device = 0;
  DeviceInfo info;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = device_info(device, &info);
  // The widest split whose clusters all fit in one wave (deterministic for a shape on a device).
  int split = 1, ctas = 0;
  if (err == cudaSuccess) err = resident(device, kernel, smem, 1, &ctas);
  if (err != cudaSuccess) return err;
  if (ctas < 1) return cudaErrorInvalidConfiguration;
  const int max_split = info.clusters ? cmin(kMaxSplit, cmax(1, p.k_stages / kMinSplitStages)) : 1;
  for (int s = max_split; s > 1 && split == 1; --s) {
    if (tiles * s > ctas) continue;
    int clusters = 0;
    if ((err = resident(device, kernel, smem, s, &clusters)) != cudaSuccess) return err;
    if (tiles <= clusters) split = s;
  }

  cudaLaunchAttribute attrs[2];
  const cudaLaunchConfig_t cfg = config(tiles, split, smem, info.clusters && ptx::pdl_requested(), stream, attrs);
  err = cudaLaunchKernelEx(&cfg, kernel, p);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

}  // namespace jetspec::cuda
