#include "merge_problem.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <utility>

#include "merge_math.h"
#include "dtypes.h"

namespace pylora {

namespace {

bool is_storage_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

float storage_max(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return mm::F32::kMax;
    case at::kHalf: return mm::F16::kMax;
    default: return mm::BF16::kMax;
  }
}

}  // namespace

int64_t MergeProblem::chunks_per_row() const { return Q == 0 ? 0 : (Q + mm::kChunk - 1) / mm::kChunk; }

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
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight.dim()=", weight.dim(), " must be 2 (", shape_str(weight), ")");
  TORCH_CHECK_VALUE(lora_A.dim() == 2, op, ": lora_A.dim()=", lora_A.dim(), " must be 2 ([r, I])");
  TORCH_CHECK_VALUE(lora_B.dim() == 2, op, ": lora_B.dim()=", lora_B.dim(), " must be 2 ([O, r])");
  TORCH_CHECK_VALUE(is_storage_dtype(weight.scalar_type()), op, ": weight.dtype=", dtype_name(weight.scalar_type()),
                    " is not supported (float32, float16, bfloat16)");
  TORCH_CHECK_VALUE(is_storage_dtype(lora_A.scalar_type()), op, ": lora_A.dtype=", dtype_name(lora_A.scalar_type()),
                    " is not supported (float32, float16, bfloat16)");
  TORCH_CHECK_VALUE(is_storage_dtype(lora_B.scalar_type()), op, ": lora_B.dtype=", dtype_name(lora_B.scalar_type()),
                    " is not supported (float32, float16, bfloat16)");
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
  TORCH_CHECK_VALUE(weight.size(0) == want0 && weight.size(1) == want1, op, ": weight.shape=", shape_str(weight),
                    " must equal ", fan_in_fan_out ? "[I, O]=[" : "[O, I]=[", want0, ", ", want1,
                    "] from lora_A [r, I]=", shape_str(lora_A), " and lora_B [O, r]=", shape_str(lora_B),
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
  mp.P = mp.S.size(0);
  mp.Q = mp.S.size(1);
  mp.r = r;
  mp.s = static_cast<float>(scale);
  return mp;
}

bool bound_allows_merge(const MergeProblem& mp) {
  if (mp.S.numel() == 0) return true;
  const float lim = storage_max(mp.S.scalar_type());
  // aminmax is one fast pass and propagates NaN; max|W| = max(-min, max).
  const auto mm_ = at::aminmax(mp.S);
  const double wmin_ = std::get<0>(mm_).item<double>(), wmax_ = std::get<1>(mm_).item<double>();
  if (!std::isfinite(wmin_) || !std::isfinite(wmax_)) return false;
  const double wmax = std::max(-wmin_, wmax_);
  const double umax = mp.U.abs().sum(1).max().item<double>();
  const double vmax = mp.V.abs().max().item<double>();
  const double dmax = std::fabs(static_cast<double>(mp.s)) * umax * vmax;
  if (!std::isfinite(wmax) || !std::isfinite(dmax)) return false;
  // 1.001 covers the fp32 roundings of the r-step fma chain (r * 2^-24 relative, r <= 16k).
  return (wmax + dmax * 1.001) * 1.001 < static_cast<double>(lim);
}

void fail_nonfinite(const char* op, const MergeProblem& mp, int64_t p, int64_t q, float w, float acc) {
  TORCH_CHECK_VALUE(false, op, ": the merged weight would not be finite at ", mp.where(p, q), " (weight=", w,
                    ", scale*(B@A)=", static_cast<double>(mp.s) * acc, "); nothing was written");
}

namespace {

// Storage row and column of every entry: the chunk comes from counts, the column inside the chunk
// from the entry's high 12 bits.
std::pair<at::Tensor, at::Tensor> entry_position(const MergeProblem& mp, const at::Tensor& counts,
                                                 const at::Tensor& entries) {
  const auto chunk = at::repeat_interleave(at::arange(mp.num_chunks(), counts.options().dtype(at::kLong)),
                                           counts.to(at::kLong));
  const int64_t nb = mp.chunks_per_row();
  const auto column_in_chunk = at::bitwise_and(at::bitwise_right_shift(entries.to(at::kLong), 4), 0xFFF);
  return {at::div(chunk, nb, "floor"), (chunk % nb) * mm::kChunk + column_in_chunk};
}

}  // namespace

void check_record_layout(const char* op, const MergeProblem& mp, const at::Tensor& counts, const at::Tensor& entries,
                         const at::Tensor& esc_index, const at::Tensor& esc_value) {
  const auto dev = mp.S.device();
  auto check_1d = [&](const at::Tensor& t, const char* name, at::ScalarType dt) {
    TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, ".dim()=", t.dim(), " must be 1");
    TORCH_CHECK_VALUE(t.scalar_type() == dt, op, ": ", name, ".dtype=", dtype_name(t.scalar_type()), " must be ",
                      dtype_name(dt));
    TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, ".device=", t.device(), " must equal weight.device=", dev);
  };
  check_1d(counts, "counts", at::kShort);
  check_1d(entries, "entries", at::kShort);
  check_1d(esc_index, "esc_index", at::kLong);
  check_1d(esc_value, "esc_value", mp.S.scalar_type());
  TORCH_CHECK_VALUE(counts.numel() == mp.num_chunks(), op, ": counts.numel()=", counts.numel(),
                    " must equal the weight's record chunks P*ceil(Q/", mm::kChunk, ")=", mp.num_chunks(),
                    " (the record belongs to a weight of another shape or layout)");
  TORCH_CHECK_VALUE(esc_index.numel() == esc_value.numel(), op, ": esc_index.numel()=", esc_index.numel(),
                    " must equal esc_value.numel()=", esc_value.numel());
}

at::Tensor check_record_contents(const char* op, const MergeProblem& mp, const at::Tensor& counts,
                                 const at::Tensor& entries, const at::Tensor& esc_index) {
  if (counts.numel() > 0) {
    const int64_t cmin = counts.min().item<int64_t>();
    const int64_t total = counts.sum(at::kLong).item<int64_t>();
    TORCH_CHECK_VALUE(cmin >= 0, op, ": counts holds ", cmin, ", counts must be >= 0");
    TORCH_CHECK_VALUE(total == entries.numel(), op, ": counts.sum()=", total, " must equal entries.numel()=",
                      entries.numel());
  } else {
    TORCH_CHECK_VALUE(entries.numel() == 0, op, ": entries.numel()=", entries.numel(),
                      " must be 0 for an empty weight");
  }
  at::Tensor index = at::empty({0}, counts.options().dtype(at::kLong));
  if (entries.numel() > 0) {
    const auto pos = entry_position(mp, counts, entries);
    const int64_t cmax = pos.second.max().item<int64_t>();
    TORCH_CHECK_VALUE(cmax < mp.Q, op, ": entries point at column ", cmax, ", columns must be < Q=", mp.Q);
    index = pos.first * mp.Q + pos.second;
  }
  if (esc_index.numel() > 0) {
    const int64_t lo = esc_index.min().item<int64_t>(), hi = esc_index.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < mp.S.numel(), op, ": esc_index holds values in [", lo, ", ", hi,
                      "], they must lie in [0, ", mp.S.numel(), ")");
  }
  return index;
}

void apply_record(const MergeProblem& mp, const at::Tensor& entry_index, const at::Tensor& entries,
                  const at::Tensor& esc_index, const at::Tensor& esc_value) {
  auto flat = mp.S.view({-1});
  if (entries.numel() > 0) {
    const auto& idx = entry_index;
    // The low nibble, sign-extended: ((e & 0xF) ^ 8) - 8.
    const auto delta = ((entries.to(at::kLong) & 0xF) ^ 8) - 8;
    if (mp.S.scalar_type() == at::kFloat) {
      auto bits = flat.view(at::kInt);
      const auto b = bits.index_select(0, idx).to(at::kLong) & 0xFFFFFFFFLL;
      const auto neg = (b & 0x80000000LL) != 0;
      auto key = at::where(neg, -(b & 0x7FFFFFFFLL) - 1, b) + delta;
      auto nb2 = at::where(key < 0, (-(key + 1)) | 0x80000000LL, key);
      bits.index_put_({idx}, nb2.to(at::kInt));
    } else {
      auto bits = flat.view(at::kShort);
      const auto b = bits.index_select(0, idx).to(at::kLong) & 0xFFFF;
      const auto neg = (b & 0x8000) != 0;
      auto key = at::where(neg, -(b & 0x7FFF) - 1, b) + delta;
      auto nb2 = at::where(key < 0, (-(key + 1)) | 0x8000, key);
      bits.index_put_({idx}, nb2.to(at::kShort));
    }
  }
  if (esc_index.numel() > 0) {
    flat.index_put_({esc_index}, esc_value);
  }
}

}  // namespace pylora
