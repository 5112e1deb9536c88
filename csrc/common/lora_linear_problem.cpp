#include "lora_linear_problem.h"

#include <ATen/core/LegacyTypeDispatch.h>

#include <cmath>
#include <sstream>
#include <string>

#include "dtypes.h"

namespace pylora {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// The same dtype and device as x, or a ValueError naming both.
void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": ", name, ".dtype=", dtype_name(t.scalar_type()),
                    " must equal x.dtype=", dtype_name(x.scalar_type()));
}

void check_device_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, ".device=", t.device(), " must equal x.device=",
                    x.device());
}

}  // namespace

LinearProblem check_lora_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scale, double dropout_p, int64_t seed,
                                bool fan_in_fan_out) {
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x.dim()=", x.dim(), " must be 2 ([T, I])");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight.dim()=", weight.dim(), " must be 2 (",
                    fan_in_fan_out ? "[I, O]" : "[O, I]", ")");
  TORCH_CHECK_VALUE(lora_A.dim() == 2, op, ": lora_A.dim()=", lora_A.dim(), " must be 2 ([r, I])");
  TORCH_CHECK_VALUE(lora_B.dim() == 2, op, ": lora_B.dim()=", lora_B.dim(), " must be 2 ([O, r])");
  if (has_bias) TORCH_CHECK_VALUE(bias->dim() == 1, op, ": bias.dim()=", bias->dim(), " must be 1 ([O])");

  TORCH_CHECK_VALUE(is_supported_dtype(x.scalar_type()), op, ": x.dtype=", dtype_name(x.scalar_type()),
                    " is not supported (float32, float16, bfloat16, float64)");
  check_like_x(op, "weight", weight, x);
  if (has_bias) check_like_x(op, "bias", *bias, x);
  check_like_x(op, "lora_A", lora_A, x);
  check_like_x(op, "lora_B", lora_B, x);
  check_device_like_x(op, "weight", weight, x);
  if (has_bias) check_device_like_x(op, "bias", *bias, x);
  check_device_like_x(op, "lora_A", lora_A, x);
  check_device_like_x(op, "lora_B", lora_B, x);

  const int64_t r = lora_A.size(0), I = lora_A.size(1), O = lora_B.size(0);
  TORCH_CHECK_VALUE(r >= 1, op, ": lora_A.size(0)=", r, " (r) must be >= 1");
  TORCH_CHECK_VALUE(lora_B.size(1) == r, op, ": lora_B.size(1)=", lora_B.size(1), " must equal lora_A.size(0)=", r,
                    " (r)");
  TORCH_CHECK_VALUE(x.size(1) == I, op, ": x.size(1)=", x.size(1), " must equal lora_A.size(1)=", I, " (I)");
  const int64_t want0 = fan_in_fan_out ? I : O, want1 = fan_in_fan_out ? O : I;
  TORCH_CHECK_VALUE(weight.size(0) == want0 && weight.size(1) == want1, op, ": weight.shape=", shape_str(weight),
                    " must equal ", fan_in_fan_out ? "[I, O]=[" : "[O, I]=[", want0, ", ", want1,
                    "] from lora_A [r, I]=", shape_str(lora_A), " and lora_B [O, r]=", shape_str(lora_B),
                    " (fan_in_fan_out=", fan_in_fan_out ? "True" : "False", ")");
  if (has_bias)
    TORCH_CHECK_VALUE(bias->size(0) == O, op, ": bias.shape=", shape_str(*bias), " must equal [O]=[", O, "]");
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale=", scale, " must be finite");
  // Written so that NaN fails too.
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p=", dropout_p,
                    " must satisfy 0 <= dropout_p < 1");

  LinearProblem pb;
  pb.T = x.size(0);
  pb.I = I;
  pb.O = O;
  pb.r = r;
  pb.scale = scale;
  pb.dropout_p = dropout_p;
  pb.seed = seed;
  pb.fan_in_fan_out = fan_in_fan_out;
  return pb;
}

void check_lora_linear_grads(const char* op, const LinearProblem& pb, const at::Tensor& x, const at::Tensor& grad_y,
                             const at::Tensor& h) {
  TORCH_CHECK_VALUE(grad_y.dim() == 2, op, ": grad_y.dim()=", grad_y.dim(), " must be 2 ([T, O])");
  TORCH_CHECK_VALUE(h.dim() == 2, op, ": h.dim()=", h.dim(), " must be 2 ([T, r])");
  check_like_x(op, "grad_y", grad_y, x);
  check_like_x(op, "h", h, x);
  check_device_like_x(op, "grad_y", grad_y, x);
  check_device_like_x(op, "h", h, x);
  TORCH_CHECK_VALUE(grad_y.size(0) == pb.T && grad_y.size(1) == pb.O, op, ": grad_y.shape=", shape_str(grad_y),
                    " must equal [T, O]=[", pb.T, ", ", pb.O, "]");
  TORCH_CHECK_VALUE(h.size(0) == pb.T && h.size(1) == pb.r, op, ": h.shape=", shape_str(h), " must equal [T, r]=[",
                    pb.T, ", ", pb.r, "]");
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(const LinearProblem& pb, const at::Tensor& x,
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
    const LinearProblem& pb, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
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
