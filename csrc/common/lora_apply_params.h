// What the lora_apply_ kernels of both devices see of one call, filled once by prepare_lora_apply
// (common/lora_apply_problem.cpp) from the validated arguments. Torch-free: plain pointers and int64
// sizes (tests/cpp builds it with CMake alone).
#pragma once
#include <cstdint>
#include <type_traits>

namespace pylora {

// scalar_t: the element type of y, x, A_rows and B_rows; void before the dtype is dispatched.
// Every 2-D operand has unit stride along its last dimension; row k of it starts at base + k * ld.
template <class scalar_t>
struct LoraApplyParams {
  scalar_t* y;              // [T, O], row stride ldy
  const scalar_t* x;        // [T, I], row stride ldx
  const scalar_t* A;        // A_rows [P, I], row stride lda
  const scalar_t* B;        // B_rows [P, O], row stride ldb
  const int32_t* row_ptr;   // [N+1]: slot s owns rows row_idx[row_ptr[s]:row_ptr[s+1]]
  const int32_t* row_idx;   // [nnz]
  const int32_t* seg_ptr;   // [S+1]: segment g holds tokens [seg_ptr[g], seg_ptr[g+1])
  const int32_t* seg_slot;  // [S]: the slot of segment g, or -1 (no adapter)
  const float* scales;      // [N]
  int64_t T, I, O, P, N, S, nnz;
  int64_t ldy, ldx, lda, ldb;

  // The same call with the elements typed: params.as<T>() once the dtype is known.
  template <class U>
  LoraApplyParams<U> as() const {
    static_assert(std::is_void_v<scalar_t>, "as<U>() types the untyped params");
    return LoraApplyParams<U>{static_cast<U*>(y), static_cast<const U*>(x), static_cast<const U*>(A),
                              static_cast<const U*>(B), row_ptr, row_idx, seg_ptr, seg_slot, scales,
                              T, I, O, P, N, S, nnz, ldy, ldx, lda, ldb};
  }
};

}  // namespace pylora
