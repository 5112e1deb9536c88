#include "lora_apply_problem.h"

#include <ATen/MemoryOverlap.h>

#include "dtypes.h"

namespace pylora {

namespace {

// Rows with unit stride along the last dimension (a dimension of size <= 1 has no meaningful stride).
bool unit_last_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

at::Tensor rows_view(const at::Tensor& t) { return unit_last_stride(t) ? t : t.contiguous(); }

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// Branch-free sweeps (they vectorise): the contents are checked on every call and the pool's row_idx
// can be long, so a valid plan costs one pass over each array; the loops that name the first bad
// entry run only when a sweep finds one.
bool non_decreasing(const int32_t* p, int64_t n) {
  int bad = 0;
  for (int64_t i = 1; i < n; ++i) bad |= p[i] < p[i - 1];
  return bad == 0;
}

bool within(const int32_t* p, int64_t n, int64_t lo, int64_t hi) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (p[i] < lo) | (p[i] >= hi);
  return bad == 0;
}

// The index contents, read on the host. The first violation is reported, in the order
// row_ptr, row_idx, seg_ptr, seg_slot (pylora/reference.py checks in the same order).
void check_contents(const char* op, const LoraApplyParams<void>& a) {
  const int32_t *rp = a.row_ptr, *ri = a.row_idx, *sp = a.seg_ptr, *ss = a.seg_slot;
  if (rp[0] == 0 && non_decreasing(rp, a.N + 1) && rp[a.N] == a.nnz && within(ri, a.nnz, 0, a.P) && sp[0] == 0 &&
      non_decreasing(sp, a.S + 1) && sp[a.S] == a.T && within(ss, a.S, -1, a.N))
    return;
  TORCH_CHECK_VALUE(rp[0] == 0, op, ": row_ptr[0]=", rp[0], " must be 0");
  for (int64_t s = 1; s <= a.N; ++s)
    TORCH_CHECK_VALUE(rp[s] >= rp[s - 1], op, ": row_ptr[", s, "]=", rp[s], " must be >= row_ptr[", s - 1, "]=",
                      rp[s - 1], " (row_ptr is non-decreasing)");
  TORCH_CHECK_VALUE(rp[a.N] == a.nnz, op, ": row_ptr[N=", a.N, "]=", rp[a.N], " must equal row_idx.numel()=", a.nnz,
                    " (nnz)");
  for (int64_t k = 0; k < a.nnz; ++k)
    TORCH_CHECK_VALUE(ri[k] >= 0 && ri[k] < a.P, op, ": row_idx[", k, "]=", ri[k], " must be in [0, P=", a.P, ")");
  TORCH_CHECK_VALUE(sp[0] == 0, op, ": seg_ptr[0]=", sp[0], " must be 0");
  for (int64_t g = 1; g <= a.S; ++g)
    TORCH_CHECK_VALUE(sp[g] >= sp[g - 1], op, ": seg_ptr[", g, "]=", sp[g], " must be >= seg_ptr[", g - 1, "]=",
                      sp[g - 1], " (seg_ptr is non-decreasing)");
  TORCH_CHECK_VALUE(sp[a.S] == a.T, op, ": seg_ptr[S=", a.S, "]=", sp[a.S], " must equal T=", a.T);
  for (int64_t g = 0; g < a.S; ++g)
    TORCH_CHECK_VALUE(ss[g] >= -1 && ss[g] < a.N, op, ": seg_slot[", g, "]=", ss[g], " must be in [-1, N=", a.N, ")");
}

}  // namespace

LoraApplyProblem prepare_lora_apply(const char* op, at::Tensor& y, const at::Tensor& x, const at::Tensor& A_rows,
                                    const at::Tensor& B_rows, const at::Tensor& row_ptr, const at::Tensor& row_idx,
                                    const at::Tensor& scales, const at::Tensor& seg_ptr,
                                    const at::Tensor& seg_slot) {
  struct Dim {
    const at::Tensor& t;
    const char* name;
    int64_t dim;
    const char* shape;
  };
  for (const Dim& d : {Dim{y, "y", 2, "[T, O]"}, Dim{x, "x", 2, "[T, I]"}, Dim{A_rows, "A_rows", 2, "[P, I]"},
                       Dim{B_rows, "B_rows", 2, "[P, O]"}, Dim{row_ptr, "row_ptr", 1, "[N+1]"},
                       Dim{row_idx, "row_idx", 1, "[nnz]"}, Dim{scales, "scales", 1, "[N]"},
                       Dim{seg_ptr, "seg_ptr", 1, "[S+1]"}, Dim{seg_slot, "seg_slot", 1, "[S]"}})
    TORCH_CHECK_VALUE(d.t.dim() == d.dim, op, ": ", d.name, ".dim()=", d.t.dim(), " must be ", d.dim, " (", d.shape,
                      ")");

  check_dtype(op, "y", y.scalar_type(), DtypeSet::kF32F16BF16);
  struct Named {
    const at::Tensor& t;
    const char* name;
  };
  for (const Named& n : {Named{x, "x"}, Named{A_rows, "A_rows"}, Named{B_rows, "B_rows"}})
    TORCH_CHECK_VALUE(n.t.scalar_type() == y.scalar_type(), op, ": ", n.name, ".dtype=", dtype_name(n.t.scalar_type()),
                      " must equal y.dtype=", dtype_name(y.scalar_type()));
  for (const Named& n : {Named{row_ptr, "row_ptr"}, Named{row_idx, "row_idx"}, Named{seg_ptr, "seg_ptr"},
                         Named{seg_slot, "seg_slot"}})
    TORCH_CHECK_VALUE(n.t.scalar_type() == at::kInt, op, ": ", n.name, ".dtype=", dtype_name(n.t.scalar_type()),
                      " must be int32");
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat, op, ": scales.dtype=", dtype_name(scales.scalar_type()),
                    " must be float32");
  for (const Named& n : {Named{x, "x"}, Named{A_rows, "A_rows"}, Named{B_rows, "B_rows"}, Named{row_ptr, "row_ptr"},
                         Named{row_idx, "row_idx"}, Named{scales, "scales"}, Named{seg_ptr, "seg_ptr"},
                         Named{seg_slot, "seg_slot"}})
    TORCH_CHECK_VALUE(n.t.device() == y.device(), op, ": ", n.name, ".device=", n.t.device(),
                      " must equal y.device=", y.device());

  TORCH_CHECK_VALUE(x.size(0) == y.size(0), op, ": x.size(0)=", x.size(0), " must equal y.size(0)=", y.size(0), " (T)");
  TORCH_CHECK_VALUE(A_rows.size(1) == x.size(1), op, ": A_rows.size(1)=", A_rows.size(1), " must equal x.size(1)=",
                    x.size(1), " (I)");
  TORCH_CHECK_VALUE(B_rows.size(1) == y.size(1), op, ": B_rows.size(1)=", B_rows.size(1), " must equal y.size(1)=",
                    y.size(1), " (O)");
  TORCH_CHECK_VALUE(B_rows.size(0) == A_rows.size(0), op, ": B_rows.size(0)=", B_rows.size(0),
                    " must equal A_rows.size(0)=", A_rows.size(0), " (P)");
  TORCH_CHECK_VALUE(row_ptr.numel() >= 1, op, ": row_ptr.numel()=", row_ptr.numel(), " must be >= 1 (N+1)");
  TORCH_CHECK_VALUE(scales.numel() == row_ptr.numel() - 1, op, ": scales.numel()=", scales.numel(),
                    " must equal row_ptr.numel()-1=", row_ptr.numel() - 1, " (N)");
  TORCH_CHECK_VALUE(seg_ptr.numel() >= 1, op, ": seg_ptr.numel()=", seg_ptr.numel(), " must be >= 1 (S+1)");
  TORCH_CHECK_VALUE(seg_slot.numel() == seg_ptr.numel() - 1, op, ": seg_slot.numel()=", seg_slot.numel(),
                    " must equal seg_ptr.numel()-1=", seg_ptr.numel() - 1, " (S)");
  // Rows of y that share memory would be written twice: a caller's bug, not a layout to copy around.
  TORCH_CHECK_VALUE(at::has_internal_overlap(y) != at::MemOverlap::Yes, op, ": y.stride()=", y.strides(),
                    " makes elements of y share memory; y must not overlap itself");

  LoraApplyProblem a;
  a.y_out = y;
  a.y = rows_view(y);
  a.x = rows_view(x);
  a.A = rows_view(A_rows);
  a.B = rows_view(B_rows);
  a.row_ptr = row_ptr.contiguous();
  a.row_idx = row_idx.contiguous();
  a.scales = scales.contiguous();
  a.seg_ptr = seg_ptr.contiguous();
  a.seg_slot = seg_slot.contiguous();
  LoraApplyParams<void>& prm = a.params;
  prm.y = a.y.data_ptr();
  prm.x = a.x.const_data_ptr();
  prm.A = a.A.const_data_ptr();
  prm.B = a.B.const_data_ptr();
  prm.row_ptr = a.row_ptr.const_data_ptr<int32_t>();
  prm.row_idx = a.row_idx.const_data_ptr<int32_t>();
  prm.seg_ptr = a.seg_ptr.const_data_ptr<int32_t>();
  prm.seg_slot = a.seg_slot.const_data_ptr<int32_t>();
  prm.scales = a.scales.const_data_ptr<float>();
  prm.T = y.size(0);
  prm.O = y.size(1);
  prm.I = x.size(1);
  prm.P = A_rows.size(0);
  prm.N = row_ptr.numel() - 1;
  prm.S = seg_slot.numel();
  prm.nnz = row_idx.numel();
  prm.ldy = row_stride(a.y);
  prm.ldx = row_stride(a.x);
  prm.lda = row_stride(a.A);
  prm.ldb = row_stride(a.B);
  if (row_ptr.device().is_cpu()) check_contents(op, prm);
  return a;
}

void finish_lora_apply(LoraApplyProblem& a) {
  if (!a.y.is_same(a.y_out)) a.y_out.copy_(a.y);
}

}  // namespace pylora
