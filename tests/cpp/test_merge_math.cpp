// Unit tests of csrc/common/merge_math.h against slow references written from the IEEE definitions.
#include "common/merge_math.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "check.h"

using namespace pylora::mm;

namespace {

// Round a float to a format with `mant` stored mantissa bits, exponent bias `bias`, max finite `maxf`,
// to nearest even, through double arithmetic (exact for these widths): the reference rounding.
double round_ref(float f, int mant, int min_exp, double maxf) {
  const double x = f;
  if (x == 0) return x;
  const double a = std::fabs(x);
  int e = std::ilogb(a);
  if (e < min_exp) e = min_exp;  // subnormal range: fixed spacing
  const double ulp = std::ldexp(1.0, e - mant);
  const double q = a / ulp;
  double r = std::floor(q);
  const double frac = q - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) == 1.0)) r += 1;
  double y = r * ulp;
  // Overflow: values rounding above max finite become infinity.
  if (y > maxf) y = std::numeric_limits<double>::infinity();
  return std::copysign(y, x);
}

template <class S>
void check_roundtrip_all_bits(const char* name) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<typename S::bits_t>(b);
    if (!S::finite(bits)) continue;
    const float f = S::to_f(bits);
    CHECK(S::from_f(f) == bits, "%s: bits 0x%04x -> %g -> 0x%04x", name, b, f, S::from_f(f));
    CHECK(S::unkey(S::key(bits)) == bits, "%s: unkey(key(0x%04x))", name, b);
  }
}

template <class S>
void check_key_monotone(const char* name) {
  // Every finite value, ordered by key, is strictly increasing in value except -0 < +0 (equal values).
  float prev = -std::numeric_limits<float>::infinity();
  for (int32_t k = S::key(static_cast<typename S::bits_t>(0xFBFFu & 0xFFFF)); k <= 0x7C00; ++k) {
    const auto bits = S::unkey(k);
    if (!S::finite(bits)) continue;
    const float f = S::to_f(bits);
    CHECK(f > prev || (f == 0 && prev == 0), "%s: key %d value %g after %g", name, k, f, prev);
    prev = f;
  }
}

}  // namespace

int main() {
  check_roundtrip_all_bits<BF16>("bf16");
  check_roundtrip_all_bits<F16>("f16");
  check_key_monotone<F16>("f16");

  std::mt19937 rng(0);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 2000000; ++i) {
    const float f = F32::to_f(any_bits(rng));
    if (!std::isfinite(f)) continue;
    const double bf = round_ref(f, 7, -126, 3.3895313892515355e38);
    CHECK(static_cast<double>(BF16::to_f(BF16::from_f(f))) == bf, "bf16 round(%a) gave %a, want %a", f,
          BF16::to_f(BF16::from_f(f)), bf);
    const double hf = round_ref(f, 10, -14, 65504.0);
    const float got = F16::to_f(F16::from_f(f));
    CHECK(static_cast<double>(got) == hf, "f16 round(%a) gave %a, want %a", f, got, hf);
  }
  // fp32 keys order adjacent values and -0 just below +0.
  CHECK(F32::key(0x80000000u) == -1 && F32::key(0u) == 0, "fp32 zero keys");
  CHECK(F32::key(F32::from_f(1.0f)) + 1 == F32::key(F32::from_f(std::nextafter(1.0f, 2.0f))), "fp32 key step");
  CHECK(F32::unkey(F32::key(F32::from_f(-3.5f))) == F32::from_f(-3.5f), "fp32 unkey");

  // A row of Q elements holds ceil(Q / kChunk) record chunks.
  CHECK(chunks_per_row(0) == 0 && chunks_per_row(1) == 1 && chunks_per_row(kChunk) == 1 &&
            chunks_per_row(kChunk + 1) == 2 && chunks_per_row(3 * kChunk) == 3,
        "chunks_per_row");

  // pack_entry: column in the high 12 bits, signed delta in the low nibble.
  for (int col = 0; col < kChunk; col += 97) {
    for (int d = kMinDelta; d <= kMaxDelta; ++d) {
      const uint16_t e = static_cast<uint16_t>(pack_entry(col, d));
      CHECK(((e >> 4) & 0xFFF) == col && static_cast<int>((e & 0xF) ^ 8) - 8 == d, "pack_entry(%d, %d)", col, d);
    }
  }

  // merged/unmerged: the candidate of an element that lost no information is the element itself,
  // and fma_rn is one rounding (a*b+c exact in double for these small values).
  CHECK(fma_rn(3.0f, 1.0f / 3.0f, -1.0f) == static_cast<float>(3.0 * static_cast<double>(1.0f / 3.0f) - 1.0),
        "fma_rn is a single rounding");
  bool ok = false;
  const auto y = merged<BF16>(BF16::from_f(1.0f), 0.5f, 0.25f, ok);
  CHECK(ok && BF16::to_f(y) == 1.125f && unmerged<BF16>(y, 0.5f, 0.25f) == BF16::from_f(1.0f), "bf16 merge 1 + 0.125");
  merged<F16>(F16::from_f(65000.0f), 1.0f, 1000.0f, ok);
  CHECK(!ok, "f16 overflow is reported as not finite");
  return CHECK_REPORT();
}
