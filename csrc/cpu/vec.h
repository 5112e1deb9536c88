// fp32 vectors for the CPU kernels: load float32 / float16 / bfloat16 as fp32 lanes, fma, horizontal
// sum, and store back with one round-to-nearest-even (torch's conversion, NaN kept NaN); and Block,
// a register block of fp32 lanes for kernels that keep their accumulators in registers.
// AVX-512 (16 lanes) or AVX2+FMA+F16C (8 lanes) by intrinsics; otherwise 8 lanes of plain C++ that
// the compiler vectorises as it can. One API, so the kernels are written once.
//
// This is the only file with ISA-specific code: the ISA is common/isa.h's level (from the compiler's
// target macros: __AVX512F__, __AVX2__, __FMA__, __F16C__), and the kernels see it only through this
// API and vec::kIsa (for their blocking tables). Everything lives in an inline namespace named after
// the ISA, so one kernel file compiled several times with different target flags (one object per ISA,
// chosen at run time by cpu/dispatch.cpp, as ATen's CPU kernels are) links without two definitions of
// the same function.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "../common/isa.h"

// The choice is common/isa.h's (the level of this translation unit); the rest of this file keys on
// PYLORA_VEC (undefined again at the end).
#define PYLORA_VEC_PLAIN 0
#define PYLORA_VEC_AVX2 1
#define PYLORA_VEC_AVX512 2
#define PYLORA_VEC PYLORA_ISA_LEVEL
#define PYLORA_VEC_NS PYLORA_ISA_NS

#if PYLORA_VEC != PYLORA_VEC_PLAIN
#include <immintrin.h>
#endif

namespace pylora {
namespace vec {

enum class Isa { kAvx512, kAvx2, kPlain };

inline namespace PYLORA_VEC_NS {

#if PYLORA_VEC == PYLORA_VEC_AVX512

constexpr Isa kIsa = Isa::kAvx512;

// GCC 12 reports its own AVX-512 intrinsics (their _mm512_undefined_* pass-through operands) as
// uninitialised once inlined (GCC bug 105593); the pragma state of these wrappers is what it consults.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

constexpr int W = 16;
using V = __m512;
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float f) { return _mm512_set1_ps(f); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline V load(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void store(c10::Half* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store(c10::BFloat16* p, V v) {
  // (u + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0: c10::BFloat16's round_to_nearest_even, lane by lane.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

#pragma GCC diagnostic pop

#elif PYLORA_VEC == PYLORA_VEC_AVX2

constexpr Isa kIsa = Isa::kAvx2;
constexpr int W = 8;
using V = __m256;
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float f) { return _mm256_set1_ps(f); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline V load(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void store(c10::Half* p, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store(c10::BFloat16* p, V v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // packus works within 128-bit lanes: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather the two halves.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

#else

constexpr Isa kIsa = Isa::kPlain;
constexpr int W = 8;
struct V {
  float f[W];
};
inline V zero() { return V{}; }
inline V set1(float x) {
  V v;
  for (int i = 0; i < W; ++i) v.f[i] = x;
  return v;
}
// Multiply then add: a machine without FMA units would call libm's software fmaf here.
inline V fma(V a, V b, V c) {
  for (int i = 0; i < W; ++i) c.f[i] = c.f[i] + a.f[i] * b.f[i];
  return c;
}
inline float hsum(V v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v.f[i];
  return s;
}
template <class T>
inline V load(const T* p) {
  V v;
  for (int i = 0; i < W; ++i) v.f[i] = static_cast<float>(p[i]);
  return v;
}
template <class T>
inline void store(T* p, V v) {
  for (int i = 0; i < W; ++i) p[i] = static_cast<T>(v.f[i]);
}

#endif

// Block: kBlock fp32 lanes that live in registers as one value (two vectors with AVX-512 or AVX2,
// 8 scalars otherwise), the unit of register-blocked kernels: a [rows x kBlock] tile of accumulators
// stays in registers for a whole reduction. fma_rn rounds once per lane on every ISA (the vector fma
// instructions; __builtin_fmaf in plain C++), so a kernel written with Blocks gives the same bits
// whatever ISA this file chose.
#if PYLORA_VEC != PYLORA_VEC_PLAIN

constexpr int kBlock = 2 * W;
struct Block {
  V v[2];
};
inline Block zero_block() { return Block{{zero(), zero()}}; }
inline Block load_block(const float* p) { return Block{{load(p), load(p + W)}}; }
inline void store(float* p, const Block& b) {
  store(p, b.v[0]);
  store(p + W, b.v[1]);
}
// c + a * b lane by lane (a broadcast), one rounding: fma is the fused instruction on these ISAs.
inline Block fma_rn(float a, const Block& b, const Block& c) {
  const V av = set1(a);
  return Block{{fma(av, b.v[0], c.v[0]), fma(av, b.v[1], c.v[1])}};
}

#else

constexpr int kBlock = 8;
struct Block {
  float f[kBlock];
};
inline Block zero_block() { return Block{}; }
inline Block load_block(const float* p) {
  Block b;
  for (int i = 0; i < kBlock; ++i) b.f[i] = p[i];
  return b;
}
inline void store(float* p, const Block& b) {
  for (int i = 0; i < kBlock; ++i) p[i] = b.f[i];
}
// c + a * b lane by lane, one rounding (unlike vec::fma above, which multiplies then adds here).
inline Block fma_rn(float a, const Block& b, Block c) {
  for (int i = 0; i < kBlock; ++i) c.f[i] = __builtin_fmaf(a, b.f[i], c.f[i]);
  return c;
}

#endif

// Calls f(j) for each j < n with flags[j] non-zero, in order. flags must be readable up to n rounded up
// to 8. Sparse flags cost a branch per 64 elements: each 8 bytes fold to 8 bits of a 64-bit mask, whose
// set bits are then visited.
template <class F>
inline void for_each_set(const uint8_t* flags, int64_t n, F&& f) {
  for (int64_t j64 = 0; j64 < n; j64 += 64) {
    uint64_t mask = 0;
    for (int k = 0; k < 8 && j64 + 8 * k < n; ++k) {
      uint64_t word;
      std::memcpy(&word, flags + j64 + 8 * k, 8);
      word = (word | (word >> 4)) & 0x0F0F0F0F0F0F0F0Full;  // a non-zero byte -> a non-zero low nibble
      word = (word | (word >> 2)) & 0x0303030303030303ull;
      word = (word | (word >> 1)) & 0x0101010101010101ull;
      uint64_t bits = (word * 0x0102040810204080ull) >> 56;  // byte i's 0/1 to bit i (no carries)
      if (n - (j64 + 8 * k) < 8) bits &= (uint64_t{1} << (n - (j64 + 8 * k))) - 1;  // bytes past n
      mask |= bits << (8 * k);
    }
    while (mask != 0) {
      f(j64 + __builtin_ctzll(mask));
      mask &= mask - 1;
    }
  }
}

// bf16 dot products (AVX512-BF16): load_pairs reads 2 * W bf16 values as they are stored; dot2(acc, x, a)
// adds x[2l] * a[2l] + x[2l + 1] * a[2l + 1] to lane l of acc: products exact in fp32, sums rounded to
// nearest even, bf16 subnormal inputs read as zero. Twice an fp32 fma's work per instruction, with no
// conversions. kBf16Dot says whether this build has it; kernels fall back to load and fma otherwise.
//
// For Blocks: PairBlock holds kBlock columns' pairs (2 * kBlock bf16 bits, column j's pair at 2j and
// 2j + 1), set1_pair broadcasts one pair (two bf16 bits in a 32-bit word: element 2l in the low half),
// and dot2(u, v, c) adds u's pair dotted with each column's pair to c. The instruction adds the odd
// element's product first, then the even one's (Intel SDM, VDPBF16PS), each with one rounding.
#if PYLORA_VEC == PYLORA_VEC_AVX512 && defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
using Pairs = __m512bh;
inline Pairs load_pairs(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline V dot2(V acc, Pairs x, Pairs a) { return _mm512_dpbf16_ps(acc, x, a); }
struct PairBlock {
  Pairs v[2];
};
inline PairBlock load_pair_block(const uint16_t* p) {
  return PairBlock{{(__m512bh)_mm512_loadu_si512(p), (__m512bh)_mm512_loadu_si512(p + 2 * W)}};
}
inline Pairs set1_pair(uint32_t two) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(two)); }
inline Block dot2(Pairs u, const PairBlock& v, const Block& c) {
  return Block{{_mm512_dpbf16_ps(c.v[0], u, v.v[0]), _mm512_dpbf16_ps(c.v[1], u, v.v[1])}};
}
#else
constexpr bool kBf16Dot = false;
struct Pairs {};
struct PairBlock {};
inline Pairs load_pairs(const c10::BFloat16*) { return Pairs{}; }  // never called
inline V dot2(V acc, Pairs, Pairs) { return acc; }                // never called
inline PairBlock load_pair_block(const uint16_t*) { return PairBlock{}; }  // never called
inline Pairs set1_pair(uint32_t) { return Pairs{}; }                      // never called
inline Block dot2(Pairs, const PairBlock&, const Block& c) { return c; }   // never called
#endif

// Requests the cache lines of [p, p + bytes), for reading or for writing, into L1 (locality 3) or L2
// (2): a hint to the memory system, with no effect on any result.
template <bool kWrite, int kLocality>
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, kWrite ? 1 : 0, kLocality);
}

// Stream compaction: writes, in order, the src[j] (j < n) whose keep[j] is non-zero to dst and returns
// how many. src and keep must be readable up to n rounded up to 16, and keep zero past n; dst must
// have room for the result plus 16. AVX-512 compresses 16 lanes per instruction.
inline int64_t compress(const int16_t* src, const uint8_t* keep, int64_t n, int16_t* dst) {
  int64_t m = 0;
#if PYLORA_VEC == PYLORA_VEC_AVX512
  for (int64_t j = 0; j < n; j += 16) {
    const __m512i k32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + j)));
    const __mmask16 k = _mm512_test_epi32_mask(k32, k32);
    const __m512i v = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + m), _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(k, v)));
    m += __builtin_popcount(static_cast<unsigned>(k));
  }
#else
  for_each_set(keep, n, [&](int64_t j) { dst[m++] = src[j]; });
#endif
  return m;
}

// Scalar conversions for the tails (the same roundings as the vector stores).
template <class T>
inline float to_f(T v) {
  return static_cast<float>(v);
}
template <class T>
inline T from_f(float f) {
  return static_cast<T>(f);
}

}  // namespace PYLORA_VEC_NS
}  // namespace vec
}  // namespace pylora

#undef PYLORA_VEC
#undef PYLORA_VEC_NS
#undef PYLORA_VEC_PLAIN
#undef PYLORA_VEC_AVX2
#undef PYLORA_VEC_AVX512
