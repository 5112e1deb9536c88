// Argument validation of lora_linear / lora_linear_backward at the op boundary: ValueErrors naming the
// argument, its value and the limit, with the messages pylora/reference.py repeats word for word.
// The result is the call's LoraLinearParams (common/lora_linear_params.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "lora_linear_params.h"

namespace pylora {

// Checks x [T, I], weight [O, I] ([I, O] when fan_in_fan_out), bias [O] or None, lora_A [r, I],
// lora_B [O, r]: dims, one floating dtype, one device, shapes, r >= 1, finite scale, 0 <= p < 1, and seed a
// one-element int64 tensor on the CPU (read here, on the host).
LoraLinearParams check_lora_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, double scale, double dropout_p, const at::Tensor& seed,
                                   bool fan_in_fan_out);

// The backward's extra arguments: grad_y [T, O] and h [T, r], same dtype and device as x.
void check_lora_linear_grads(const char* op, const LoraLinearParams& pb, const at::Tensor& x,
                             const at::Tensor& grad_y, const at::Tensor& h);

}  // namespace pylora
