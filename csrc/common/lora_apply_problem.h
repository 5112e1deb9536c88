// The device-agnostic part of lora_apply_: argument validation at the op boundary and the views the
// kernels work on, as tensors (kept alive here) and as the LoraApplyParams the kernels get (ATen only,
// so the same code serves CPU and CUDA tensors).
#pragma once
#include <ATen/ATen.h>

#include "lora_apply_params.h"

namespace pylora {

// Validated arguments. Every 2-D operand has unit stride along its last dimension (a contiguous copy
// when the caller's had not); index tensors are contiguous.
struct LoraApplyProblem {
  at::Tensor y;      // [T, O]: the caller's y, or a contiguous copy written back by finish_lora_apply
  at::Tensor y_out;  // the caller's y
  at::Tensor x, A, B;                              // [T, I], [P, I], [P, O]
  at::Tensor row_ptr, row_idx, seg_ptr, seg_slot;  // int32 [N+1], [nnz], [S+1], [S]
  at::Tensor scales;                               // float32 [N]
  LoraApplyParams<void> params{};                  // pointers into the tensors above and the sizes
};

// Validates dims, dtypes, devices and shapes (raising ValueError that names the argument, its value
// and the limit, in the letters T, I, O, r, N, S, P) and, when the index tensors live on the CPU,
// their contents. Index tensors on a GPU are not read: that would synchronise with the device.
LoraApplyProblem prepare_lora_apply(const char* op, at::Tensor& y, const at::Tensor& x, const at::Tensor& A_rows,
                                    const at::Tensor& B_rows, const at::Tensor& row_ptr, const at::Tensor& row_idx,
                                    const at::Tensor& scales, const at::Tensor& seg_ptr,
                                    const at::Tensor& seg_slot);

// Copies the result into the caller's y when the kernels worked on a copy (y without unit last stride).
void finish_lora_apply(LoraApplyProblem& a);

}  // namespace pylora
