// Device-agnostic parts of lora_linear / lora_linear_backward: argument validation (raising ValueError
// naming the argument, its value and the limit, with the messages pylora/reference.py repeats word for
// word) and the ATen GEMMs around the dropout-masked pieces, which each device supplies.
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

#include "dropout_hash.h"

namespace pylora {

struct LinearProblem {
  int64_t T = 0, I = 0, O = 0, r = 0;
  double scale = 0.0, dropout_p = 0.0;
  int64_t seed = 0;
  bool fan_in_fan_out = false;
  dropout::Key key() const { return dropout::make_key(seed, dropout_p); }
  // 1 / (1 - p), the factor of every kept element.
  double inv_keep() const { return 1.0 / (1.0 - dropout_p); }
};

// Checks x [T, I], weight [O, I] ([I, O] when fan_in_fan_out), bias [O] or None, lora_A [r, I],
// lora_B [O, r]: dims, one floating dtype, one device, shapes, r >= 1, finite scale, 0 <= p < 1.
LinearProblem check_lora_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scale, double dropout_p, int64_t seed,
                                bool fan_in_fan_out);

// The backward's extra arguments: grad_y [T, O] and h [T, r], same dtype and device as x.
void check_lora_linear_grads(const char* op, const LinearProblem& pb, const at::Tensor& x, const at::Tensor& grad_y,
                             const at::Tensor& h);

// h [T, r] (contiguous, x's dtype) = drop(x) A^T with p > 0, accumulated in fp32 (fp64 for float64).
using MaskedShrinkFn = void (*)(const LinearProblem& pb, const at::Tensor& x, const at::Tensor& lora_A,
                                at::Tensor& h);
// With p > 0 and u [T, r] contiguous: grad_x (when defined, [T, I] contiguous, holding dy W) +=
// (u A) * keep / (1 - p) in place; grad_A (when defined, [r, I]) = u^T drop(x).
using MaskedBackwardFn = void (*)(const LinearProblem& pb, const at::Tensor& x, const at::Tensor& u,
                                  const at::Tensor& lora_A, at::Tensor& grad_x, at::Tensor& grad_A);

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(const LinearProblem& pb, const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       MaskedShrinkFn masked_shrink);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const LinearProblem& pb, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h, std::array<bool, 5> output_mask,
    MaskedBackwardFn masked_backward);

}  // namespace pylora
