// merge_cpu / unmerge_cpu: S[P, Q] (+|-)= s * U[P, r] @ V[r, Q] with the element arithmetic of
// common/merge_math.h. Parallel over storage rows; per row, column tiles of kTile accumulate the
// r-step fma chain in a small fp32 buffer (no [P, Q] fp32 temporary), then one vectorisable pass
// rounds, writes and flags the rare elements whose unmerge candidate differs from the original.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/merge_math.h"
#include "../common/merge_params.h"
#include "../common/merge_problem.h"
#include "../common/merge_record.h"
#include "kernels.h"
#include "vec.h"

namespace pylora {
namespace cpu {
// One copy per ISA level (common/isa.h): setup.py compiles this file once per level.
namespace PYLORA_ISA_NS {
namespace {

// Register blocking of the fma chain: kRB rows x kCB columns of accumulators (one vec::Block per row)
// stay in registers for the whole k loop (12 zmm with AVX-512, 12 ymm with AVX2), each V load
// feeding kRB fmas. Block's fma is the same single-rounding fma as the scalar one, so every path
// gives the same bits.
constexpr int kCB = vec::kBlock;
constexpr int kRB = 6;
constexpr int64_t kTile = 384;  // columns per tile; a multiple of kCB
static_assert(kTile % kCB == 0, "kTile must be a multiple of kCB");
static_assert(kTile <= mm::kChunk, "a tile must span at most two record chunks");

// The fma chain of one element: U's row u, V's column v (stride apart), r steps.
inline float chain(const float* u, const float* v, int64_t r, int64_t stride) {
  float a = 0.f;
  for (int64_t k = 0; k < r; ++k) a = mm::fma_rn(u[k], v[k * stride], a);
  return a;
}

// V [r, Q] repacked so that each block of kCB columns is one contiguous [r, kCB] stream (a row-major V
// would make the k loop jump Q floats per step and starve the loads); columns past the last full
// block stay in V.
//
// The dot path: with AVX512-BF16 and bf16-valued factors (bf16 adapters), the chain takes two k steps
// per instruction (vec::dot2). Each step adds an exact product (bf16 x bf16 fits fp32) with one
// rounding, as fma does, and in k order when a pair is stored as (k + 1, k), since the instruction adds
// the odd element's product first. It differs from fma in two ways, both ruled out before the path is
// taken (dot_keeps_bits): subnormal inputs and results are flushed to zero, so no factor may be
// subnormal and every product must be a multiple of 2^-126 (then every partial sum is 0 or normal);
// and a product is rounded before it is added, so none may overflow. The CPU's instruction is checked
// once as well (dot_instruction_ok). The path's data: pairs [Q / kCB, ceil(r / 2), 2 kCB], column j's
// steps (k, k + 1) at 2j + 1 and 2j as bf16 bits (a zero past r), and upairs [P, ceil(r / 2)], U's
// rows as broadcast words: U[p, k] in the high half, U[p, k + 1] in the low one.
struct PackedV {
  at::Tensor blocks;  // [Q / kCB, r, kCB]
  at::Tensor pairs;   // dot path: int16 bits
  at::Tensor upairs;  // dot path: int32 words
  const float* V;     // [r, Q]
  int64_t Q, r, full, rp;
  bool dot;
};

PackedV pack_blocks(const MergeProblem& mp) {
  const int64_t Q = mp.params.Q, r = mp.params.r, nfull = Q / kCB;
  at::Tensor blocks = mp.V.narrow(1, 0, nfull * kCB).view({r, nfull, kCB}).permute({1, 0, 2}).contiguous();
  return PackedV{blocks, {}, {}, mp.params.V, Q, r, nfull * kCB, (r + 1) / 2, false};
}

// Adds the dot path's data; U and pv's blocks must hold bf16 values.
void pack_pairs(PackedV& pv, const at::Tensor& U) {
  const int64_t nfull = pv.full / kCB, r = pv.r, rp = pv.rp;
  // bf16 bits of the (exactly bf16) fp32 values: their high halves (an arithmetic shift, then int16).
  const at::Tensor vb = at::constant_pad_nd(pv.blocks, {0, 0, 0, 2 * rp - r}).view(at::kInt).__rshift__(16);
  // [nfull, rp, 2 (k, k + 1), kCB] -> [nfull, rp, kCB, 2 (k + 1, k)]
  pv.pairs = vb.view({nfull, rp, 2, kCB}).flip(2).permute({0, 1, 3, 2}).to(at::kShort).contiguous();
  // U[p, k]'s bits already fill the high half over a zero low half; U[p, k + 1]'s go to the low half.
  const at::Tensor ub = at::constant_pad_nd(U, {0, 2 * rp - r}).view(at::kInt).view({-1, rp, 2});
  pv.upairs = ub.select(2, 0).bitwise_or(ub.select(2, 1).__rshift__(16).bitwise_and(0xFFFF)).contiguous();
  pv.dot = true;
}

inline const uint32_t* upairs_of(const PackedV& pv) {
  return reinterpret_cast<const uint32_t*>(pv.upairs.const_data_ptr<int32_t>());
}
inline const uint16_t* pairs_of(const PackedV& pv) {
  return reinterpret_cast<const uint16_t*>(pv.pairs.const_data_ptr<int16_t>());
}

// acc[i][j] = fma chain over k of U[p0 + i, k] * V[k, q0 + j], for i < RB and j in [j0, j0 + kCB).
// v points at the packed block: v[k * kCB + j] = V[k, q], one contiguous stream over k.
template <int RB>
inline void accumulate_block(const float* __restrict U, int64_t r, const float* __restrict v,
                             float (*__restrict acc)[kTile], int64_t j0) {
  vec::Block a[RB];
  for (int i = 0; i < RB; ++i) a[i] = vec::zero_block();
  for (int64_t k = 0; k < r; ++k, v += kCB) {
    const vec::Block vk = vec::load_block(v);
    for (int i = 0; i < RB; ++i) a[i] = vec::fma_rn(U[i * r + k], vk, a[i]);
  }
  for (int i = 0; i < RB; ++i) vec::store(acc[i] + j0, a[i]);
}

// The same on the dot path: u holds row p0's broadcast words (rows rp apart), v the block's pairs.
template <int RB>
inline void accumulate_block_dot(const uint32_t* __restrict u, int64_t rp, const uint16_t* __restrict v,
                                 float (*__restrict acc)[kTile], int64_t j0) {
  vec::Block a[RB];
  for (int i = 0; i < RB; ++i) a[i] = vec::zero_block();
  for (int64_t kp = 0; kp < rp; ++kp, v += 2 * kCB) {
    const vec::PairBlock vk = vec::load_pair_block(v);
    for (int i = 0; i < RB; ++i) a[i] = vec::dot2(vec::set1_pair(u[i * rp + kp]), vk, a[i]);
  }
  for (int i = 0; i < RB; ++i) vec::store(acc[i] + j0, a[i]);
}

// Checks, once per process, that the CPU's bf16 dot product adds a pair's two products in the order
// documented, with one rounding each: one column's products are 1, 0, 2^24, 1, which sum to 2^24 in k
// order (1 + 2^24 ties to even) but to 2^24 + 2 in another order or with one rounding per pair; the
// other columns hold mixed values, with an even and an odd r. Any difference keeps the fma path.
bool dot_instruction_ok() {
  static const bool ok = [] {
    if (!vec::kBf16Dot) return false;
    uint32_t state = 12345;
    auto bf16 = [&](int e) {  // a bf16 value, sign and mantissa at random, exponent e to e + 4
      state = state * 1664525u + 1013904223u;
      const uint32_t b = (static_cast<uint32_t>(127 + e + static_cast<int>((state >> 24) % 5)) << 23) |
                         (((state >> 8) & 0x7Fu) << 16) | ((state & 1u) << 31);
      return mm::u2f(b);
    };
    for (const int64_t r : {4, 5}) {
      const int64_t Q = kCB;
      std::vector<float> U(r), V(r * Q);
      for (int64_t k = 0; k < r; ++k) U[k] = k < 4 ? 1.f : bf16(0);
      for (int64_t k = 0; k < r; ++k)
        for (int64_t q = 0; q < Q; ++q) V[k * Q + q] = bf16(static_cast<int>(k % 3) * 9 - 9);
      const float col0[5] = {1.f, 0.f, 16777216.f, 1.f, 0.f};
      for (int64_t k = 0; k < r; ++k) V[k * Q] = col0[k];
      MergeProblem mp;
      mp.U = at::from_blob(U.data(), {1, r}, at::kFloat);
      mp.V = at::from_blob(V.data(), {r, Q}, at::kFloat);
      mp.params.P = 1, mp.params.Q = Q, mp.params.r = r, mp.params.V = V.data();
      PackedV pv = pack_blocks(mp);
      pack_pairs(pv, mp.U);
      alignas(64) float got[1][kTile];
      accumulate_block_dot<1>(upairs_of(pv), pv.rp, pairs_of(pv), got, 0);
      for (int64_t q = 0; q < Q; ++q)
        if (mm::f2u(got[0][q]) != mm::f2u(chain(U.data(), V.data() + q, r, Q))) return false;
      if (got[0][0] != 16777216.f) return false;
    }
    return true;
  }();
  return ok;
}

// True when the dot path gives the fma chain's bits for these factors (see PackedV).
bool dot_keeps_bits(const at::Tensor& U, const at::Tensor& V) {
  if (!vec::kBf16Dot) return false;
  // The biased exponents of the smallest and largest non-zero magnitudes of one factor.
  auto range = [](const at::Tensor& t, int& lo, int& hi) {
    const float* x = t.const_data_ptr<float>();
    lo = 255, hi = 0;
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      const uint32_t b = mm::f2u(x[i]), e = (b >> 23) & 0xFFu;
      if (b & 0xFFFFu) return false;         // not a bf16 value
      if ((b & 0x7FFFFFFFu) == 0) continue;  // zero: adds a zero exactly either way
      if (e == 0 || e == 255) return false;  // subnormal, inf or NaN
      lo = std::min<int>(lo, static_cast<int>(e));
      hi = std::max<int>(hi, static_cast<int>(e));
    }
    return true;
  };
  int ulo, uhi, vlo, vhi;
  if (!range(U, ulo, uhi) || !range(V, vlo, vhi)) return false;
  // A factor of zeros only: every product is zero. Otherwise u = m 2^(eu - 134) with an integer m, so
  // u v is a multiple of 2^(eu + ev - 268), at least 2^-126 when eu + ev >= 142; and |u v| <
  // 2^(eu + ev - 252) stays below 2^126 when eu + ev <= 378.
  const bool fits = uhi == 0 || vhi == 0 || (ulo + vlo >= 142 && uhi + vhi <= 378);
  return fits && dot_instruction_ok();
}

PackedV pack_v(const MergeProblem& mp) {
  PackedV pv = pack_blocks(mp);
  if (pv.full > 0 && pv.r > 0 && dot_keeps_bits(mp.U, mp.V)) pack_pairs(pv, mp.U);
  return pv;
}

// acc[i][j] = fma chain over k of U[p0 + i, k] * V[k, q0 + j] (the definition in merge_math.h), i < RB, j < n.
template <int RB>
inline void accumulate(const float* __restrict U, int64_t p0, const PackedV& pv, int64_t q0, int64_t n,
                       float (*__restrict acc)[kTile]) {
  const int64_t r = pv.r;
  const float* Up = U + p0 * r;
  int64_t j0 = 0;
  if (pv.dot) {
    const uint32_t* up = upairs_of(pv) + p0 * pv.rp;
    for (; j0 + kCB <= n && q0 + j0 + kCB <= pv.full; j0 += kCB)
      accumulate_block_dot<RB>(up, pv.rp, pairs_of(pv) + ((q0 + j0) / kCB) * pv.rp * 2 * kCB, acc, j0);
  } else {
    const float* blocks = pv.blocks.const_data_ptr<float>();
    for (; j0 + kCB <= n && q0 + j0 + kCB <= pv.full; j0 += kCB)
      accumulate_block<RB>(Up, r, blocks + ((q0 + j0) / kCB) * r * kCB, acc, j0);
  }
  for (int i = 0; i < RB; ++i)
    for (int64_t j = j0; j < n; ++j) acc[i][j] = chain(Up + i * r, pv.V + q0 + j, r, pv.Q);
}

struct NoBlockEnd {
  void operator()(int64_t, int64_t) const {}
};

// Prefetches rows [0, nr) of n elements from w (rows Q elements apart), for writing.
template <class bits_t>
inline void prefetch_rows(const bits_t* w, int64_t nr, int64_t Q, int64_t n) {
  for (int64_t i = 0; i < nr; ++i) vec::prefetch<true, 3>(w + i * Q, n * static_cast<int64_t>(sizeof(bits_t)));
}

// Calls body(p, q0, n, acc_row) for every storage row p in [b, e) and column tile, with acc_row[j]
// the fp32 LoRA product of (p, q0 + j); full blocks of kRB rows share their V loads, so the tiles
// of a block's rows interleave; block_end(p0, nr) runs after the block of rows [p0, p0 + nr).
template <class bits_t, class Body, class BlockEnd = NoBlockEnd>
void for_each_tile(const MergeParams<bits_t>& prm, const PackedV& pv, int64_t b, int64_t e, Body&& body,
                   BlockEnd&& block_end = BlockEnd()) {
  const float* U = prm.U;
  const int64_t Q = prm.Q;
  alignas(64) float acc[kRB][kTile];
  for (int64_t p0 = b; p0 < e; p0 += kRB) {
    const int64_t nr = std::min<int64_t>(kRB, e - p0);
    for (int64_t q0 = 0; q0 < Q; q0 += kTile) {
      const int64_t n = std::min(kTile, Q - q0);
      // The next tile's weights are fetched while this tile's products are computed: the products
      // touch no weight, so the memory would otherwise idle through them and the body wait on it.
      if (q0 + kTile < Q)
        prefetch_rows(prm.W + p0 * Q + q0 + kTile, nr, Q, std::min(kTile, Q - q0 - kTile));
      else if (p0 + kRB < e)
        prefetch_rows(prm.W + (p0 + kRB) * Q, std::min<int64_t>(kRB, e - p0 - kRB), Q, std::min(kTile, Q));
      if (nr == kRB) {
        accumulate<kRB>(U, p0, pv, q0, n, acc);
      } else {
        for (int64_t i = 0; i < nr; ++i) accumulate<1>(U, p0 + i, pv, q0, n, acc + i);
      }
      for (int64_t i = 0; i < nr; ++i) body(p0 + i, q0, n, acc[i]);
    }
    block_end(p0, nr);
  }
}

int64_t row_grain(int64_t Q) {
  // Enough rows per task to amortise a task (~64k elements), in whole register blocks.
  const int64_t rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(Q, 1));
  return (rows + kRB - 1) / kRB * kRB;
}

// One worker's share of the record, for rows [row_begin, row_end).
template <class S>
struct Entries {
  std::vector<int16_t> entries;
  std::vector<int64_t> esc_index;
  std::vector<typename S::bits_t> esc_bits;
  void append(Entries& o) {
    entries.insert(entries.end(), o.entries.begin(), o.entries.end());
    esc_index.insert(esc_index.end(), o.esc_index.begin(), o.esc_index.end());
    esc_bits.insert(esc_bits.end(), o.esc_bits.begin(), o.esc_bits.end());
    o.entries.clear();
    o.esc_index.clear();
    o.esc_bits.clear();
  }
};

// One worker's share of the record, for rows [row_begin, row_end), in row-major order.
template <class S>
struct Part : Entries<S> {
  int64_t row_begin = 0;
  std::vector<int16_t> counts;  // per chunk of these rows (<= kChunk entries each)
};

// max|w| over the weight (inf when an element is inf or NaN), in one pass at the memory's speed: IEEE
// magnitudes order as their bit patterns do once the sign is cleared, so an integer max (vectorised by
// the compiler) finds it. at::aminmax, the generic way, converts every element to float and keeps two
// results: 1.5-1.7x as long here on a 4096x11008 weight.
template <class S>
double max_abs(const MergeParams<typename S::bits_t>& prm) {
  using bits_t = typename S::bits_t;
  using mag_t = std::make_signed_t<bits_t>;  // magnitudes fit: the sign bit is cleared
  constexpr mag_t kMag = static_cast<mag_t>(static_cast<bits_t>(~bits_t{0}) >> 1);
  const bits_t* W = prm.W;
  const mag_t m = at::parallel_reduce(
      0, prm.P * prm.Q, int64_t{1} << 16, mag_t{0},
      [&](int64_t b, int64_t e, mag_t acc) {
        for (int64_t i = b; i < e; ++i) acc = std::max(acc, static_cast<mag_t>(W[i] & kMag));
        return acc;
      },
      [](mag_t a, mag_t b) { return std::max(a, b); });
  const bits_t bits = static_cast<bits_t>(m);
  return S::finite(bits) ? static_cast<double>(S::to_f(bits)) : std::numeric_limits<double>::infinity();
}

// Returns the flat index of the first element whose merged value would not be finite, or -1.
template <class S>
int64_t first_nonfinite(const MergeParams<typename S::bits_t>& prm, const PackedV& pv) {
  using bits_t = typename S::bits_t;
  const bits_t* W = prm.W;
  const int64_t Q = prm.Q;
  const float s = prm.s;
  std::vector<int64_t> first_of_row(prm.P, -1);
  at::parallel_for(0, prm.P, row_grain(Q), [&](int64_t b, int64_t e) {
    for_each_tile(prm, pv, b, e, [&](int64_t p, int64_t q0, int64_t n, const float* acc) {
      if (first_of_row[p] >= 0) return;
      const bits_t* w = W + p * Q + q0;
      for (int64_t j = 0; j < n; ++j) {
        bool ok;
        mm::merged<S>(w[j], s, acc[j], ok);
        if (!ok) {
          first_of_row[p] = p * Q + q0 + j;
          return;
        }
      }
    });
  });
  for (int64_t p = 0; p < prm.P; ++p)
    if (first_of_row[p] >= 0) return first_of_row[p];
  return -1;
}

// The merge without a record: one pass writing y = R(fma(s, acc, w)), nothing else per element.
template <class S>
void merge_plain(const MergeParams<typename S::bits_t>& prm, const PackedV& pv) {
  using bits_t = typename S::bits_t;
  bits_t* W = prm.W;
  const int64_t Q = prm.Q;
  const float s = prm.s;
  at::parallel_for(0, prm.P, row_grain(Q), [&](int64_t b, int64_t e) {
    for_each_tile(prm, pv, b, e, [&](int64_t p, int64_t q0, int64_t n, const float* acc) {
      bits_t* w = W + p * Q + q0;
      for (int64_t j = 0; j < n; ++j) {
        bool ok;
        w[j] = mm::merged<S>(w[j], s, acc[j], ok);
      }
    });
  });
}

template <class S>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_impl(const MergeProblem& mp, bool record) {
  using bits_t = typename S::bits_t;
  using key_t = typename S::key_t;
  const MergeParams<bits_t> prm = mp.params.as<bits_t>();
  bits_t* W = prm.W;
  const int64_t Q = prm.Q, nb = prm.nb;
  const float s = prm.s;
  const PackedV pv = pack_v(mp);
  if (!bound_allows_merge(mp, max_abs<S>(prm))) {
    const int64_t bad = first_nonfinite<S>(prm, pv);
    if (bad >= 0) fail_nonfinite("merge_", mp, bad);
  }
  if (!record) {
    merge_plain<S>(prm, pv);
    return empty_record(mp);
  }

  std::vector<Part<S>> parts;
  std::mutex parts_mutex;
  at::parallel_for(0, prm.P, row_grain(Q), [&](int64_t b, int64_t e) {
    Part<S> part;
    part.row_begin = b;
    part.counts.assign((e - b) * nb, 0);
    alignas(64) bits_t ybuf[kTile];
    alignas(64) bits_t cbuf[kTile];
    alignas(64) uint8_t differs[kTile + 64];
    alignas(64) int16_t columns[kTile + 16];  // the columns j that differ, in order
    alignas(64) int16_t iota[kTile + 16];
    for (int j = 0; j < kTile + 16; ++j) iota[j] = static_cast<int16_t>(j);
    Entries<S> row_entries[kRB];  // a block's rows interleave by tile: stage per row, flush in row order
    for_each_tile(prm, pv, b, e, [&](int64_t p, int64_t q0, int64_t n, const float* acc) {
      bits_t* w = W + p * Q + q0;
      uint8_t any = 0;
      for (int64_t j = 0; j < n; ++j) {  // one vectorised pass: merged value, candidate, flag
        bool ok;
        const bits_t y = mm::merged<S>(w[j], s, acc[j], ok);
        const bits_t c = mm::unmerged<S>(y, s, acc[j]);
        ybuf[j] = y;
        cbuf[j] = c;
        differs[j] = static_cast<uint8_t>(c != w[j]);
        any |= differs[j];
      }
      if (any) {
        // The few elements whose candidate differs (0.5-10% at usual update sizes) are compacted, then
        // each gets its entry, or an escape when it lies too far. Entries are written in order; a tile
        // (kTile <= kChunk columns) spans at most two chunks.
        std::memset(differs + n, 0, 64);
        const int64_t m = vec::compress(iota, differs, n, columns);
        Entries<S>& out = row_entries[(p - b) % kRB];
        const size_t e0 = out.entries.size();
        out.entries.resize(e0 + m);
        int16_t* ent = out.entries.data() + e0;
        const int64_t c0 = q0 % mm::kChunk, split = mm::kChunk - c0;  // split: the next chunk's first column
        int64_t k = 0, second = 0;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t j = columns[i];
          const key_t d = S::key(w[j]) - S::key(cbuf[j]);
          if (d >= mm::kMinDelta && d <= mm::kMaxDelta) {
            ent[k++] = mm::pack_entry(static_cast<int32_t>((c0 + j) % mm::kChunk), static_cast<int32_t>(d));
            second += j >= split;
          } else {
            out.esc_index.push_back(p * Q + q0 + j);
            out.esc_bits.push_back(w[j]);
          }
        }
        out.entries.resize(e0 + k);
        int16_t* counts = part.counts.data() + (p - b) * nb + q0 / mm::kChunk;
        counts[0] = static_cast<int16_t>(counts[0] + (k - second));
        if (second) counts[1] = static_cast<int16_t>(counts[1] + second);
      }
      std::copy(ybuf, ybuf + n, w);
    }, [&](int64_t, int64_t nr) {
      for (int64_t i = 0; i < nr; ++i) part.append(row_entries[i]);
    });
    std::lock_guard<std::mutex> lock(parts_mutex);
    parts.push_back(std::move(part));
  });
  std::sort(parts.begin(), parts.end(), [](const Part<S>& a, const Part<S>& b) { return a.row_begin < b.row_begin; });

  int64_t M = 0, E = 0;
  for (const auto& pt : parts) {
    M += static_cast<int64_t>(pt.entries.size());
    E += static_cast<int64_t>(pt.esc_index.size());
  }
  const auto opt = mp.S.options();
  auto counts = at::empty({mp.num_chunks()}, opt.dtype(at::kShort));
  auto entries = at::empty({M}, opt.dtype(at::kShort));
  auto esc_index = at::empty({E}, opt.dtype(at::kLong));
  auto esc_value = at::empty({E}, opt);
  int16_t* cp = counts.data_ptr<int16_t>();
  int16_t* ep = entries.data_ptr<int16_t>();
  int64_t* ip = esc_index.data_ptr<int64_t>();
  auto* vp = reinterpret_cast<bits_t*>(esc_value.data_ptr());
  for (const auto& pt : parts) {
    cp = std::copy(pt.counts.begin(), pt.counts.end(), cp);
    ep = std::copy(pt.entries.begin(), pt.entries.end(), ep);
    ip = std::copy(pt.esc_index.begin(), pt.esc_index.end(), ip);
    vp = std::copy(pt.esc_bits.begin(), pt.esc_bits.end(), vp);
  }
  return {counts, entries, esc_index, esc_value};
}

// The unmerge pass writes the candidates c, and, once a block of rows is done (still in cache),
// applies that block's entries: w = unkey(key(c) + delta). Escapes are written last.
template <class S>
void unmerge_impl(const MergeProblem& mp, const std::vector<int64_t>& start, const at::Tensor& entries,
                  const at::Tensor& esc_index, const at::Tensor& esc_value) {
  using bits_t = typename S::bits_t;
  const MergeParams<bits_t> prm = mp.params.as<bits_t>();
  bits_t* W = prm.W;
  const int16_t* ent = entries.const_data_ptr<int16_t>();
  const int64_t Q = prm.Q, nb = prm.nb;
  const float s = prm.s;
  const PackedV pv = pack_v(mp);
  at::parallel_for(0, prm.P, row_grain(Q), [&](int64_t b, int64_t e) {
    for_each_tile(prm, pv, b, e, [&](int64_t p, int64_t q0, int64_t n, const float* acc) {
      bits_t* w = W + p * Q + q0;
      for (int64_t j = 0; j < n; ++j) w[j] = mm::unmerged<S>(w[j], s, acc[j]);
    }, [&](int64_t p0, int64_t nr) {
      for (int64_t c = p0 * nb; c < (p0 + nr) * nb; ++c) {
        bits_t* w = W + (c / nb) * Q + (c % nb) * mm::kChunk;
        for (int64_t k = start[c]; k < start[c + 1]; ++k) {
          const uint16_t entry = static_cast<uint16_t>(ent[k]);
          const int32_t delta = static_cast<int32_t>((entry & 0xF) ^ 8) - 8;  // the signed low nibble
          bits_t& x = w[(entry >> 4) & 0xFFF];
          x = S::unkey(S::key(x) + delta);
        }
      }
    });
  });
  const int64_t* ei = esc_index.const_data_ptr<int64_t>();
  const auto* ev = reinterpret_cast<const bits_t*>(esc_value.const_data_ptr());
  for (int64_t k = 0; k < esc_index.numel(); ++k) W[ei[k]] = ev[k];
}

}  // namespace

// The entry points (kernels.h), registered by cpu/dispatch.cpp for the level the CPU runs.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_cpu(at::Tensor& weight,
                                                                                const at::Tensor& lora_A,
                                                                                const at::Tensor& lora_B, double scale,
                                                                                bool fan_in_fan_out, bool record) {
  const MergeProblem mp = prepare_merge("merge_", weight, lora_A, lora_B, scale, fan_in_fan_out);
  return dispatch_storage("merge_", mp.S.scalar_type(),
                          [&](auto tag) { return merge_impl<typename decltype(tag)::type>(mp, record); });
}

void unmerge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                 bool fan_in_fan_out, const at::Tensor& counts, const at::Tensor& entries, const at::Tensor& esc_index,
                 const at::Tensor& esc_value) {
  const MergeProblem mp = prepare_merge("unmerge_", weight, lora_A, lora_B, scale, fan_in_fan_out);
  check_record_layout("unmerge_", mp, counts, entries, esc_index, esc_value);
  const std::vector<int64_t> start = check_record_entries("unmerge_", mp, counts, entries, esc_index);
  dispatch_storage("unmerge_", mp.S.scalar_type(), [&](auto tag) {
    unmerge_impl<typename decltype(tag)::type>(mp, start, entries, esc_index, esc_value);
  });
}

}  // namespace PYLORA_ISA_NS
}  // namespace cpu
}  // namespace pylora
