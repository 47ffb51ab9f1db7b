// The arithmetic of accept_sample (contract in cpp/accept_sample.cpp) that its CPU kernel and its CUDA
// kernel share, written once so that both compute bit-identical values: the Philox4x32-10 draws, the
// order-preserving keys, the quantised probability of a token and the integer sampling steps.
// No torch headers: included by cpp/accept_sample.cpp (plain C++) and cuda/accept_sample.cu (nvcc).
//
// Float rules. Every float operation below is one IEEE-754 binary32 operation rounded to nearest even:
// never contracted into an FMA and never flushed to zero. The CUDA build compiles with --use_fast_math
// (approximate division, flush-to-zero, FMA contraction), so the device side spells each operation out
// in PTX (mul.rn / add.rn / sub.rn / div.rn without .ftz, which the compiler may neither fuse nor
// approximate); the host side turns GCC's cross-statement contraction off (it only matters on targets
// with FMA instructions). The Python reference (jetspec.ops.reference.accept_sample) performs the same
// operations as separate float32 tensor ops, which round the same way.
//
// Probabilities are integers. A token's probability is q = floor(e * 2^43) with e = qexp(x) in [0, 1]
// the exp of its processed logit minus the row's maximum (e = 1 at the maximum): every sum, threshold
// and comparison after that is exact uint64 arithmetic, so its result does not depend on the order of
// summation (threads, blocks, CPU loop). Tokens below 2^-43 of the top token (x < ln 2^-43 = -29.8)
// get q = 0 and are never drawn. With V < 2^20 tokens a total stays below 2^63.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define JETSPEC_HD __host__ __device__ __forceinline__
#else
#define JETSPEC_HD inline
#endif

#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace jetspec::sample {

constexpr int kQBits = 43;                        // q = floor(e * 2^kQBits)
constexpr int64_t kMaxVocab = (int64_t{1} << 20) - 1;
constexpr float kMinX = -30.0f;                   // below ln(2^-43): q would be 0
constexpr uint32_t kMinPositiveBits = 0x2A000000u;  // bits of 2^-43: q > 0 iff bits(e) >= this

// ---- IEEE binary32 operations, one rounding each -------------------------------------------------------

JETSPEC_HD uint32_t to_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

JETSPEC_HD float from_bits(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}

JETSPEC_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a * b;
#endif
}

JETSPEC_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}

JETSPEC_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}

JETSPEC_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

// ---- keys ------------------------------------------------------------------------------------------------

// Order-preserving key of a float: a < b iff key(a) < key(b); -0 and +0 share a key (they compare equal);
// NaN is above everything (as torch.argmax ranks it).
JETSPEC_HD uint32_t float_key(float v) {
  uint32_t b = to_bits(v);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFFFFFu;
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

JETSPEC_HD float key_float(uint32_t k) { return from_bits((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k); }

JETSPEC_HD bool is_finite(float v) { return (to_bits(v) & 0x7F800000u) != 0x7F800000u; }

// ---- the probability of one token --------------------------------------------------------------------------

// exp(x) for x <= 0 (x = processed logit minus the row's maximum), 0 below kMinX or for NaN: Cephes' expf
// (Cody-Waite reduction by n ln 2, n = rint(x log2 e), then a degree-7 polynomial), about 1 ulp.
// qexp(0) = 1 exactly.
JETSPEC_HD float qexp(float x) {
  if (!(x >= kMinX)) return 0.0f;
  const float kMagic = 0x1.8p23f;  // t + 1.5 * 2^23 rounds t to an integer (half to even) in its low bits
  const float t = add_rn(mul_rn(x, 0x1.715476p+0f), kMagic);
  const float n = sub_rn(t, kMagic);  // in [-44, 0]
  const int32_t ni = static_cast<int32_t>(to_bits(t) - to_bits(kMagic));
  float r = sub_rn(x, mul_rn(n, 0x1.63p-1f));  // n * C1 is exact (C1 has 9 bits)
  r = sub_rn(r, mul_rn(n, -0x1.bd0106p-13f));
  float p = 0x1.a0d2cep-13f;
  p = add_rn(mul_rn(p, r), 0x1.6e879cp-10f);
  p = add_rn(mul_rn(p, r), 0x1.11121p-7f);
  p = add_rn(mul_rn(p, r), 0x1.555382p-5f);
  p = add_rn(mul_rn(p, r), 0x1.555554p-3f);
  p = add_rn(mul_rn(p, r), 0.5f);
  p = add_rn(add_rn(mul_rn(p, mul_rn(r, r)), r), 1.0f);
  return mul_rn(p, from_bits(static_cast<uint32_t>(ni + 127) << 23));  // * 2^n, exact (normal result)
}

// q = floor(e * 2^43) for e = qexp(x) (0 or in [2^-45, 1]). The host converts the exact product; the
// device shifts e's significand (integer ops, faster than a float -> uint64 conversion), the same value.
JETSPEC_HD uint64_t quantize(float e) {
#ifdef __CUDA_ARCH__
  const uint32_t bits = __float_as_uint(e);
  if (bits < kMinPositiveBits) return 0;
  const uint64_t significand = (bits & 0x7FFFFFu) | 0x800000u;
  const int shift = static_cast<int>(bits >> 23) - (127 + 23 - kQBits);  // e * 2^43 = significand * 2^shift
  return shift >= 0 ? significand << shift : significand >> -shift;
#else
  return static_cast<uint64_t>(e * 0x1p43f);
#endif
}

// ---- exact integer steps -------------------------------------------------------------------------------

JETSPEC_HD void mul_64x64(uint64_t a, uint64_t b, uint64_t& hi, uint64_t& lo) {
#ifdef __CUDA_ARCH__
  lo = a * b;
  hi = __umul64hi(a, b);
#else
  const unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
  lo = static_cast<uint64_t>(p);
  hi = static_cast<uint64_t>(p >> 64);
#endif
}

// floor(u53 * total / 2^53): the draw's position in [0, total) for a 53-bit uniform u53.
JETSPEC_HD uint64_t scale_uniform(uint64_t u53, uint64_t total) {
  uint64_t hi, lo;
  mul_64x64(u53, total, hi, lo);
  return (hi << 11) | (lo >> 53);
}

// Top-p: a token is kept iff the mass of the tokens with a larger e is below this cut,
// max(1, ceil(P * total / 2^32)) with P = floor(top_p * 2^32), for 0 <= top_p < 1.
JETSPEC_HD uint64_t top_p_cut(float top_p, uint64_t total) {
  const uint64_t p32 = top_p > 0.0f ? static_cast<uint64_t>(top_p * 0x1p32f) : 0;  // exact product, < 2^32
  uint64_t hi, lo;
  mul_64x64(p32, total, hi, lo);
  const uint64_t add = lo + 0xFFFFFFFFull;
  hi += add < lo;
  const uint64_t cut = (hi << 32) | (add >> 32);
  return cut > 0 ? cut : 1;
}

// ---- Philox4x32-10 ---------------------------------------------------------------------------------------

// The uniform of node `node` of batch row `row`: Philox4x32-10 (Salmon et al. 2011, Random123's constants)
// with key (seed & 0xffffffff, seed >> 32) and counter (node, row, offset & 0xffffffff, 0); its first two
// output words x0, x1 give u53 = (x1 << 32 | x0) >> 11, i.e. the uniform u53 / 2^53 in [0, 1).
JETSPEC_HD uint64_t philox_u53(uint64_t seed, uint64_t offset, uint32_t row, uint32_t node) {
  uint32_t c0 = node, c1 = row, c2 = static_cast<uint32_t>(offset), c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
  return ((static_cast<uint64_t>(c1) << 32) | c0) >> 11;
}

}  // namespace jetspec::sample

#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
