// lora_linear_cpu / lora_linear_backward_cpu: the ATen GEMMs of common/lora_linear_gemms.cpp plus the
// dropout-masked pieces (which lora_multi_cpu / lora_multi_backward_cpu also run, per adapter), which never
//   shrink           h [T, r]  = drop(x) A^T
//   masked backward  dX [T, I] += (u A) * keep / (1 - p)   and   dA [r, I] = u^T drop(x)
// Work is split into tiles of kRowTile rows x kColTile columns. Per tile the keep bits are hashed
// once (common/dropout_hash.h) into a byte mask; the dropped x tile (fp32, fp64 for float64) and the
// r-wide products live in per-thread buffers that stay in L2, and the products themselves are small
// ATen GEMMs on those buffers (single-threaded inside at::parallel_for, so no oversubscription).
// dX is updated in place, in the same tile pass that computes u A: no second [T, I] temporary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/dropout_hash.h"
#include "../common/dtypes.h"
#include "../common/lora_linear_gemms.h"
#include "../common/lora_linear_params.h"
#include "../common/lora_linear_problem.h"
#include "../common/lora_multi.h"
#include "../common/merge_math.h"
#include "kernels.h"

namespace pylora {
namespace cpu {
// One copy per ISA level (common/isa.h): setup.py compiles this file once per level.
namespace PYLORA_ISA_NS {
namespace {

// 64 x 512 fp32 = 128 KiB per buffer: the dropped x tile and u A tile of one thread fit in L2 beside
// the [r, 512] slice of A they multiply.
constexpr int64_t kRowTile = 64;
constexpr int64_t kColTile = 512;

template <class scalar_t>
struct AccOf {
  using type = float;  // fp32 accumulation for float32, float16 and bfloat16
};
template <>
struct AccOf<double> {
  using type = double;
};

// Exact widening and round-to-nearest-even narrowing, written so the loops vectorise
// (common/merge_math.h: the same conversions the merge kernels use).
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(at::Half v) { return mm::F16::to_f(v.x); }
inline float to_acc(at::BFloat16 v) { return mm::BF16::to_f(v.x); }

inline void store(float& d, float v) { d = v; }
inline void store(double& d, double v) { d = v; }
inline void store(at::Half& d, float v) { d.x = mm::F16::from_f(v); }
inline void store(at::BFloat16& d, float v) { d.x = mm::BF16::from_f(v); }

// m[j] = keep(seed, n0 + j) for j < n: the counter's low word may wrap once inside a row segment.
inline void keep_run(const dropout::Key& k, uint32_t lo, uint32_t hi, int64_t n, uint8_t* __restrict m) {
  const uint32_t hk = hi + k.k1;
  for (int64_t j = 0; j < n; ++j)
    m[j] = dropout::mix32(dropout::mix32((lo + static_cast<uint32_t>(j)) ^ k.k0) ^ hk) >= k.threshold;
}

inline void keep_row(const dropout::Key& k, uint64_t n0, int64_t n, uint8_t* __restrict m) {
  const uint32_t lo = static_cast<uint32_t>(n0), hi = static_cast<uint32_t>(n0 >> 32);
  const int64_t first = static_cast<int64_t>(std::min<uint64_t>(static_cast<uint64_t>(n), (1ull << 32) - lo));
  keep_run(k, lo, hi, first, m);
  if (first < n) keep_run(k, 0u, hi + 1u, n - first, m + first);
}

// out[j] = m[j] ? x[j * sx1] * inv : 0, in the accumulation type.
template <class scalar_t, class acc_t>
inline void drop_row(const scalar_t* __restrict x, int64_t sx1, const uint8_t* __restrict m, int64_t n, acc_t inv,
                     acc_t* __restrict out) {
  if (sx1 == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] = m[j] ? to_acc(x[j]) * inv : acc_t(0);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = m[j] ? to_acc(x[j * sx1]) * inv : acc_t(0);
  }
}

// g[j] = R(g[j] + (m[j] ? tmp[j] * inv : 0)): the masked LoRA part of dX joins dy W in place.
template <class scalar_t, class acc_t>
inline void accumulate_row(scalar_t* __restrict g, const acc_t* __restrict tmp, const uint8_t* __restrict m,
                           int64_t n, acc_t inv) {
  for (int64_t j = 0; j < n; ++j) store(g[j], to_acc(g[j]) + (m[j] ? tmp[j] * inv : acc_t(0)));
}

int64_t num_row_tiles(const LoraLinearParams& pb) { return (pb.T + kRowTile - 1) / kRowTile; }

// Fills the mask bytes of rows [t0, t0 + nt) x columns [i0, i0 + ni), row stride kColTile.
void tile_mask(const LoraLinearParams& pb, const dropout::Key& key, int64_t t0, int64_t nt, int64_t i0, int64_t ni,
               uint8_t* mask) {
  for (int64_t tt = 0; tt < nt; ++tt)
    keep_row(key, static_cast<uint64_t>(t0 + tt) * static_cast<uint64_t>(pb.I) + static_cast<uint64_t>(i0), ni,
             mask + tt * kColTile);
}

template <class scalar_t>
void masked_shrink_impl(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& lora_A, at::Tensor& h) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor A = lora_A.detach().to(acc_opt).contiguous();  // [r, I], small
  const dropout::Key key = pb.key();
  const acc_t inv = static_cast<acc_t>(pb.inv_keep());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  at::parallel_for(0, num_row_tiles(pb), 1, [&](int64_t b, int64_t e) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch TLS is per thread
    at::Tensor buf = at::empty({kRowTile, kColTile}, acc_opt);
    at::Tensor hacc = at::empty({kRowTile, pb.r}, acc_opt);
    std::vector<uint8_t> mask(kRowTile * kColTile);
    acc_t* bp = buf.data_ptr<acc_t>();
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t t0 = tile * kRowTile, nt = std::min(kRowTile, pb.T - t0);
      at::Tensor ht = hacc.narrow(0, 0, nt);
      for (int64_t i0 = 0; i0 < pb.I; i0 += kColTile) {
        const int64_t ni = std::min(kColTile, pb.I - i0);
        tile_mask(pb, key, t0, nt, i0, ni, mask.data());
        for (int64_t tt = 0; tt < nt; ++tt)
          drop_row(xp + (t0 + tt) * sx0 + i0 * sx1, sx1, mask.data() + tt * kColTile, ni, inv, bp + tt * kColTile);
        const at::Tensor dx = buf.narrow(0, 0, nt).narrow(1, 0, ni);
        const at::Tensor a = A.narrow(1, i0, ni).t();  // [ni, r]
        if (i0 == 0) {
          at::mm_out(ht, dx, a);
        } else {
          ht.addmm_(dx, a);
        }
      }
      h.narrow(0, t0, nt).copy_(ht);  // one rounding to x's dtype
    }
  });
}

template <class scalar_t>
void masked_backward_impl(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& u,
                          const at::Tensor& lora_A, at::Tensor& grad_x, at::Tensor& grad_A) {
  using acc_t = typename AccOf<scalar_t>::type;
  const bool need_x = grad_x.defined(), need_A = grad_A.defined();
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor A = lora_A.detach().to(acc_opt).contiguous();  // [r, I]
  const at::Tensor U = u.detach().to(acc_opt).contiguous();       // [T, r]
  const dropout::Key key = pb.key();
  const acc_t inv = static_cast<acc_t>(pb.inv_keep());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  scalar_t* gp = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;  // contiguous [T, I]

  // dA is a sum over T: each worker keeps its own [r, I] partial; they are added in row order, so
  // the result does not depend on which worker finished first.
  std::vector<std::pair<int64_t, at::Tensor>> partials;
  std::mutex partials_mutex;
  at::parallel_for(0, num_row_tiles(pb), 1, [&](int64_t b, int64_t e) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch TLS is per thread
    std::vector<uint8_t> mask(kRowTile * kColTile);
    at::Tensor dxbuf = need_A ? at::empty({kRowTile, kColTile}, acc_opt) : at::Tensor();
    at::Tensor tmpbuf = need_x ? at::empty({kRowTile, kColTile}, acc_opt) : at::Tensor();
    at::Tensor partial = need_A ? at::zeros({pb.r, pb.I}, acc_opt) : at::Tensor();
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t t0 = tile * kRowTile, nt = std::min(kRowTile, pb.T - t0);
      const at::Tensor ut = U.narrow(0, t0, nt);  // [nt, r]
      for (int64_t i0 = 0; i0 < pb.I; i0 += kColTile) {
        const int64_t ni = std::min(kColTile, pb.I - i0);
        tile_mask(pb, key, t0, nt, i0, ni, mask.data());
        if (need_A) {
          acc_t* dp = dxbuf.data_ptr<acc_t>();
          for (int64_t tt = 0; tt < nt; ++tt)
            drop_row(xp + (t0 + tt) * sx0 + i0 * sx1, sx1, mask.data() + tt * kColTile, ni, inv, dp + tt * kColTile);
          partial.narrow(1, i0, ni).addmm_(ut.t(), dxbuf.narrow(0, 0, nt).narrow(1, 0, ni));
        }
        if (need_x) {
          at::Tensor tmp = tmpbuf.narrow(0, 0, nt).narrow(1, 0, ni);
          at::mm_out(tmp, ut, A.narrow(1, i0, ni));  // u A for this tile, [nt, ni]
          const acc_t* tp = tmpbuf.const_data_ptr<acc_t>();
          for (int64_t tt = 0; tt < nt; ++tt)
            accumulate_row(gp + (t0 + tt) * pb.I + i0, tp + tt * kColTile, mask.data() + tt * kColTile, ni, inv);
        }
      }
    }
    if (need_A) {
      const std::lock_guard<std::mutex> lock(partials_mutex);
      partials.emplace_back(b, std::move(partial));
    }
  });
  if (!need_A) return;
  std::sort(partials.begin(), partials.end(), [](const auto& l, const auto& r) { return l.first < r.first; });
  at::Tensor sum = std::move(partials.front().second);
  for (size_t k = 1; k < partials.size(); ++k) sum.add_(partials[k].second);
  grad_A.copy_(sum);
}

void masked_shrink_cpu(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& lora_A, at::Tensor& h) {
  dispatch_dtype<DtypeSet::kF32F16BF16F64>("lora_linear", "x", x.scalar_type(), [&](auto tag) {
    masked_shrink_impl<typename decltype(tag)::type>(pb, x, lora_A, h);
  });
}

void masked_backward_cpu(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& u, const at::Tensor& lora_A,
                         at::Tensor& grad_x, at::Tensor& grad_A) {
  dispatch_dtype<DtypeSet::kF32F16BF16F64>("lora_linear_backward", "x", x.scalar_type(), [&](auto tag) {
    masked_backward_impl<typename decltype(tag)::type>(pb, x, u, lora_A, grad_x, grad_A);
  });
}

}  // namespace

// The entry points (kernels.h), registered by cpu/dispatch.cpp for the level the CPU runs.

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scale, double dropout_p,
                                                   const at::Tensor& seed, bool fan_in_fan_out) {
  const LoraLinearParams pb =
      check_lora_linear("lora_linear", x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out);
  return lora_linear_forward(pb, x, weight, bias, lora_A, lora_B, &masked_shrink_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& h, double scale, double dropout_p, const at::Tensor& seed,
    bool fan_in_fan_out, std::array<bool, 5> output_mask) {
  const char* op = "lora_linear_backward";
  const LoraLinearParams pb =
      check_lora_linear(op, x, weight, std::nullopt, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out);
  check_lora_linear_grads(op, pb, x, grad_y, h);
  return lora_linear_backward(pb, grad_y, x, weight, lora_A, lora_B, h, output_mask, &masked_backward_cpu);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> lora_multi_cpu(const at::Tensor& x, at::TensorList lora_A,
                                                              at::TensorList lora_B, at::ArrayRef<double> scales,
                                                              at::ArrayRef<double> dropout_p, at::IntArrayRef seeds,
                                                              at::IntArrayRef tok_ptr, const at::Tensor& tok_idx) {
  const auto pbs = check_lora_multi("lora_multi", x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx);
  return lora_multi_forward(pbs, x, lora_A, lora_B, tok_ptr, tok_idx, &masked_shrink_cpu);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B, at::TensorList h,
    at::ArrayRef<double> scales, at::ArrayRef<double> dropout_p, at::IntArrayRef seeds, at::IntArrayRef tok_ptr,
    const at::Tensor& tok_idx, std::array<bool, 3> output_mask) {
  const char* op = "lora_multi_backward";
  const auto pbs = check_lora_multi(op, x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx);
  return lora_multi_backward(op, pbs, grad_y, x, lora_A, lora_B, h, tok_ptr, tok_idx, output_mask,
                             &masked_backward_cpu);
}

}  // namespace PYLORA_ISA_NS
}  // namespace cpu
}  // namespace pylora
