// lora_linear / lora_linear_backward composed from ATen GEMMs (the same code serves CPU and CUDA
// tensors) around the dropout-masked pieces, which each device supplies as a function:
//
//   forward:  h = drop(x) A^T [T, r];  y = x W^T + b + s * h B^T [T, O]
//   backward: u = s * dy B [T, r];  dB = s * dy^T h;  dA = u^T drop(x);  dW = dy^T x;  db = sum_t dy
//             dX = dy W + (u A) * keep / (1 - p)
// Every LoRA intermediate is r wide; no O x I delta and no [T, I] mask or dropped x exists.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "lora_linear_params.h"

namespace pylora {

// h [T, r] (contiguous, x's dtype) = drop(x) A^T with p > 0, accumulated in fp32 (fp64 for float64).
using MaskedShrinkFn = void (*)(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& lora_A,
                                at::Tensor& h);
// With p > 0 and u [T, r] contiguous: grad_x (when defined, [T, I] contiguous, holding dy W) +=
// (u A) * keep / (1 - p) in place; grad_A (when defined, [r, I]) = u^T drop(x).
using MaskedBackwardFn = void (*)(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& u,
                                  const at::Tensor& lora_A, at::Tensor& grad_x, at::Tensor& grad_A);

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(const LoraLinearParams& pb, const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       MaskedShrinkFn masked_shrink);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const LoraLinearParams& pb, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h, std::array<bool, 5> output_mask,
    MaskedBackwardFn masked_backward);

}  // namespace pylora
