// The floating dtypes pylora's ops accept, in one table: their names as Python users see them
// ("float32", not "Float"), the check that names an unsupported argument (a ValueError with the
// supported list), and the one switch from a dtype to the C++ element type a kernel is instantiated
// for. c10 headers only (no ATen, no torch/extension.h), so .cpp and .cu kernel files include it.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace pylora {

inline const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::Double: return "float64";
    case c10::ScalarType::Half: return "float16";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Long: return "int64";
    case c10::ScalarType::Int: return "int32";
    case c10::ScalarType::Short: return "int16";
    case c10::ScalarType::Char: return "int8";
    case c10::ScalarType::Byte: return "uint8";
    case c10::ScalarType::Bool: return "bool";
    default: return c10::toString(t);
  }
}

// The sets of floating dtypes an op supports: every op takes float32, float16 and bfloat16;
// lora_linear takes float64 too.
enum class DtypeSet { kF32F16BF16, kF32F16BF16F64 };

constexpr const char* supported_list(DtypeSet set) {
  return set == DtypeSet::kF32F16BF16F64 ? "float32, float16, bfloat16, float64" : "float32, float16, bfloat16";
}

inline bool is_supported(c10::ScalarType t, DtypeSet set) {
  switch (t) {
    case c10::ScalarType::Float:
    case c10::ScalarType::Half:
    case c10::ScalarType::BFloat16: return true;
    case c10::ScalarType::Double: return set == DtypeSet::kF32F16BF16F64;
    default: return false;
  }
}

// Raises ValueError "<op>: <arg>.dtype=<name> is not supported (<the set's list>)".
[[noreturn]] inline void fail_dtype(const char* op, const char* arg, c10::ScalarType t, DtypeSet set) {
  TORCH_CHECK_VALUE(false, op, ": ", arg, ".dtype=", dtype_name(t), " is not supported (", supported_list(set), ")");
}

inline void check_dtype(const char* op, const char* arg, c10::ScalarType t, DtypeSet set) {
  if (!is_supported(t, set)) fail_dtype(op, arg, t, set);
}

template <class T>
struct TypeTag {
  using type = T;
};

// Returns f(TypeTag<T>{}) with T the C++ element type of t: float, c10::Half, c10::BFloat16, and
// double when kSet holds float64. Any other dtype raises fail_dtype's ValueError naming arg, so only
// the supported types are ever instantiated. Usage:
//   dispatch_dtype<DtypeSet::kF32F16BF16>(op, "y", y.scalar_type(), [&](auto tag) {
//     using T = typename decltype(tag)::type;
//     kernel<T>(...);
//   });
template <DtypeSet kSet, class F>
decltype(auto) dispatch_dtype(const char* op, const char* arg, c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: return f(TypeTag<float>{});
    case c10::ScalarType::Half: return f(TypeTag<c10::Half>{});
    case c10::ScalarType::BFloat16: return f(TypeTag<c10::BFloat16>{});
    case c10::ScalarType::Double:
      if constexpr (kSet == DtypeSet::kF32F16BF16F64) return f(TypeTag<double>{});
      break;
    default: break;
  }
  fail_dtype(op, arg, t, kSet);
}

}  // namespace pylora
