// The CPU kernel of every op, as each ISA level's compile of csrc/cpu/*.cpp defines it: in namespace
// pylora::cpu::<level> (avx512, avx2, plain; common/isa.h). cpu/dispatch.cpp registers one level's set.
// Schemas and semantics: csrc/ops.cpp.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/isa.h"

#define PYLORA_CPU_KERNELS(ns)                                                                                     \
  namespace ns {                                                                                                   \
  /* merge.cpp */                                                                                                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_cpu(at::Tensor& weight, const at::Tensor& lora_A, \
                                                                       const at::Tensor& lora_B, double scale,     \
                                                                       bool fan_in_fan_out, bool record);          \
  void unmerge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,            \
                   bool fan_in_fan_out, const at::Tensor& counts, const at::Tensor& entries,                        \
                   const at::Tensor& esc_index, const at::Tensor& esc_value);                                       \
  /* lora_linear.cpp */                                                                                            \
  std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,                 \
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, \
                                                     const at::Tensor& lora_B, double scale, double dropout_p,     \
                                                     const at::Tensor& seed, bool fan_in_fan_out);                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(                 \
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,           \
      const at::Tensor& lora_B, const at::Tensor& h, double scale, double dropout_p, const at::Tensor& seed,       \
      bool fan_in_fan_out, std::array<bool, 5> output_mask);                                                       \
  std::tuple<at::Tensor, std::vector<at::Tensor>> lora_multi_cpu(                                                  \
      const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scales,              \
      at::ArrayRef<double> dropout_p, at::IntArrayRef seeds, at::IntArrayRef tok_ptr, const at::Tensor& tok_idx);  \
  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward_cpu(               \
      const at::Tensor& grad_y, const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,                 \
      at::TensorList h, at::ArrayRef<double> scales, at::ArrayRef<double> dropout_p, at::IntArrayRef seeds,        \
      at::IntArrayRef tok_ptr, const at::Tensor& tok_idx, std::array<bool, 3> output_mask);                        \
  /* lora_apply.cpp */                                                                                             \
  void lora_apply_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& A_rows, const at::Tensor& B_rows,       \
                      const at::Tensor& row_ptr, const at::Tensor& row_idx, const at::Tensor& scales,               \
                      const at::Tensor& seg_ptr, const at::Tensor& seg_slot);                                       \
  }

namespace pylora {
namespace cpu {
PYLORA_CPU_KERNELS(avx512)
PYLORA_CPU_KERNELS(avx2)
PYLORA_CPU_KERNELS(plain)
}  // namespace cpu
}  // namespace pylora

#undef PYLORA_CPU_KERNELS
