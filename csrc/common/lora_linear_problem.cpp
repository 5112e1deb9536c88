#include "lora_linear_problem.h"

#include <cmath>

#include "dtypes.h"

namespace pylora {

namespace {

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

LoraLinearParams check_lora_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, double scale, double dropout_p, const at::Tensor& seed,
                                   bool fan_in_fan_out) {
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x.dim()=", x.dim(), " must be 2 ([T, I])");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight.dim()=", weight.dim(), " must be 2 (",
                    fan_in_fan_out ? "[I, O]" : "[O, I]", ")");
  TORCH_CHECK_VALUE(lora_A.dim() == 2, op, ": lora_A.dim()=", lora_A.dim(), " must be 2 ([r, I])");
  TORCH_CHECK_VALUE(lora_B.dim() == 2, op, ": lora_B.dim()=", lora_B.dim(), " must be 2 ([O, r])");
  if (has_bias) TORCH_CHECK_VALUE(bias->dim() == 1, op, ": bias.dim()=", bias->dim(), " must be 1 ([O])");

  check_dtype(op, "x", x.scalar_type(), DtypeSet::kF32F16BF16F64);
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
  TORCH_CHECK_VALUE(weight.size(0) == want0 && weight.size(1) == want1, op, ": weight.shape=", weight.sizes(),
                    " must equal ", fan_in_fan_out ? "[I, O]=[" : "[O, I]=[", want0, ", ", want1,
                    "] from lora_A [r, I]=", lora_A.sizes(), " and lora_B [O, r]=", lora_B.sizes(),
                    " (fan_in_fan_out=", fan_in_fan_out ? "True" : "False", ")");
  if (has_bias)
    TORCH_CHECK_VALUE(bias->size(0) == O, op, ": bias.shape=", bias->sizes(), " must equal [O]=[", O, "]");
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale=", scale, " must be finite");
  // Written so that NaN fails too.
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p=", dropout_p,
                    " must satisfy 0 <= dropout_p < 1");
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
                    ": seed must be a one-element int64 tensor on the CPU, got ", dtype_name(seed.scalar_type()),
                    " of shape ", seed.sizes(), " on ", seed.device());

  LoraLinearParams pb;
  pb.T = x.size(0);
  pb.I = I;
  pb.O = O;
  pb.r = r;
  pb.scale = scale;
  pb.dropout_p = dropout_p;
  pb.seed = seed.reshape({}).item<int64_t>();
  pb.fan_in_fan_out = fan_in_fan_out;
  return pb;
}

void check_lora_linear_grads(const char* op, const LoraLinearParams& pb, const at::Tensor& x,
                             const at::Tensor& grad_y, const at::Tensor& h) {
  TORCH_CHECK_VALUE(grad_y.dim() == 2, op, ": grad_y.dim()=", grad_y.dim(), " must be 2 ([T, O])");
  TORCH_CHECK_VALUE(h.dim() == 2, op, ": h.dim()=", h.dim(), " must be 2 ([T, r])");
  check_like_x(op, "grad_y", grad_y, x);
  check_like_x(op, "h", h, x);
  check_device_like_x(op, "grad_y", grad_y, x);
  check_device_like_x(op, "h", h, x);
  TORCH_CHECK_VALUE(grad_y.size(0) == pb.T && grad_y.size(1) == pb.O, op, ": grad_y.shape=", grad_y.sizes(),
                    " must equal [T, O]=[", pb.T, ", ", pb.O, "]");
  TORCH_CHECK_VALUE(h.size(0) == pb.T && h.size(1) == pb.r, op, ": h.shape=", h.sizes(), " must equal [T, r]=[",
                    pb.T, ", ", pb.r, "]");
}

}  // namespace pylora
