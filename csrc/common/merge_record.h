// The correction record of merge_ / unmerge_ (see csrc/ops.cpp and common/merge_math.h), handled
// with ATen ops so the same code serves CPU and CUDA tensors: its layout and contents checked
// against the problem, and its entries and escapes applied after an unmerge pass.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "merge_problem.h"

namespace pylora {

// merge_'s result with record=False: four empty tensors (counts, entries, esc_index, esc_value) with the
// record's dtypes, on the weight's device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_record(const MergeProblem& mp);

// Validates a record's tensors (dims, dtypes, device, sizes) against the problem.
void check_record_layout(const char* op, const MergeProblem& mp, const at::Tensor& counts, const at::Tensor& entries,
                         const at::Tensor& esc_index, const at::Tensor& esc_value);

// Validates a record's contents (counts >= 0 summing to the entries, columns < Q, escape indices in
// range) with ATen ops, for any device; the CPU kernel checks the same with a plain loop.
// Returns each entry's flat storage index (empty when there are no entries), for apply_record.
at::Tensor check_record_contents(const char* op, const MergeProblem& mp, const at::Tensor& counts,
                                 const at::Tensor& entries, const at::Tensor& esc_index);

// The same checks as check_record_contents with plain loops over CPU tensors (the CPU kernel's), with
// the same messages. Returns each chunk's first entry (chunks + 1 offsets). Compiled once, at the
// baseline ISA: checks are not hot, and their error paths instantiate c10::str templates that must not
// come from an object compiled for a newer CPU (see common/isa.h).
std::vector<int64_t> check_record_entries(const char* op, const MergeProblem& mp, const at::Tensor& counts,
                                          const at::Tensor& entries, const at::Tensor& esc_index);

// After the unmerge pass wrote the candidates c: S[entry_index] = unkey(key(c) + delta), then the
// escapes (ATen ops, for any device; the CPU kernel applies entries inside its pass instead).
void apply_record(const MergeProblem& mp, const at::Tensor& entry_index, const at::Tensor& entries,
                  const at::Tensor& esc_index, const at::Tensor& esc_value);

}  // namespace pylora
