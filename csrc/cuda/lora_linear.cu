// lora_linear_cuda / lora_linear_backward_cuda: the ATen (cuBLAS) GEMMs of common/lora_linear_gemms.cpp
// plus three kernels for the dropout-masked pieces (which lora_multi_cuda / lora_multi_backward_cuda run
// per adapter, common/lora_multi.cpp), each a shared-memory tiled product whose tile
// loader hashes the keep bit of every x element it reads (common/dropout_hash.h), so neither a mask
// nor a dropped copy of x ever reaches global memory:
//   masked_shrink      h [T, r] = drop(x) A^T          (split over I, partials summed in fp32)
//   masked_accumulate  dX [T, I] += (u A) * keep / (1 - p), in place on dX = dy W
//   masked_grad_A      dA [r, I] = u^T drop(x)          (split over T, partials summed in fp32)
// Accumulation is fp32 for float32/float16/bfloat16 and fp64 for float64. Every launch runs on the
// current stream under the caller's device guard and is followed by C10_CUDA_KERNEL_LAUNCH_CHECK().
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../common/dropout_hash.h"
#include "../common/dtypes.h"
#include "../common/lora_linear_gemms.h"
#include "../common/lora_linear_params.h"
#include "../common/lora_linear_problem.h"
#include "../common/lora_multi.h"

namespace pylora {
namespace {

constexpr int kThreads = 256;

template <class scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <class acc_t, class scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// Products rounded on their own, never contracted into an fma with the following add: the same
// arithmetic as the CPU kernel's (compiled with -ffp-contract=off).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ uint64_t counter(int64_t t, int64_t I, int64_t i) {
  return static_cast<uint64_t>(t) * static_cast<uint64_t>(I) + static_cast<uint64_t>(i);
}

// ---- h: part[s, t, k] = sum over i in split s of drop(x)[t, i] * A[k, i] ---------------------------------
// Block: kShT rows x kShR ranks; a warp owns one group of kShRpt rows and its 32 lanes the 32 ranks.
constexpr int kShT = 64, kShR = 32, kShK = 32, kShRpt = kShT / (kThreads / kShR);

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_shrink_kernel(const LoraLinearParams pb, const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1,
                         const acc_t* __restrict__ A, acc_t* __restrict__ part, int64_t split_len, dropout::Key key,
                         acc_t inv) {
  const int64_t T = pb.T, I = pb.I, r = pb.r;
  __shared__ acc_t xs[kShK][kShT + 1];  // transposed tile: xs[kk][tt] = drop(x)[t0 + tt, ib + kk]
  __shared__ acc_t as[kShK][kShR + 1];  // as[kk][rr] = A[k0 + rr, ib + kk]
  const int tid = threadIdx.x, lane_k = tid % kShR, grp = tid / kShR;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kShT, k0 = static_cast<int64_t>(blockIdx.y) * kShR;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.z) * split_len, i_end = min(I, i_begin + split_len);
  acc_t acc[kShRpt];
#pragma unroll
  for (int j = 0; j < kShRpt; ++j) acc[j] = 0;
  for (int64_t ib = i_begin; ib < i_end; ib += kShK) {
    for (int e = tid; e < kShT * kShK; e += kThreads) {  // consecutive threads read consecutive i
      const int tt = e / kShK, kk = e % kShK;
      const int64_t t = t0 + tt, i = ib + kk;
      acc_t v = 0;
      if (t < T && i < i_end && dropout::keep(key, counter(t, I, i))) v = mul_rn(to_acc<acc_t>(x[t * sx0 + i * sx1]), inv);
      xs[kk][tt] = v;
    }
    for (int e = tid; e < kShR * kShK; e += kThreads) {
      const int rr = e / kShK, kk = e % kShK;
      const int64_t k = k0 + rr, i = ib + kk;
      as[kk][rr] = (k < r && i < i_end) ? A[k * I + i] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kShK; ++kk) {
      const acc_t a = as[kk][lane_k];
#pragma unroll
      for (int j = 0; j < kShRpt; ++j) acc[j] += xs[kk][grp * kShRpt + j] * a;
    }
    __syncthreads();
  }
  const int64_t k = k0 + lane_k;
  if (k >= r) return;
#pragma unroll
  for (int j = 0; j < kShRpt; ++j) {
    const int64_t t = t0 + grp * kShRpt + j;
    if (t < T) part[(static_cast<int64_t>(blockIdx.z) * T + t) * r + k] = acc[j];
  }
}

// ---- dX[t, i] += keep ? (sum_k u[t, k] A[k, i]) * inv : 0 -----------------------------------------------
// Block: kAcT rows x kAcI columns; thread column c = tid % kAcI, rows grp * kAcRpt + j.
constexpr int kAcT = 32, kAcI = 64, kAcK = 32, kAcRpt = kAcT / (kThreads / kAcI);

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_accumulate_kernel(const LoraLinearParams pb, scalar_t* __restrict__ gx, const acc_t* __restrict__ U,
                             const acc_t* __restrict__ A, dropout::Key key, acc_t inv) {
  const int64_t T = pb.T, I = pb.I, r = pb.r;
  __shared__ acc_t us[kAcT][kAcK + 1];  // us[tt][kk] = u[t0 + tt, kb + kk]
  __shared__ acc_t as[kAcK][kAcI];      // as[kk][cc] = A[kb + kk, i0 + cc]
  const int tid = threadIdx.x, c = tid % kAcI, grp = tid / kAcI;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kAcT, i0 = static_cast<int64_t>(blockIdx.y) * kAcI;
  acc_t acc[kAcRpt];
#pragma unroll
  for (int j = 0; j < kAcRpt; ++j) acc[j] = 0;
  for (int64_t kb = 0; kb < r; kb += kAcK) {
    for (int e = tid; e < kAcT * kAcK; e += kThreads) {
      const int tt = e / kAcK, kk = e % kAcK;
      us[tt][kk] = (t0 + tt < T && kb + kk < r) ? U[(t0 + tt) * r + kb + kk] : acc_t(0);
    }
    for (int e = tid; e < kAcK * kAcI; e += kThreads) {
      const int kk = e / kAcI, cc = e % kAcI;
      as[kk][cc] = (kb + kk < r && i0 + cc < I) ? A[(kb + kk) * I + i0 + cc] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kAcK; ++kk) {
      const acc_t a = as[kk][c];
#pragma unroll
      for (int j = 0; j < kAcRpt; ++j) acc[j] += us[grp * kAcRpt + j][kk] * a;
    }
    __syncthreads();
  }
  const int64_t i = i0 + c;
  if (i >= I) return;
#pragma unroll
  for (int j = 0; j < kAcRpt; ++j) {
    const int64_t t = t0 + grp * kAcRpt + j;
    if (t < T && dropout::keep(key, counter(t, I, i))) {
      scalar_t& g = gx[t * I + i];
      g = static_cast<scalar_t>(to_acc<acc_t>(g) + mul_rn(acc[j], inv));
    }
  }
}

// ---- dA: part[s, k, i] = sum over t in split s of u[t, k] * drop(x)[t, i] -------------------------------
// Block: kGaR ranks x kGaI columns; thread column c = tid % kGaI, ranks grp * kGaRpt + j.
constexpr int kGaI = 64, kGaR = 32, kGaK = 32, kGaRpt = kGaR / (kThreads / kGaI);

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_grad_A_kernel(const LoraLinearParams pb, const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1,
                         const acc_t* __restrict__ U, acc_t* __restrict__ part, int64_t split_len, dropout::Key key,
                         acc_t inv) {
  const int64_t T = pb.T, I = pb.I, r = pb.r;
  __shared__ acc_t xs[kGaK][kGaI];      // xs[tt][cc] = drop(x)[tb + tt, i0 + cc]
  __shared__ acc_t us[kGaK][kGaR + 1];  // us[tt][rr] = u[tb + tt, k0 + rr]
  const int tid = threadIdx.x, c = tid % kGaI, grp = tid / kGaI;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kGaI, k0 = static_cast<int64_t>(blockIdx.y) * kGaR;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * split_len, t_end = min(T, t_begin + split_len);
  acc_t acc[kGaRpt];
#pragma unroll
  for (int j = 0; j < kGaRpt; ++j) acc[j] = 0;
  for (int64_t tb = t_begin; tb < t_end; tb += kGaK) {
    for (int e = tid; e < kGaK * kGaI; e += kThreads) {  // consecutive threads read consecutive i
      const int tt = e / kGaI, cc = e % kGaI;
      const int64_t t = tb + tt, i = i0 + cc;
      acc_t v = 0;
      if (t < t_end && i < I && dropout::keep(key, counter(t, I, i))) v = mul_rn(to_acc<acc_t>(x[t * sx0 + i * sx1]), inv);
      xs[tt][cc] = v;
    }
    for (int e = tid; e < kGaK * kGaR; e += kThreads) {
      const int tt = e / kGaR, rr = e % kGaR;
      us[tt][rr] = (tb + tt < t_end && k0 + rr < r) ? U[(tb + tt) * r + k0 + rr] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int tt = 0; tt < kGaK; ++tt) {
      const acc_t xv = xs[tt][c];
#pragma unroll
      for (int j = 0; j < kGaRpt; ++j) acc[j] += us[tt][grp * kGaRpt + j] * xv;
    }
    __syncthreads();
  }
  const int64_t i = i0 + c;
  if (i >= I) return;
#pragma unroll
  for (int j = 0; j < kGaRpt; ++j) {
    const int64_t k = k0 + grp * kGaRpt + j;
    if (k < r) part[(static_cast<int64_t>(blockIdx.z) * r + k) * I + i] = acc[j];
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(const at::Tensor& t) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.device().index()));
  return n;
}

// Splits a reduction of `len` (in steps of `step`) so that about two blocks per SM run; every split
// is non-empty. Returns (splits, split_len).
std::pair<int64_t, int64_t> plan_split(int64_t len, int64_t step, int64_t blocks, int sms) {
  const int64_t want = std::clamp<int64_t>(ceil_div(2 * sms, std::max<int64_t>(blocks, 1)), 1, ceil_div(len, step));
  const int64_t split_len = ceil_div(ceil_div(len, want), step) * step;
  return {ceil_div(len, split_len), split_len};
}

void check_grid(const char* op, const char* what, int64_t value, int64_t blocks) {
  TORCH_CHECK_VALUE(blocks <= 65535, op, ": ", what, "=", value, " is too large for the CUDA launch grid");
}

template <class scalar_t>
void masked_shrink_impl(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& lora_A, at::Tensor& h) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor A = lora_A.to(acc_opt).contiguous();  // [r, I], small
  const int64_t bx = ceil_div(pb.T, kShT), by = ceil_div(pb.r, kShR);
  check_grid("lora_linear", "lora_A.size(0) (r)", pb.r, by);
  const auto [splits, split_len] = plan_split(pb.I, kShK, bx * by, sm_count(x));
  at::Tensor part = at::empty({splits, pb.T, pb.r}, acc_opt);
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(splits));
  masked_shrink_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      pb, x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), A.const_data_ptr<acc_t>(), part.data_ptr<acc_t>(),
      split_len, pb.key(), static_cast<acc_t>(pb.inv_keep()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  h.copy_(splits == 1 ? part.select(0, 0) : part.sum(0));
}

template <class scalar_t>
void masked_backward_impl(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& u,
                          const at::Tensor& lora_A, at::Tensor& grad_x, at::Tensor& grad_A) {
  using acc_t = typename AccOf<scalar_t>::type;
  const char* op = "lora_linear_backward";
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor U = u.to(acc_opt).contiguous();  // [T, r]
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dropout::Key key = pb.key();
  const acc_t inv = static_cast<acc_t>(pb.inv_keep());
  if (grad_x.defined()) {
    const at::Tensor A = lora_A.to(acc_opt).contiguous();  // [r, I]
    const int64_t by = ceil_div(pb.I, kAcI);
    check_grid(op, "x.size(1) (I)", pb.I, by);
    const dim3 grid(static_cast<unsigned>(ceil_div(pb.T, kAcT)), static_cast<unsigned>(by));
    masked_accumulate_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        pb, grad_x.data_ptr<scalar_t>(), U.const_data_ptr<acc_t>(), A.const_data_ptr<acc_t>(), key, inv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (grad_A.defined()) {
    const int64_t bx = ceil_div(pb.I, kGaI), by = ceil_div(pb.r, kGaR);
    check_grid(op, "lora_A.size(0) (r)", pb.r, by);
    const auto [splits, split_len] = plan_split(pb.T, kGaK, bx * by, sm_count(x));
    at::Tensor part = at::empty({splits, pb.r, pb.I}, acc_opt);
    const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(splits));
    masked_grad_A_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        pb, x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), U.const_data_ptr<acc_t>(), part.data_ptr<acc_t>(),
        split_len, key, inv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_A.copy_(splits == 1 ? part.select(0, 0) : part.sum(0));
  }
}

void masked_shrink_cuda(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& lora_A, at::Tensor& h) {
  dispatch_dtype<DtypeSet::kF32F16BF16F64>("lora_linear", "x", x.scalar_type(), [&](auto tag) {
    masked_shrink_impl<typename decltype(tag)::type>(pb, x, lora_A, h);
  });
}

void masked_backward_cuda(const LoraLinearParams& pb, const at::Tensor& x, const at::Tensor& u,
                          const at::Tensor& lora_A, at::Tensor& grad_x, at::Tensor& grad_A) {
  dispatch_dtype<DtypeSet::kF32F16BF16F64>("lora_linear_backward", "x", x.scalar_type(), [&](auto tag) {
    masked_backward_impl<typename decltype(tag)::type>(pb, x, u, lora_A, grad_x, grad_A);
  });
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scale, double dropout_p,
                                                    const at::Tensor& seed, bool fan_in_fan_out) {
  // Validate first: a tensor on another device must get the named error, not a guard failure.
  const LoraLinearParams pb =
      check_lora_linear("lora_linear", x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_forward(pb, x, weight, bias, lora_A, lora_B, &masked_shrink_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& h, double scale, double dropout_p, const at::Tensor& seed,
    bool fan_in_fan_out, std::array<bool, 5> output_mask) {
  const char* op = "lora_linear_backward";
  const LoraLinearParams pb =
      check_lora_linear(op, x, weight, std::nullopt, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out);
  check_lora_linear_grads(op, pb, x, grad_y, h);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_backward(pb, grad_y, x, weight, lora_A, lora_B, h, output_mask, &masked_backward_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> lora_multi_cuda(const at::Tensor& x, at::TensorList lora_A,
                                                              at::TensorList lora_B, at::ArrayRef<double> scales,
                                                              at::ArrayRef<double> dropout_p, at::IntArrayRef seeds,
                                                              at::IntArrayRef tok_ptr, const at::Tensor& tok_idx) {
  const auto pbs = check_lora_multi("lora_multi", x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_multi_forward(pbs, x, lora_A, lora_B, tok_ptr, tok_idx, &masked_shrink_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B, at::TensorList h,
    at::ArrayRef<double> scales, at::ArrayRef<double> dropout_p, at::IntArrayRef seeds, at::IntArrayRef tok_ptr,
    const at::Tensor& tok_idx, std::array<bool, 3> output_mask) {
  const char* op = "lora_multi_backward";
  const auto pbs = check_lora_multi(op, x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_multi_backward(op, pbs, grad_y, x, lora_A, lora_B, h, tok_ptr, tok_idx, output_mask,
                             &masked_backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(pylora, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
  m.impl("lora_multi", &lora_multi_cuda);
  m.impl("lora_multi_backward", &lora_multi_backward_cuda);
}

}  // namespace pylora
