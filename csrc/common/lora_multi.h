// lora_multi / lora_multi_backward: many adapters in one batch, each with its own factor tensors (the
// training form of serving many adapters: every row trains its own adapter). Adapter k owns the
// tokens tok_idx[tok_ptr[k]:tok_ptr[k+1]] (in that order, each token at most once) and is a lora_linear
// without the base layer over them, so each group runs the lora_linear pieces (common/lora_linear_gemms.h):
// ATen GEMMs on the group's gathered tokens and, with dropout, the device's masked kernels, whose
// mask is hashed from (seeds[k], the token's index within the group, the feature): adapter k sees the
// same mask stream as lora_linear over its own tokens alone.
//
//   forward:  h_k = drop_k(x_k) A_k^T [n_k, r_k];  y[tok] = s_k h_k B_k^T, zero for tokens of no adapter
//   backward: u_k = s_k dy_k B_k;  dB_k = s_k dy_k^T h_k;  dA_k = u_k^T drop_k(x_k);
//             dx[tok] = (u_k A_k) * keep / (1 - p_k), zero for tokens of no adapter
// Shapes: x [T, I], lora_A[k] [r_k, I], lora_B[k] [O, r_k], h[k] [n_k, r_k]; N adapters >= 1.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

#include "lora_linear_gemms.h"

namespace pylora {

// Validates every argument (ValueError naming the argument, its value and the limit, with the messages
// pylora/ops/reference.py repeats) and returns one LoraLinearParams per adapter (T = its token count).
// tok_idx contents are checked when it lives on the CPU; on a GPU that would synchronise.
std::vector<LoraLinearParams> check_lora_multi(const char* op, const at::Tensor& x, at::TensorList lora_A,
                                               at::TensorList lora_B, at::ArrayRef<double> scales,
                                               at::ArrayRef<double> dropout_p, at::IntArrayRef seeds,
                                               at::IntArrayRef tok_ptr, const at::Tensor& tok_idx);

std::tuple<at::Tensor, std::vector<at::Tensor>> lora_multi_forward(const std::vector<LoraLinearParams>& pbs,
                                                                   const at::Tensor& x, at::TensorList lora_A,
                                                                   at::TensorList lora_B, at::IntArrayRef tok_ptr,
                                                                   const at::Tensor& tok_idx,
                                                                   MaskedShrinkFn masked_shrink);

// The backward's extra arguments checked (grad_y [T, O], h[k] [n_k, r_k]); then the gradients an
// output_mask entry asks for (grad_x, grad_A list, grad_B list; the others empty).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward(
    const char* op, const std::vector<LoraLinearParams>& pbs, const at::Tensor& grad_y, const at::Tensor& x,
    at::TensorList lora_A, at::TensorList lora_B, at::TensorList h, at::IntArrayRef tok_ptr, const at::Tensor& tok_idx,
    std::array<bool, 3> output_mask, MaskedBackwardFn masked_backward);

}  // namespace pylora
