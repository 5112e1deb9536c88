// The dropout mask of lora_linear, defined once, bit for bit, for the CPU kernels, the CUDA kernels
// and pylora/reference.py (which reproduces it with int64 torch ops). Torch-free.
//
// keep(seed, t, i) for x [T, I] with counter n = t * I + i (64 bits) and seed as 64 unsigned bits:
//   k0 = lo32(seed),  k1 = mix32(hi32(seed) ^ 0x9E3779B9)
//   hash = mix32(mix32(lo32(n) ^ k0) ^ (hi32(n) + k1))            (all arithmetic mod 2^32)
//   keep  iff  hash >= threshold,  threshold = min(round_half_even(p * 2^32), 2^32 - 1)
// mix32 is Chris Wellons' "lowbias32" integer finaliser (a bijection with near-ideal avalanche), so a
// row of consecutive counters gives independent-looking bits and P(keep) = 1 - p to within 2^-32.
// Being a pure function of (seed, n), the mask is recomputed wherever it is needed: no [T, I] mask
// is ever stored, and forward and backward agree on it by construction.
#pragma once
#include <cmath>
#include <cstdint>

#ifndef PYLORA_HD
#if defined(__CUDACC__)
#define PYLORA_HD __host__ __device__ __forceinline__
#else
#define PYLORA_HD inline __attribute__((always_inline))
#endif
#endif

namespace pylora {
namespace dropout {

struct Key {
  uint32_t k0;         // lo32(seed)
  uint32_t k1;         // mix32(hi32(seed) ^ 0x9E3779B9)
  uint32_t threshold;  // keep iff hash >= threshold
};

PYLORA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The hash of counter n = (hi << 32) | lo.
PYLORA_HD uint32_t hash(const Key& k, uint32_t lo, uint32_t hi) { return mix32(mix32(lo ^ k.k0) ^ (hi + k.k1)); }

PYLORA_HD bool keep(const Key& k, uint64_t n) {
  return hash(k, static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32)) >= k.threshold;
}

// Host only: the key of one call. p must lie in [0, 1) (checked at the op boundary).
inline Key make_key(int64_t seed, double p) {
  const uint64_t s = static_cast<uint64_t>(seed);
  // p * 2^32 is exact in double; nearbyint rounds half to even in the default rounding mode, like
  // Python's round() in the reference.
  const double t = std::nearbyint(p * 4294967296.0);
  const uint32_t threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  return Key{static_cast<uint32_t>(s), mix32(static_cast<uint32_t>(s >> 32) ^ 0x9E3779B9u), threshold};
}

}  // namespace dropout
}  // namespace pylora
