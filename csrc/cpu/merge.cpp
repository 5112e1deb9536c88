// merge_cpu / unmerge_cpu: S[P, Q] (+|-)= s * U[P, r] @ V[r, Q] with the element arithmetic of
// common/merge_math.h. Parallel over storage rows; per row, column tiles of kTile accumulate the
// r-step fma chain in a small fp32 buffer (no [P, Q] fp32 temporary), then one vectorisable pass
// rounds, writes and flags the rare elements whose unmerge candidate differs from the original.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <tuple>
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

// V [r, Q] repacked so that each block of kCB columns is one contiguous [r, kCB] stream (a row-major V
// would make the k loop jump Q floats per step and starve the loads); columns past the last full
// block stay in V.
struct PackedV {
  at::Tensor blocks;  // [Q / kCB, r, kCB]
  const float* V;     // [r, Q]
  int64_t Q, r, full;
};

PackedV pack_v(const MergeProblem& mp) {
  const int64_t Q = mp.params.Q, r = mp.params.r, nfull = Q / kCB;
  at::Tensor blocks = mp.V.narrow(1, 0, nfull * kCB).view({r, nfull, kCB}).permute({1, 0, 2}).contiguous();
  return PackedV{blocks, mp.params.V, Q, r, nfull * kCB};
}

// acc[i][j] = fma chain over k of U[p0 + i, k] * V[k, q0 + j] (the definition in merge_math.h), i < RB, j < n.
template <int RB>
inline void accumulate(const float* __restrict U, const PackedV& pv, int64_t q0, int64_t n,
                       float (*__restrict acc)[kTile]) {
  const int64_t r = pv.r;
  const float* blocks = pv.blocks.const_data_ptr<float>();
  int64_t j0 = 0;
  for (; j0 + kCB <= n && q0 + j0 + kCB <= pv.full; j0 += kCB)
    accumulate_block<RB>(U, r, blocks + ((q0 + j0) / kCB) * r * kCB, acc, j0);
  for (int i = 0; i < RB; ++i) {
    for (int64_t j = j0; j < n; ++j) {
      float a = 0.f;
      for (int64_t k = 0; k < r; ++k) a = mm::fma_rn(U[i * r + k], pv.V[k * pv.Q + q0 + j], a);
      acc[i][j] = a;
    }
  }
}

struct NoBlockEnd {
  void operator()(int64_t, int64_t) const {}
};

// Calls body(p, q0, n, acc_row) for every storage row p in [b, e) and column tile, with acc_row[j]
// the fp32 LoRA product of (p, q0 + j); full blocks of kRB rows share their V loads, so the tiles
// of a block's rows interleave; block_end(p0, nr) runs after the block of rows [p0, p0 + nr).
template <class bits_t, class Body, class BlockEnd = NoBlockEnd>
void for_each_tile(const MergeParams<bits_t>& prm, const PackedV& pv, int64_t b, int64_t e, Body&& body,
                   BlockEnd&& block_end = BlockEnd()) {
  const float* U = prm.U;
  const int64_t Q = prm.Q, r = prm.r;
  alignas(64) float acc[kRB][kTile];
  for (int64_t p0 = b; p0 < e; p0 += kRB) {
    const int64_t nr = std::min<int64_t>(kRB, e - p0);
    for (int64_t q0 = 0; q0 < Q; q0 += kTile) {
      const int64_t n = std::min(kTile, Q - q0);
      if (nr == kRB) {
        accumulate<kRB>(U + p0 * r, pv, q0, n, acc);
      } else {
        for (int64_t i = 0; i < nr; ++i) accumulate<1>(U + (p0 + i) * r, pv, q0, n, acc + i);
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
  if (!bound_allows_merge(mp)) {
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
