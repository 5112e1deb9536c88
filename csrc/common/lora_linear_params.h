// What the lora_linear / lora_linear_backward kernels of both devices see of one call, filled once by
// check_lora_linear (common/lora_linear_problem.cpp) from the validated arguments. The tensors
// themselves go to ATen GEMMs (common/lora_linear_gemms.cpp) and to the dropout-masked pieces each
// device supplies. Torch-free (tests/cpp builds it with CMake alone).
#pragma once
#include <cstdint>

#include "dropout_hash.h"

namespace pylora {

struct LoraLinearParams {
  int64_t T = 0, I = 0, O = 0, r = 0;  // x [T, I], weight [O, I] ([I, O] when fan_in_fan_out), lora_A [r, I]
  double scale = 0.0, dropout_p = 0.0;
  int64_t seed = 0;
  bool fan_in_fan_out = false;
  // The dropout mask's key for this call (host only).
  dropout::Key key() const { return dropout::make_key(seed, dropout_p); }
  // 1 / (1 - p), the factor of every kept element.
  double inv_keep() const { return 1.0 / (1.0 - dropout_p); }
};

}  // namespace pylora
