// What the merge_ / unmerge_ kernels of both devices see of one call, filled once by prepare_merge
// (common/merge_problem.cpp) from the validated arguments: every merge is
//   S[P, Q] (+|-)= s * U[P, r] @ V[r, Q]
// on a contiguous storage view S of the weight (merge_problem.h says which factor is U and which V).
// Torch-free: plain pointers and int64 sizes (tests/cpp builds it with CMake alone).
#pragma once
#include <cstdint>
#include <type_traits>

namespace pylora {

// bits_t: the storage type's bits (mm::F32/F16/BF16::bits_t); void before the dtype is dispatched.
template <class bits_t>
struct MergeParams {
  bits_t* W;        // S [P, Q] contiguous: the weight's elements, as raw bits
  const float* U;   // [P, r] fp32 contiguous
  const float* V;   // [r, Q] fp32 contiguous
  int64_t P, Q, r;
  int64_t nb;       // record chunks per storage row: mm::chunks_per_row(Q)
  float s;          // the scale, as the fp32 every fma uses

  // The same call with W typed: params.as<typename S::bits_t>() once the dtype is known.
  template <class B>
  MergeParams<B> as() const {
    static_assert(std::is_void_v<bits_t>, "as<B>() types the untyped params");
    return MergeParams<B>{static_cast<B*>(W), U, V, P, Q, r, nb, s};
  }
};

}  // namespace pylora
