// Element arithmetic of merge_ / unmerge_, shared bit for bit by the CPU and CUDA kernels.
// Torch-free (tests/cpp builds it with CMake alone).
//
// The merge of one weight element w (storage dtype D) with the LoRA product is defined as
//   acc = fma(U[p, r-1], V[r-1, q], ... fma(U[p, 1], V[1, q], fma(U[p, 0], V[0, q], 0)))   (fp32)
//   y   = R(fma(s, acc, w))                                                               (R: fp32 -> D, RNE)
// and the unmerge candidate is c = R(fma(-s, acc, y)). Every fma is a single IEEE rounding, so this
// is the same number on every CPU, every GPU and in pylora/reference.py. c equals w for almost all
// elements; where it does not (rounding lost information), the merge records key(w) - key(c).
//
// Everything here lives in an inline namespace named after the ISA level of the translation unit
// (common/isa.h): csrc/cpu/*.cpp are compiled once per level and include this file, and the same
// helper compiled with FMA units is one instruction where without them it is a call to libm's fmaf.
// Without the namespace the linker would keep one copy of each, perhaps one an older CPU cannot run.
// The arithmetic is the same on every level: an fma is one IEEE rounding whichever way it runs.
#pragma once
#include <cstdint>
#include <cstring>

#include "isa.h"

#if defined(__CUDACC__)
#define PYLORA_HD __host__ __device__ __forceinline__
#else
#define PYLORA_HD inline __attribute__((always_inline))
#endif

namespace pylora {
namespace mm {
inline namespace PYLORA_ISA_NS {

// A record chunk is up to kChunk consecutive elements of one storage row. A correction entry is one
// uint16 (stored as int16): the column inside the chunk in the high 12 bits, key(w) - key(c) in the
// low 4 bits as a signed nibble. Differences outside [kMinDelta, kMaxDelta] are stored as escapes
// (full index and value).
constexpr int64_t kChunk = 4096;
constexpr int32_t kMinDelta = -8;
constexpr int32_t kMaxDelta = 7;

// A storage row of Q elements holds ceil(Q / kChunk) record chunks (none when Q == 0).
constexpr int64_t chunks_per_row(int64_t Q) { return Q == 0 ? 0 : (Q + kChunk - 1) / kChunk; }

PYLORA_HD int16_t pack_entry(int32_t column_in_chunk, int32_t delta) {
  return static_cast<int16_t>(static_cast<uint16_t>((column_in_chunk << 4) | (delta & 0xF)));
}

PYLORA_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

PYLORA_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

PYLORA_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// Finite means exponent bits not all ones.
PYLORA_HD bool finite_f32(float f) { return (f2u(f) & 0x7F800000u) != 0x7F800000u; }

// Storage types: bits <-> fp32, round to nearest even, and a monotone integer key
// (-0 sorts just below +0, so the key tells them apart).
struct F32 {
  using bits_t = uint32_t;
  using key_t = int64_t;
  static constexpr float kMax = 3.40282346638528859812e+38f;
  PYLORA_HD static float to_f(bits_t b) { return u2f(b); }
  PYLORA_HD static bits_t from_f(float f) { return f2u(f); }
  PYLORA_HD static bool finite(bits_t b) { return (b & 0x7F800000u) != 0x7F800000u; }
  PYLORA_HD static key_t key(bits_t b) {
    return (b & 0x80000000u) ? -static_cast<key_t>(b & 0x7FFFFFFFu) - 1 : static_cast<key_t>(b);
  }
  PYLORA_HD static bits_t unkey(key_t k) {
    return k < 0 ? static_cast<bits_t>(0x80000000u | static_cast<uint32_t>(-(k + 1))) : static_cast<bits_t>(k);
  }
};

struct BF16 {
  using bits_t = uint16_t;
  using key_t = int32_t;
  static constexpr float kMax = 3.38953139e+38f;
  PYLORA_HD static float to_f(bits_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
  // Round to nearest even; finite and infinite inputs only (callers never pass NaN on to storage).
  PYLORA_HD static bits_t from_f(float f) {
    const uint32_t u = f2u(f);
    return static_cast<bits_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  PYLORA_HD static bool finite(bits_t b) { return (b & 0x7F80u) != 0x7F80u; }
  PYLORA_HD static key_t key(bits_t b) {
    return (b & 0x8000u) ? -static_cast<key_t>(b & 0x7FFFu) - 1 : static_cast<key_t>(b);
  }
  PYLORA_HD static bits_t unkey(key_t k) {
    return k < 0 ? static_cast<bits_t>(0x8000u | static_cast<uint32_t>(-(k + 1))) : static_cast<bits_t>(k);
  }
};

struct F16 {
  using bits_t = uint16_t;
  using key_t = int32_t;
  static constexpr float kMax = 65504.0f;
  // Exact conversions (the branch-free formulation of the FP16 library, also used by c10::Half);
  // plain fp32 multiplies and adds, so they vectorise and give the same bits on CPU and GPU.
  PYLORA_HD static float to_f(bits_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = u2f(0x7800000u);  // 2^-112
    const float normalized = u2f((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = u2f((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result = sign | (two_w < denormalized_cutoff ? f2u(denormalized) : f2u(normalized));
    return u2f(result);
  }
  PYLORA_HD static bits_t from_f(float f) {
    const float scale_to_inf = u2f(0x77800000u);   // 2^112
    const float scale_to_zero = u2f(0x08800000u);  // 2^-110
    const float abs_f = u2f(f2u(f) & 0x7FFFFFFFu);
    float base = (abs_f * scale_to_inf) * scale_to_zero;
    const uint32_t w = f2u(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f2u(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<bits_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
  PYLORA_HD static bool finite(bits_t b) { return (b & 0x7C00u) != 0x7C00u; }
  PYLORA_HD static key_t key(bits_t b) {
    return (b & 0x8000u) ? -static_cast<key_t>(b & 0x7FFFu) - 1 : static_cast<key_t>(b);
  }
  PYLORA_HD static bits_t unkey(key_t k) {
    return k < 0 ? static_cast<bits_t>(0x8000u | static_cast<uint32_t>(-(k + 1))) : static_cast<bits_t>(k);
  }
};

// The merged element: y = R(fma(s, acc, w)). `ok` is false when the result is not finite.
template <class S>
PYLORA_HD typename S::bits_t merged(typename S::bits_t w, float s, float acc, bool& ok) {
  const float z = fma_rn(s, acc, S::to_f(w));
  const typename S::bits_t y = S::from_f(z);
  ok = finite_f32(z) && S::finite(y);
  return y;
}

// The unmerge candidate: c = R(fma(-s, acc, y)).
template <class S>
PYLORA_HD typename S::bits_t unmerged(typename S::bits_t y, float s, float acc) {
  return S::from_f(fma_rn(-s, acc, S::to_f(y)));
}

}  // namespace PYLORA_ISA_NS
}  // namespace mm
}  // namespace pylora
