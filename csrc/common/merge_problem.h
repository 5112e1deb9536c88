// Device-agnostic parts of merge_ / unmerge_: argument validation, the storage view the kernels
// work on, the conservative finiteness bound, and applying a correction record (ATen ops only,
// so the same code serves CPU and CUDA tensors).
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace pylora {

// The kernels see every merge as  S[P, Q] += s * U[P, r] @ V[r, Q]  on a contiguous storage view S.
// weight [O, I] contiguous:            S = weight,     U = B,     V = A
// weight [I, O] (fan_in_fan_out):       S = weight,     U = A^T,   V = B^T
// a transposed-contiguous weight flips which of the two it is and S = weight.t().
struct MergeProblem {
  at::Tensor S;  // [P, Q], contiguous, aliases weight
  at::Tensor U;  // [P, r] fp32 contiguous
  at::Tensor V;  // [r, Q] fp32 contiguous
  bool transposed = false;
  int64_t P = 0, Q = 0, r = 0;
  float s = 0.f;
  int64_t chunks_per_row() const;
  int64_t num_chunks() const { return P * chunks_per_row(); }
  // "weight[o, i]" in the weight's own indices for storage element (p, q).
  std::string where(int64_t p, int64_t q) const;
};

// Validates (raising ValueError naming the argument, its value and the limit) and builds the view.
MergeProblem prepare_merge(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double scale, bool fan_in_fan_out);

// True when no merged element can overflow or be NaN: W finite, U and V finite, and
// max|W| + |s| max_p sum_k |U[p,k]| max|V| well below the storage dtype's largest finite value.
// False means "check every element", not "fails".
bool bound_allows_merge(const MergeProblem& mp);

// Raises ValueError: the merged weight would not be finite at storage element (p, q).
[[noreturn]] void fail_nonfinite(const char* op, const MergeProblem& mp, int64_t p, int64_t q, float w,
                                 float acc);

// Validates a record's tensors (dims, dtypes, device, sizes) against the problem.
void check_record_layout(const char* op, const MergeProblem& mp, const at::Tensor& counts, const at::Tensor& entries,
                         const at::Tensor& esc_index, const at::Tensor& esc_value);

// Validates a record's contents (counts >= 0 summing to the entries, columns < Q, escape indices in
// range) with ATen ops, for any device; the CPU kernel checks the same with a plain loop.
// Returns each entry's flat storage index (empty when there are no entries), for apply_record.
at::Tensor check_record_contents(const char* op, const MergeProblem& mp, const at::Tensor& counts,
                                 const at::Tensor& entries, const at::Tensor& esc_index);

// After the unmerge pass wrote the candidates c: S[entry_index] = unkey(key(c) + delta), then the
// escapes (ATen ops, for any device; the CPU kernel applies entries inside its pass instead).
void apply_record(const MergeProblem& mp, const at::Tensor& entry_index, const at::Tensor& entries,
                  const at::Tensor& esc_index, const at::Tensor& esc_value);

}  // namespace pylora
