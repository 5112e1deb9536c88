#include "lora_linear_gemms.h"

#include <ATen/core/LegacyTypeDispatch.h>

namespace pylora {

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(const LoraLinearParams& pb, const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       MaskedShrinkFn masked_shrink) {
  // The op is registered at a backend key below its own autograd: the ATen calls inside must not
  // be recorded (or refused, for the out= GEMMs) by autograd again.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor h;
  if (pb.dropout_p > 0.0) {
    h = at::empty({pb.T, pb.r}, x.options());
    if (pb.I == 0) {
      h.zero_();
    } else if (pb.T > 0) {
      masked_shrink(pb, x, lora_A, h);
    }
  } else {
    h = at::mm(x, lora_A.t());
  }
  // x W^T (+ b): the GEMM reads W in its own layout (a transposed view costs nothing).
  const at::Tensor w_io = pb.fan_in_fan_out ? weight : weight.t();  // [I, O]
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, w_io) : at::mm(x, w_io);
  // s rides in the GEMM's alpha: the r-wide update is the only extra pass over y.
  y.addmm_(h, lora_B.t(), 1.0, pb.scale);
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const LoraLinearParams& pb, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h, std::array<bool, 5> output_mask,
    MaskedBackwardFn masked_backward) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2], need_A = output_mask[3],
             need_B = output_mask[4];
  const auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = none(), grad_w = none(), grad_b = none(), grad_A = none(), grad_B = none();

  if (need_B) grad_B = at::mm(grad_y.t(), h).mul_(pb.scale);  // [O, r]
  if (need_b) grad_b = grad_y.sum(0);
  if (need_w) grad_w = pb.fan_in_fan_out ? at::mm(x.t(), grad_y) : at::mm(grad_y.t(), x);
  if (!need_x && !need_A) return {grad_x, grad_w, grad_b, grad_A, grad_B};

  // u = s * dy B, the r-wide carrier of both LoRA input gradients; s is applied to it, never to a
  // [T, I] or [T, O] tensor.
  const at::Tensor u = at::mm(grad_y, lora_B).mul_(pb.scale);  // [T, r]
  if (need_x) grad_x = at::mm(grad_y, pb.fan_in_fan_out ? weight.t() : weight);  // [T, I]: dy W
  if (pb.dropout_p == 0.0) {
    if (need_x) grad_x.addmm_(u, lora_A);  // one buffer: dX = dy W, then the r-wide GEMM adds u A in place
    if (need_A) grad_A = at::mm(u.t(), x);
    return {grad_x, grad_w, grad_b, grad_A, grad_B};
  }
  if (need_x && !grad_x.is_contiguous()) grad_x = grad_x.contiguous();
  if (need_A) grad_A = at::empty({pb.r, pb.I}, x.options());
  if (pb.T == 0 || pb.I == 0) {
    if (need_A) grad_A.zero_();
    return {grad_x, grad_w, grad_b, grad_A, grad_B};
  }
  at::Tensor gx = need_x ? grad_x : at::Tensor(), gA = need_A ? grad_A : at::Tensor();
  masked_backward(pb, x, u.contiguous(), lora_A, gx, gA);
  return {grad_x, grad_w, grad_b, grad_A, grad_B};
}

}  // namespace pylora
