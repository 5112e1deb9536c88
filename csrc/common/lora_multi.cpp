#include "lora_multi.h"

#include <ATen/core/LegacyTypeDispatch.h>

#include <cmath>

#include "dtypes.h"

namespace pylora {

namespace {

// Adapter k's tokens, as indices into x's rows.
at::Tensor group_index(const at::Tensor& tok_idx, at::IntArrayRef tok_ptr, size_t k) {
  return tok_idx.narrow(0, tok_ptr[k], tok_ptr[k + 1] - tok_ptr[k]);
}

}  // namespace

std::vector<LoraLinearParams> check_lora_multi(const char* op, const at::Tensor& x, at::TensorList lora_A,
                                               at::TensorList lora_B, at::ArrayRef<double> scales,
                                               at::ArrayRef<double> dropout_p, at::IntArrayRef seeds,
                                               at::IntArrayRef tok_ptr, const at::Tensor& tok_idx) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x.dim()=", x.dim(), " must be 2 ([T, I])");
  check_dtype(op, "x", x.scalar_type(), DtypeSet::kF32F16BF16F64);
  const size_t N = lora_A.size();
  TORCH_CHECK_VALUE(N >= 1, op, ": len(lora_A)=0 (N) must be >= 1: an adapter to apply");
  TORCH_CHECK_VALUE(lora_B.size() == N, op, ": len(lora_B)=", lora_B.size(), " must equal len(lora_A)=", N, " (N)");
  TORCH_CHECK_VALUE(scales.size() == N, op, ": len(scales)=", scales.size(), " must equal len(lora_A)=", N, " (N)");
  TORCH_CHECK_VALUE(dropout_p.size() == N, op, ": len(dropout_p)=", dropout_p.size(), " must equal len(lora_A)=", N,
                    " (N)");
  TORCH_CHECK_VALUE(seeds.size() == N, op, ": len(seeds)=", seeds.size(), " must equal len(lora_A)=", N, " (N)");
  TORCH_CHECK_VALUE(tok_ptr.size() == N + 1, op, ": len(tok_ptr)=", tok_ptr.size(), " must equal N+1=", N + 1);
  const int64_t T = x.size(0), I = x.size(1);
  const int64_t O = lora_B[0].dim() == 2 ? lora_B[0].size(0) : -1;
  std::vector<LoraLinearParams> pbs(N);
  for (size_t k = 0; k < N; ++k) {
    const at::Tensor &A = lora_A[k], &B = lora_B[k];
    TORCH_CHECK_VALUE(A.dim() == 2, op, ": lora_A[", k, "].dim()=", A.dim(), " must be 2 ([r, I])");
    TORCH_CHECK_VALUE(B.dim() == 2, op, ": lora_B[", k, "].dim()=", B.dim(), " must be 2 ([O, r])");
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lora_A", &A}, {"lora_B", &B}}) {
      TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), op, ": ", name, "[", k, "].dtype=",
                        dtype_name(t->scalar_type()), " must equal x.dtype=", dtype_name(x.scalar_type()));
      TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, "[", k, "].device=", t->device(),
                        " must equal x.device=", x.device());
    }
    const int64_t r = A.size(0);
    TORCH_CHECK_VALUE(r >= 1, op, ": lora_A[", k, "].size(0)=", r, " (r) must be >= 1");
    TORCH_CHECK_VALUE(A.size(1) == I, op, ": lora_A[", k, "].size(1)=", A.size(1), " must equal x.size(1)=", I, " (I)");
    TORCH_CHECK_VALUE(B.size(1) == r, op, ": lora_B[", k, "].size(1)=", B.size(1), " must equal lora_A[", k,
                      "].size(0)=", r, " (r)");
    TORCH_CHECK_VALUE(B.size(0) == O, op, ": lora_B[", k, "].size(0)=", B.size(0), " must equal lora_B[0].size(0)=", O,
                      " (O)");
    TORCH_CHECK_VALUE(std::isfinite(scales[k]), op, ": scales[", k, "]=", scales[k], " must be finite");
    TORCH_CHECK_VALUE(dropout_p[k] >= 0.0 && dropout_p[k] < 1.0, op, ": dropout_p[", k, "]=", dropout_p[k],
                      " must satisfy 0 <= dropout_p < 1");  // written so that NaN fails too
    pbs[k].I = I;
    pbs[k].O = O;
    pbs[k].r = r;
    pbs[k].scale = scales[k];
    pbs[k].dropout_p = dropout_p[k];
    pbs[k].seed = seeds[k];
  }
  TORCH_CHECK_VALUE(tok_idx.dim() == 1 && tok_idx.scalar_type() == at::kLong, op,
                    ": tok_idx must be a 1-D int64 tensor, got ", dtype_name(tok_idx.scalar_type()), " of shape ",
                    tok_idx.sizes());
  TORCH_CHECK_VALUE(tok_idx.device() == x.device(), op, ": tok_idx.device=", tok_idx.device(),
                    " must equal x.device=", x.device());
  TORCH_CHECK_VALUE(tok_ptr[0] == 0, op, ": tok_ptr[0]=", tok_ptr[0], " must be 0");
  for (size_t k = 0; k < N; ++k) {
    TORCH_CHECK_VALUE(tok_ptr[k + 1] >= tok_ptr[k], op, ": tok_ptr[", k + 1, "]=", tok_ptr[k + 1],
                      " must be >= tok_ptr[", k, "]=", tok_ptr[k]);
    pbs[k].T = tok_ptr[k + 1] - tok_ptr[k];
  }
  TORCH_CHECK_VALUE(tok_ptr[N] == tok_idx.numel(), op, ": tok_ptr[N]=", tok_ptr[N],
                    " must equal tok_idx.numel()=", tok_idx.numel());
  if (tok_idx.device().is_cpu()) {
    const at::Tensor idx = tok_idx.contiguous();
    const int64_t* p = idx.const_data_ptr<int64_t>();
    std::vector<int64_t> first(static_cast<size_t>(T), -1);
    for (int64_t j = 0; j < idx.numel(); ++j) {
      TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < T, op, ": tok_idx[", j, "]=", p[j], " must be in [0, T=", T, ")");
      TORCH_CHECK_VALUE(first[p[j]] < 0, op, ": tok_idx[", j, "]=", p[j],
                        " appears more than once: a token has one adapter");
      first[p[j]] = j;
    }
  }
  return pbs;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> lora_multi_forward(const std::vector<LoraLinearParams>& pbs,
                                                                   const at::Tensor& x, at::TensorList lora_A,
                                                                   at::TensorList lora_B, at::IntArrayRef tok_ptr,
                                                                   const at::Tensor& tok_idx,
                                                                   MaskedShrinkFn masked_shrink) {
  // Registered at a backend key below the op's own autograd: the ATen calls inside are not recorded.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // Every row is written by its adapter's group; zero-filled first when some token has none, or when
  // tok_idx's contents were not checked (not on the CPU), so that no row is left unwritten.
  const bool all_covered = tok_ptr.back() == x.size(0) && tok_idx.device().is_cpu();
  at::Tensor y = all_covered ? at::empty({x.size(0), pbs[0].O}, x.options())
                             : at::zeros({x.size(0), pbs[0].O}, x.options());
  std::vector<at::Tensor> hs;
  hs.reserve(pbs.size());
  for (size_t k = 0; k < pbs.size(); ++k) {
    const LoraLinearParams& pb = pbs[k];
    if (pb.T == 0) {
      hs.push_back(at::empty({0, pb.r}, x.options()));
      continue;
    }
    const at::Tensor idx = group_index(tok_idx, tok_ptr, k);
    const at::Tensor xk = x.index_select(0, idx);  // [n_k, I], contiguous: token j of the group is row j
    at::Tensor h;
    if (pb.dropout_p > 0.0) {
      h = at::empty({pb.T, pb.r}, x.options());
      if (pb.I == 0) {
        h.zero_();
      } else {
        masked_shrink(pb, xk, lora_A[k], h);
      }
    } else {
      h = at::mm(xk, lora_A[k].t());
    }
    // s rides in the GEMM's alpha (beta = 0: the uninitialised input is ignored); then the group's rows
    // go to their tokens.
    y.index_copy_(0, idx, at::addmm(at::empty({pb.T, pb.O}, x.options()), h, lora_B[k].t(), 0.0, pb.scale));
    hs.push_back(std::move(h));
  }
  return {y, hs};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward(
    const char* op, const std::vector<LoraLinearParams>& pbs, const at::Tensor& grad_y, const at::Tensor& x,
    at::TensorList lora_A, at::TensorList lora_B, at::TensorList h, at::IntArrayRef tok_ptr, const at::Tensor& tok_idx,
    std::array<bool, 3> output_mask, MaskedBackwardFn masked_backward) {
  const int64_t T = x.size(0), O = pbs[0].O;
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == O, op, ": grad_y.shape=",
                    grad_y.sizes(), " must equal [T, O]=[", T, ", ", O, "]");
  TORCH_CHECK_VALUE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y.dtype=", dtype_name(grad_y.scalar_type()),
                    " must equal x.dtype=", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), op, ": grad_y.device=", grad_y.device(), " must equal x.device=",
                    x.device());
  TORCH_CHECK_VALUE(h.size() == pbs.size(), op, ": len(h)=", h.size(), " must equal N=", pbs.size());
  for (size_t k = 0; k < pbs.size(); ++k) {
    TORCH_CHECK_VALUE(h[k].dim() == 2 && h[k].size(0) == pbs[k].T && h[k].size(1) == pbs[k].r, op, ": h[", k,
                      "].shape=", h[k].sizes(), " must equal [n, r]=[", pbs[k].T, ", ", pbs[k].r, "]");
    TORCH_CHECK_VALUE(h[k].scalar_type() == x.scalar_type() && h[k].device() == x.device(), op, ": h[", k,
                      "] must have x's dtype and device");
  }

  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool need_x = output_mask[0], need_A = output_mask[1], need_B = output_mask[2];
  const auto none = [&] { return at::empty({0}, x.options()); };
  // Then every row of grad_x is written by its group (tok_idx checked: on the CPU).
  const bool all_covered = tok_ptr.back() == T && tok_idx.device().is_cpu();
  at::Tensor grad_x = !need_x      ? none()
                      : all_covered ? at::empty({T, x.size(1)}, x.options())
                                    : at::zeros({T, x.size(1)}, x.options());
  std::vector<at::Tensor> grad_A, grad_B;
  for (size_t k = 0; k < pbs.size(); ++k) {
    const LoraLinearParams& pb = pbs[k];
    const at::Tensor idx = group_index(tok_idx, tok_ptr, k);
    const at::Tensor gy = grad_y.index_select(0, idx);  // [n_k, O]
    grad_B.push_back(need_B ? at::mm(gy.t(), h[k]).mul_(pb.scale) : none());  // [O, r]
    if (!need_x && !need_A) {
      grad_A.push_back(none());
      continue;
    }
    if (pb.T == 0) {
      grad_A.push_back(need_A ? at::zeros({pb.r, pb.I}, x.options()) : none());
      continue;
    }
    // u = s dy B, the r-wide carrier of both input gradients; s is applied to it, never to [n, I].
    const at::Tensor u = at::mm(gy, lora_B[k]).mul_(pb.scale).contiguous();  // [n_k, r]
    const at::Tensor xk = (need_A || pb.dropout_p > 0.0) ? x.index_select(0, idx) : at::Tensor();
    if (pb.dropout_p == 0.0) {
      if (need_x) grad_x.index_copy_(0, idx, at::mm(u, lora_A[k]));
      grad_A.push_back(need_A ? at::mm(u.t(), xk) : none());
      continue;
    }
    at::Tensor gx = need_x ? at::zeros({pb.T, pb.I}, x.options()) : at::Tensor();
    at::Tensor gA = need_A ? at::empty({pb.r, pb.I}, x.options()) : at::Tensor();
    if (pb.I == 0) {
      if (need_A) gA.zero_();
    } else {
      // The group's rows in order: the mask's token index is the row's index within the group.
      masked_backward(pb, xk, u, lora_A[k], gx, gA);
    }
    if (need_x) grad_x.index_copy_(0, idx, gx);
    grad_A.push_back(need_A ? gA : none());
  }
  return {grad_x, grad_A, grad_B};
}

}  // namespace pylora
