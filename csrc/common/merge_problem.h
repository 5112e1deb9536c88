// The device-agnostic part of merge_ / unmerge_ (ATen ops only, so the same code serves CPU and CUDA
// tensors): argument validation, the storage view the kernels work on and the MergeParams they get,
// the conservative finiteness bound, and the error for a result that would not be finite.
// The correction record's checks and its application are in merge_record.h.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "dtypes.h"
#include "merge_math.h"
#include "merge_params.h"

namespace pylora {

// The element arithmetic (merge_math.h) of each storage element type; per ISA level, as merge_math.h's
// types are (common/isa.h).
inline namespace PYLORA_ISA_NS {

template <class T>
struct StorageOf;
template <>
struct StorageOf<float> {
  using type = mm::F32;
};
template <>
struct StorageOf<c10::Half> {
  using type = mm::F16;
};
template <>
struct StorageOf<c10::BFloat16> {
  using type = mm::BF16;
};

// Returns f(TypeTag<S>{}) with S = mm::F32, mm::F16 or mm::BF16 for the weight's dtype t (through
// dtypes.h's one table; any other dtype is a ValueError naming the weight).
template <class F>
decltype(auto) dispatch_storage(const char* op, c10::ScalarType t, F&& f) {
  return dispatch_dtype<DtypeSet::kF32F16BF16>(op, "weight", t, [&](auto tag) -> decltype(auto) {
    return f(TypeTag<typename StorageOf<typename decltype(tag)::type>::type>{});
  });
}

}  // namespace PYLORA_ISA_NS

// The kernels see every merge as  S[P, Q] += s * U[P, r] @ V[r, Q]  on a contiguous storage view S.
// weight [O, I] contiguous:            S = weight,     U = B,     V = A
// weight [I, O] (fan_in_fan_out):       S = weight,     U = A^T,   V = B^T
// a transposed-contiguous weight flips which of the two it is and S = weight.t().
struct MergeProblem {
  at::Tensor S;  // [P, Q], contiguous, aliases weight
  at::Tensor U;  // [P, r] fp32 contiguous
  at::Tensor V;  // [r, Q] fp32 contiguous
  bool transposed = false;
  MergeParams<void> params{};  // pointers into S, U and V, the sizes and s: what the kernels see
  int64_t num_chunks() const { return params.P * params.nb; }
  // "weight[o, i]" in the weight's own indices for storage element (p, q).
  std::string where(int64_t p, int64_t q) const;
};

// Validates (raising ValueError naming the argument, its value and the limit) and builds the view.
MergeProblem prepare_merge(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double scale, bool fan_in_fan_out);

// True when no merged element can overflow or be NaN: W finite, U and V finite, and
// max|W| + |s| max_p sum_k |U[p,k]| max|V| well below the storage dtype's largest finite value.
// False means "check every element", not "fails". wmax_abs: max|W|, as the kernel found it in a pass of
// its own (inf or NaN when W holds a non-finite element).
bool bound_allows_merge(const MergeProblem& mp, double wmax_abs);

// Raises ValueError: the merged weight would not be finite at storage element `index` (= p * Q + q,
// the first such element in storage order). The message's numbers are read back here, on the host,
// for any device: the weight element and s * acc, acc the fp32 fma chain of merge_math.h (the value
// every kernel and pylora/reference.py compute), so each backend reports the same numbers.
[[noreturn]] void fail_nonfinite(const char* op, const MergeProblem& mp, int64_t index);

}  // namespace pylora
