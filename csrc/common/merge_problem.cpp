#include "merge_problem.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <tuple>

namespace pylora {

namespace {

float storage_max(at::ScalarType t) {
  return dispatch_storage("merge_", t, [](auto tag) { return decltype(tag)::type::kMax; });
}

}  // namespace

std::string MergeProblem::where(int64_t p, int64_t q) const {
  std::ostringstream os;
  if (transposed) {
    os << "weight[" << q << ", " << p << "]";
  } else {
    os << "weight[" << p << ", " << q << "]";
  }
  return os.str();
}

MergeProblem prepare_merge(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double scale, bool fan_in_fan_out) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight.dim()=", weight.dim(), " must be 2 (", weight.sizes(), ")");
  TORCH_CHECK_VALUE(lora_A.dim() == 2, op, ": lora_A.dim()=", lora_A.dim(), " must be 2 ([r, I])");
  TORCH_CHECK_VALUE(lora_B.dim() == 2, op, ": lora_B.dim()=", lora_B.dim(), " must be 2 ([O, r])");
  check_dtype(op, "weight", weight.scalar_type(), DtypeSet::kF32F16BF16);
  check_dtype(op, "lora_A", lora_A.scalar_type(), DtypeSet::kF32F16BF16);
  check_dtype(op, "lora_B", lora_B.scalar_type(), DtypeSet::kF32F16BF16);
  TORCH_CHECK_VALUE(lora_A.device() == weight.device(), op, ": lora_A.device=", lora_A.device(),
                    " must equal weight.device=", weight.device());
  TORCH_CHECK_VALUE(lora_B.device() == weight.device(), op, ": lora_B.device=", lora_B.device(),
                    " must equal weight.device=", weight.device());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(r >= 1, op, ": lora_A.size(0)=", r, " (r) must be >= 1");
  TORCH_CHECK_VALUE(lora_B.size(1) == r, op, ": lora_B.size(1)=", lora_B.size(1), " must equal lora_A.size(0)=", r,
                    " (r)");
  const int64_t O = lora_B.size(0), I = lora_A.size(1);
  const int64_t want0 = fan_in_fan_out ? I : O, want1 = fan_in_fan_out ? O : I;
  TORCH_CHECK_VALUE(weight.size(0) == want0 && weight.size(1) == want1, op, ": weight.shape=", weight.sizes(),
                    " must equal ", fan_in_fan_out ? "[I, O]=[" : "[O, I]=[", want0, ", ", want1,
                    "] from lora_A [r, I]=", lora_A.sizes(), " and lora_B [O, r]=", lora_B.sizes(),
                    " (fan_in_fan_out=", fan_in_fan_out ? "True" : "False", ")");
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale=", scale, " must be finite");
  TORCH_CHECK_VALUE(std::fabs(scale) <= std::numeric_limits<float>::max(), op, ": scale=", scale,
                    " must fit in float32");

  MergeProblem mp;
  if (weight.is_contiguous()) {
    mp.S = weight;
  } else if (weight.t().is_contiguous()) {
    mp.S = weight.t();
    mp.transposed = true;
  } else {
    TORCH_CHECK_VALUE(false, op, ": weight.stride()=", weight.strides(),
                      " is not supported (the weight must be contiguous or a transposed contiguous tensor)");
  }
  const bool storage_is_in_out = fan_in_fan_out != mp.transposed;  // S is [I, O]
  if (storage_is_in_out) {
    mp.U = lora_A.t().to(at::kFloat).contiguous();
    mp.V = lora_B.t().to(at::kFloat).contiguous();
  } else {
    mp.U = lora_B.to(at::kFloat).contiguous();
    mp.V = lora_A.to(at::kFloat).contiguous();
  }
  MergeParams<void>& prm = mp.params;
  prm.W = mp.S.data_ptr();
  prm.U = mp.U.const_data_ptr<float>();
  prm.V = mp.V.const_data_ptr<float>();
  prm.P = mp.S.size(0);
  prm.Q = mp.S.size(1);
  prm.r = r;
  prm.nb = mm::chunks_per_row(prm.Q);
  prm.s = static_cast<float>(scale);
  return mp;
}

bool bound_allows_merge(const MergeProblem& mp, double wmax) {
  if (mp.S.numel() == 0) return true;
  const float lim = storage_max(mp.S.scalar_type());
  const double umax = mp.U.abs().sum(1).max().item<double>();
  const double vmax = mp.V.abs().max().item<double>();
  const double dmax = std::fabs(static_cast<double>(mp.params.s)) * umax * vmax;
  if (!std::isfinite(wmax) || !std::isfinite(dmax)) return false;
  // 1.001 covers the fp32 roundings of the r-step fma chain (r * 2^-24 relative, r <= 16k).
  return (wmax + dmax * 1.001) * 1.001 < static_cast<double>(lim);
}

void fail_nonfinite(const char* op, const MergeProblem& mp, int64_t index) {
  const int64_t p = index / mp.params.Q, q = index % mp.params.Q;
  // A few numbers on the error path: copying them to the host costs nothing that matters, and the
  // chain below is the one every kernel runs (fp32, k in order, one rounding per fma).
  const float w = mp.S.select(0, p).select(0, q).to(at::kFloat).item<float>();
  const at::Tensor u = mp.U.select(0, p).to(at::kCPU).contiguous();  // U[p, :]
  const at::Tensor v = mp.V.select(1, q).to(at::kCPU).contiguous();  // V[:, q]
  const float* up = u.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float acc = 0.f;
  for (int64_t k = 0; k < mp.params.r; ++k) acc = mm::fma_rn(up[k], vp[k], acc);
  TORCH_CHECK_VALUE(false, op, ": the merged weight would not be finite at ", mp.where(p, q), " (weight=", w,
                    ", scale*(B@A)=", static_cast<double>(mp.params.s) * acc, "); nothing was written");
}

}  // namespace pylora
