// Every pylora op schema, in one place, with its semantics in the letters used everywhere:
// T tokens, N slots/adapters, r rank, I in-features, O out-features, S segments, P pool rows.
// Implementations register per device in csrc/cpu/dispatch.cpp (the CPU kernels of the ISA level the CPU
// runs) and csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/dispatch.h"

#if defined(PYLORA_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(pylora, m) {
  // weight[O, I] += scale * B[O, r] @ A[r, I] in place (weight [I, O] when fan_in_fan_out), fp32
  // accumulation rounded once per element; refuses (writing nothing) when any result is not finite.
  // Returns the correction record that makes unmerge_ exact: (counts, entries, esc_index, esc_value); with
  // record=False the same merged weight and an empty record (four empty tensors), which costs nothing to build.
  m.def("merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale, bool fan_in_fan_out, "
        "bool record=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // weight = the exact weight before merge_(weight, lora_A, lora_B, scale, fan_in_fan_out) that
  // returned (counts, entries, esc_index, esc_value).
  m.def("unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale, bool fan_in_fan_out, "
        "Tensor counts, Tensor entries, Tensor esc_index, Tensor esc_value) -> ()");
  // (y [T, O], h [T, r]): h = drop(x[T, I]) @ lora_A[r, I]^T, y = x @ W^T + bias + scale * h @ lora_B[O, r]^T with
  // W = weight [O, I] ([I, O] when fan_in_fan_out) and drop(x)[t, i] = x[t, i] * keep(seed, t, i) / (1 - dropout_p)
  // (common/dropout_hash.h; drop(x) = x when dropout_p == 0); seed is a one-element int64 CPU tensor (a value
  // torch.compile can trace without reading it on the host); h is saved for backward, not differentiable.
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor seed, bool fan_in_fan_out) -> (Tensor, Tensor)");
  // (grad_x [T, I], grad_weight (weight's layout), grad_bias [O], grad_A [r, I], grad_B [O, r]) of lora_linear
  // given grad_y [T, O] and its h; an output whose output_mask entry is False is an empty tensor, not computed.
  m.def("lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor h, "
        "float scale, float dropout_p, Tensor seed, bool fan_in_fan_out, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (y [T, O], h): adapter k of N owns the tokens tok_idx[tok_ptr[k]:tok_ptr[k+1]] (each token at most once)
  // and is a lora_linear without the base over them: h[k] = drop_k(x_k) @ lora_A[k]^T [n_k, r_k] with its mask
  // hashed from (seeds[k], the token's index within the group, i), y[tok] = scales[k] * h[k] @ lora_B[k]^T,
  // y = 0 for tokens of no adapter; h is saved for backward, not differentiable.
  m.def("lora_multi(Tensor x, Tensor[] lora_A, Tensor[] lora_B, float[] scales, float[] dropout_p, int[] seeds, "
        "int[] tok_ptr, Tensor tok_idx) -> (Tensor, Tensor[])");
  // (grad_x [T, I], grad_A [r_k, I] per adapter, grad_B [O, r_k] per adapter) of lora_multi given grad_y and its h;
  // an output whose output_mask entry is False is empty, not computed.
  m.def("lora_multi_backward(Tensor grad_y, Tensor x, Tensor[] lora_A, Tensor[] lora_B, Tensor[] h, float[] scales, "
        "float[] dropout_p, int[] seeds, int[] tok_ptr, Tensor tok_idx, bool[3] output_mask) "
        "-> (Tensor, Tensor[], Tensor[])");
  // For each segment g (tokens t in [seg_ptr[g], seg_ptr[g+1])) whose slot s = seg_slot[g] is not -1, with
  // rows(s) = row_idx[row_ptr[s]:row_ptr[s+1]]: y[t, o] = R(y[t, o] + scales[s] * sum_j h[t, j] * B_rows[rows(s)[j], o]),
  // h[t, j] = sum_i A_rows[rows(s)[j], i] * x[t, i]; fp32 accumulation, one rounding R into y's dtype.
  m.def("lora_apply_(Tensor(a!) y, Tensor x, Tensor A_rows, Tensor B_rows, Tensor row_ptr, Tensor row_idx, "
        "Tensor scales, Tensor seg_ptr, Tensor seg_slot) -> ()");
}

#define PYLORA_STR2(x) #x
#define PYLORA_STR(x) PYLORA_STR2(x)

// setup.py defines PYLORA_TORCH_VERSION (torch.__version__ of the build) and PYLORA_CPU_ARCH (the -march
// of a native build; undefined in a portable build), both string literals.
#if !defined(PYLORA_TORCH_VERSION)
#define PYLORA_TORCH_VERSION "unknown"
#endif

namespace {

// d[key] = value, giving up the reference to value; false (with a Python error set) on failure.
bool put(PyObject* d, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(d, key, value);
  Py_DECREF(value);
  return rc == 0;
}

PyObject* str_or_none(const std::string& s) {
  if (s.empty()) Py_RETURN_NONE;
  return PyUnicode_FromString(s.c_str());
}

PyObject* str_tuple(const std::vector<std::string>& items) {
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(items.size()));
  if (t == nullptr) return nullptr;
  for (size_t k = 0; k < items.size(); ++k) {
    PyObject* s = PyUnicode_FromString(items[k].c_str());
    if (s == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(k), s);
  }
  return t;
}

// The build facts: the torch it was compiled against, the CUDA kernels, and the CPU kernels' ISA levels
// (compiled, run by this CPU, running, and what PYLORA_CPU_ISA asked for).
PyObject* build_info(PyObject*, PyObject*) {
  const pylora::cpu::IsaChoice& isa = pylora::cpu::isa_choice();
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
#if defined(PYLORA_WITH_CUDA)
  const int cuda_major = CUDART_VERSION / 1000, cuda_minor = (CUDART_VERSION % 1000) / 10;
  const std::string cuda_version = std::to_string(cuda_major) + "." + std::to_string(cuda_minor);
  const bool ok_cuda = put(d, "cuda", Py_NewRef(Py_True)) && put(d, "cuda_version", str_or_none(cuda_version)) &&
                       put(d, "cuda_arches", PyUnicode_FromString(PYLORA_STR(PYLORA_CUDA_ARCHES)));
#else
  const bool ok_cuda = put(d, "cuda", Py_NewRef(Py_False)) && put(d, "cuda_version", Py_NewRef(Py_None)) &&
                       put(d, "cuda_arches", Py_NewRef(Py_None));
#endif
#if defined(PYLORA_CPU_ARCH)
  PyObject* cpu_arch = PyUnicode_FromString(PYLORA_CPU_ARCH);
#else
  PyObject* cpu_arch = Py_NewRef(Py_None);
#endif
  const bool ok = ok_cuda && put(d, "torch_version", PyUnicode_FromString(PYLORA_TORCH_VERSION)) &&
                  put(d, "cpu_arch", cpu_arch) && put(d, "cpu_isa", PyUnicode_FromString(isa.running.c_str())) &&
                  put(d, "cpu_isas", str_tuple(isa.compiled)) && put(d, "cpu_isas_supported", str_tuple(isa.supported)) &&
                  put(d, "cpu_isa_request", str_or_none(isa.requested)) && put(d, "cpu_isa_note", str_or_none(isa.note));
  if (!ok) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of pylora._C holds: its torch, CUDA kernels and arches, CPU kernels and ISA levels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pylora's compiled kernels (ops register in torch.ops.pylora)",
                          -1, methods};

}  // namespace

// Importing the module loads the library, whose static initialisers register the ops.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
