#include "merge_record.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "dtypes.h"
#include "merge_math.h"

namespace pylora {

namespace {

// Storage row and column of every entry: the chunk comes from counts, the column inside the chunk
// from the entry's high 12 bits.
std::pair<at::Tensor, at::Tensor> entry_position(const MergeProblem& mp, const at::Tensor& counts,
                                                 const at::Tensor& entries) {
  const auto chunk = at::repeat_interleave(at::arange(mp.num_chunks(), counts.options().dtype(at::kLong)),
                                           counts.to(at::kLong));
  const int64_t nb = mp.params.nb;
  const auto column_in_chunk = at::bitwise_and(at::bitwise_right_shift(entries.to(at::kLong), 4), 0xFFF);
  return {at::div(chunk, nb, "floor"), (chunk % nb) * mm::kChunk + column_in_chunk};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_record(const MergeProblem& mp) {
  const auto opt = mp.S.options();
  return {at::empty({0}, opt.dtype(at::kShort)), at::empty({0}, opt.dtype(at::kShort)),
          at::empty({0}, opt.dtype(at::kLong)), at::empty({0}, opt)};
}

void check_record_layout(const char* op, const MergeProblem& mp, const at::Tensor& counts, const at::Tensor& entries,
                         const at::Tensor& esc_index, const at::Tensor& esc_value) {
  const auto dev = mp.S.device();
  auto check_1d = [&](const at::Tensor& t, const char* name, at::ScalarType dt) {
    TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, ".dim()=", t.dim(), " must be 1");
    TORCH_CHECK_VALUE(t.scalar_type() == dt, op, ": ", name, ".dtype=", dtype_name(t.scalar_type()), " must be ",
                      dtype_name(dt));
    TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, ".device=", t.device(), " must equal weight.device=", dev);
    // The kernels read the record through its data pointer.
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got a view with stride ", t.stride(0),
                      " (pass ", name, ".contiguous())");
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
    const int64_t Q = mp.params.Q, cmax = pos.second.max().item<int64_t>();
    TORCH_CHECK_VALUE(cmax < Q, op, ": entries point at column ", cmax, ", columns must be < Q=", Q);
    index = pos.first * Q + pos.second;
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

std::vector<int64_t> check_record_entries(const char* op, const MergeProblem& mp, const at::Tensor& counts,
                                          const at::Tensor& entries, const at::Tensor& esc_index) {
  const int16_t* cnt = counts.const_data_ptr<int16_t>();
  const int16_t* ent = entries.const_data_ptr<int16_t>();
  const int64_t chunks = counts.numel(), nb = mp.params.nb, Q = mp.params.Q;
  std::vector<int64_t> start(chunks + 1, 0);
  int64_t cmin = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    cmin = std::min<int64_t>(cmin, cnt[c]);
    start[c + 1] = start[c] + cnt[c];
  }
  TORCH_CHECK_VALUE(cmin >= 0, op, ": counts holds ", cmin, ", counts must be >= 0");
  TORCH_CHECK_VALUE(start[chunks] == entries.numel(), op, ": counts.sum()=", start[chunks],
                    " must equal entries.numel()=", entries.numel());
  int64_t cmax = -1;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t e = start[c]; e < start[c + 1]; ++e)
      cmax = std::max<int64_t>(cmax, (c % nb) * mm::kChunk + ((static_cast<uint16_t>(ent[e]) >> 4) & 0xFFF));
  TORCH_CHECK_VALUE(cmax < Q, op, ": entries point at column ", cmax, ", columns must be < Q=", Q);
  if (esc_index.numel() > 0) {
    const int64_t* ei = esc_index.const_data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(ei, ei + esc_index.numel());
    TORCH_CHECK_VALUE(*lo >= 0 && *hi < mp.S.numel(), op, ": esc_index holds values in [", *lo, ", ", *hi,
                      "], they must lie in [0, ", mp.S.numel(), ")");
  }
  return start;
}

}  // namespace pylora
