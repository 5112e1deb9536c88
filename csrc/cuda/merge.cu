// merge_cuda / unmerge_cuda: S[P, Q] (+|-)= s * U[P, r] @ V[r, Q] with the element arithmetic of
// common/merge_math.h (explicit __fmaf_rn, so the bits equal the CPU kernel's and the reference's).
//
// A block takes kRows consecutive storage rows and one record chunk of columns (up to 4096); each
// thread owns one column at a time and keeps kRows accumulators, so every V load feeds kRows fmas
// and the kRows values of U[p, k] come from shared memory as one float4.
// merge_ is two passes: pass A checks every result for finiteness and counts the record entries of
// each chunk without writing; the host sizes the record from those counts (one sync, which the
// data-dependent output sizes need anyway); pass B writes the weight and the record, in column order
// inside each chunk (a block-wide scan), so the record is identical to the CPU kernel's.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/merge_math.h"
#include "../common/merge_params.h"
#include "../common/merge_problem.h"
#include "../common/merge_record.h"

namespace pylora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;
// Shared memory holds U for the block's rows as [r] float4s: r <= 2048 is 32 KiB, under the 48 KiB
// a launch gets without opting in, with room for the scan's scratch.
constexpr int64_t kMaxRank = 2048;

// Loads U[p0 .. p0+kRows-1, :] as u4[k] = (U[p0, k], U[p0+1, k], ...), zero for rows past P.
template <class bits_t>
__device__ __forceinline__ void load_u(float4* u4, const MergeParams<bits_t>& g, int64_t p0) {
  const float* __restrict__ U = g.U;
  for (int64_t k = threadIdx.x; k < g.r; k += blockDim.x) {
    float v[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) v[i] = (p0 + i < g.P) ? U[(p0 + i) * g.r + k] : 0.f;
    u4[k] = make_float4(v[0], v[1], v[2], v[3]);
  }
  __syncthreads();
}

// acc[i] = fma chain over k of U[p0 + i, k] * V[k, q] (k in order, one rounding per fma).
template <class bits_t>
__device__ __forceinline__ void lora_acc(const float4* __restrict__ u4, const MergeParams<bits_t>& g, int64_t q,
                                         float (&acc)[kRows]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = 0.f;
  const float* v = g.V + q;
  for (int64_t k = 0; k < g.r; ++k, v += g.Q) {
    const float x = __ldg(v);
    const float4 u = u4[k];
    acc[0] = __fmaf_rn(u.x, x, acc[0]);
    acc[1] = __fmaf_rn(u.y, x, acc[1]);
    acc[2] = __fmaf_rn(u.z, x, acc[2]);
    acc[3] = __fmaf_rn(u.w, x, acc[3]);
  }
}

// Record class of one element: 0 nothing, 1 an entry (column and delta), 2 an escape.
template <class S>
__device__ __forceinline__ int record_class(typename S::bits_t w, typename S::bits_t c, int32_t& delta) {
  if (c == w) return 0;
  const auto d = S::key(w) - S::key(c);
  if (d >= mm::kMinDelta && d <= mm::kMaxDelta) {
    delta = static_cast<int32_t>(d);
    return 1;
  }
  return 2;
}

__device__ __forceinline__ int block_sum(int v, int* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Pass A: per chunk, how many entries and escapes; the first non-finite result.
template <class S>
__global__ void __launch_bounds__(kThreads) merge_count_kernel(const MergeParams<typename S::bits_t> g,
                                                               int16_t* __restrict__ counts,
                                                               int32_t* __restrict__ esc_counts,
                                                               unsigned long long* __restrict__ first_bad) {
  extern __shared__ float4 u4[];
  __shared__ int scratch[kWarps];
  const typename S::bits_t* __restrict__ W = g.W;  // read only in this pass
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kRows, cb = blockIdx.y;
  load_u(u4, g, p0);
  const int64_t q_begin = cb * mm::kChunk, q_end = min(g.Q, q_begin + mm::kChunk);
  int n_small[kRows] = {}, n_esc[kRows] = {};
  for (int64_t q = q_begin + threadIdx.x; q < q_end; q += kThreads) {
    float acc[kRows];
    lora_acc(u4, g, q, acc);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t p = p0 + i;
      if (p >= g.P) break;
      const auto w = W[p * g.Q + q];
      bool ok;
      const auto y = mm::merged<S>(w, g.s, acc[i], ok);
      if (!ok) atomicMin(first_bad, static_cast<unsigned long long>(p * g.Q + q));
      int32_t d;
      const int cls = record_class<S>(w, mm::unmerged<S>(y, g.s, acc[i]), d);
      n_small[i] += cls == 1;
      n_esc[i] += cls == 2;
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int a = block_sum(n_small[i], scratch);
    const int e = block_sum(n_esc[i], scratch);
    if (threadIdx.x == 0 && p0 + i < g.P) {
      counts[(p0 + i) * g.nb + cb] = static_cast<int16_t>(a);  // <= kChunk
      esc_counts[(p0 + i) * g.nb + cb] = e;
    }
  }
}

// Pass B: writes the merged weight and the record at the offsets pass A's counts gave.
template <class S>
__global__ void __launch_bounds__(kThreads) merge_write_kernel(
    const MergeParams<typename S::bits_t> g, const int64_t* __restrict__ small_start,
    const int64_t* __restrict__ esc_start, int16_t* __restrict__ entries, int64_t* __restrict__ esc_index,
    typename S::bits_t* __restrict__ esc_value) {
  extern __shared__ float4 u4[];
  // warp totals of the 2 * kRows flags of one column step
  __shared__ int warp_tot[2 * kRows][kWarps];
  typename S::bits_t* __restrict__ W = g.W;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kRows, cb = blockIdx.y;
  load_u(u4, g, p0);
  const int64_t q_begin = cb * mm::kChunk, q_end = min(g.Q, q_begin + mm::kChunk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  int64_t cursor[2 * kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t chunk = (p0 + i < g.P) ? (p0 + i) * g.nb + cb : 0;
    cursor[i] = small_start[chunk];
    cursor[kRows + i] = esc_start[chunk];
  }
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kThreads) {  // uniform trip count: the scan syncs
    const int64_t q = q0 + threadIdx.x;
    int cls[kRows] = {};
    int32_t d[kRows] = {};
    typename S::bits_t w[kRows] = {};
    if (q < q_end) {
      float acc[kRows];
      lora_acc(u4, g, q, acc);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int64_t p = p0 + i;
        if (p >= g.P) break;
        w[i] = W[p * g.Q + q];
        bool ok;
        const auto y = mm::merged<S>(w[i], g.s, acc[i], ok);
        cls[i] = record_class<S>(w[i], mm::unmerged<S>(y, g.s, acc[i]), d[i]);
        W[p * g.Q + q] = y;
      }
    }
    unsigned ballots[2 * kRows];
#pragma unroll
    for (int f = 0; f < 2 * kRows; ++f) {
      ballots[f] = __ballot_sync(0xffffffffu, cls[f % kRows] == 1 + f / kRows);
      if (lane == 0) warp_tot[f][warp] = __popc(ballots[f]);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < 2 * kRows; ++f) {
      int before = 0, total = 0;
#pragma unroll
      for (int w2 = 0; w2 < kWarps; ++w2) {
        before += (w2 < warp) ? warp_tot[f][w2] : 0;
        total += warp_tot[f][w2];
      }
      const int64_t pos = cursor[f] + before + __popc(ballots[f] & lanes_below);
      const int i = f % kRows;
      if (cls[i] == 1 + f / kRows) {
        if (f < kRows) {
          entries[pos] = mm::pack_entry(static_cast<int32_t>(q - q_begin), d[i]);
        } else {
          esc_index[pos] = (p0 + i) * g.Q + q;
          esc_value[pos] = w[i];
        }
      }
      cursor[f] += total;
    }
    __syncthreads();  // warp_tot is rewritten by the next step
  }
}

// w = R(fma(+-s, acc, w)) in place: unmerge_'s candidates (kMerge false) or the merge without a record.
template <class S, bool kMerge>
__global__ void __launch_bounds__(kThreads) apply_kernel(const MergeParams<typename S::bits_t> g) {
  extern __shared__ float4 u4[];
  typename S::bits_t* __restrict__ W = g.W;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kRows, cb = blockIdx.y;
  load_u(u4, g, p0);
  const int64_t q_begin = cb * mm::kChunk, q_end = min(g.Q, q_begin + mm::kChunk);
  for (int64_t q = q_begin + threadIdx.x; q < q_end; q += kThreads) {
    float acc[kRows];
    lora_acc(u4, g, q, acc);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t p = p0 + i;
      if (p >= g.P) break;
      if constexpr (kMerge) {
        bool ok;
        W[p * g.Q + q] = mm::merged<S>(W[p * g.Q + q], g.s, acc[i], ok);
      } else {
        W[p * g.Q + q] = mm::unmerged<S>(W[p * g.Q + q], g.s, acc[i]);
      }
    }
  }
}

// The launch grid: one block per kRows storage rows and record chunk; the CUDA kernels' limits checked.
dim3 launch_grid(const char* op, const MergeParams<void>& g) {
  TORCH_CHECK_VALUE(g.r <= kMaxRank, op, ": lora_A.size(0)=", g.r, " (r) exceeds the CUDA kernel's limit ", kMaxRank);
  const int64_t groups = (g.P + kRows - 1) / kRows;
  TORCH_CHECK_VALUE(groups <= std::numeric_limits<int32_t>::max() && g.nb <= 65535, op,
                    ": weight.shape is too large for the CUDA launch grid");
  return dim3(static_cast<unsigned>(groups), static_cast<unsigned>(g.nb));
}

template <class S>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_impl(const MergeProblem& mp, bool record) {
  using bits_t = typename S::bits_t;
  const dim3 grid = launch_grid("merge_", mp.params);
  const MergeParams<bits_t> g = mp.params.as<bits_t>();
  const auto opt = mp.S.options();
  auto counts = at::zeros({mp.num_chunks()}, opt.dtype(at::kShort));
  auto esc_counts = at::zeros({mp.num_chunks()}, opt.dtype(at::kInt));
  auto first_bad = at::full({1}, -1, opt.dtype(at::kLong));  // all ones: the largest unsigned value
  if (mp.S.numel() == 0) {
    return {counts, at::empty({0}, opt.dtype(at::kShort)), at::empty({0}, opt.dtype(at::kLong)), at::empty({0}, opt)};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t shmem = static_cast<size_t>(g.r) * sizeof(float4);
  merge_count_kernel<S><<<grid, kThreads, shmem, stream>>>(
      g, counts.data_ptr<int16_t>(), esc_counts.data_ptr<int32_t>(),
      reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t bad = first_bad.item<int64_t>();
  if (bad != -1) fail_nonfinite("merge_", mp, bad);
  if (!record) {
    apply_kernel<S, true><<<grid, kThreads, shmem, stream>>>(g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return empty_record(mp);
  }
  const auto small_incl = at::cumsum(counts, 0, at::kLong);
  const auto esc_incl = at::cumsum(esc_counts, 0, at::kLong);
  const int64_t M = small_incl[-1].item<int64_t>(), E = esc_incl[-1].item<int64_t>();
  const auto small_start = small_incl - counts;
  const auto esc_start = esc_incl - esc_counts;
  auto entries = at::empty({M}, opt.dtype(at::kShort));
  auto esc_index = at::empty({E}, opt.dtype(at::kLong));
  auto esc_value = at::empty({E}, opt);
  merge_write_kernel<S><<<grid, kThreads, shmem, stream>>>(
      g, small_start.const_data_ptr<int64_t>(), esc_start.const_data_ptr<int64_t>(), entries.data_ptr<int16_t>(),
      esc_index.data_ptr<int64_t>(), reinterpret_cast<bits_t*>(esc_value.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, entries, esc_index, esc_value};
}

template <class S>
void unmerge_impl(const MergeProblem& mp) {
  using bits_t = typename S::bits_t;
  const dim3 grid = launch_grid("unmerge_", mp.params);
  if (mp.S.numel() == 0) return;
  const MergeParams<bits_t> g = mp.params.as<bits_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  apply_kernel<S, false><<<grid, kThreads, static_cast<size_t>(g.r) * sizeof(float4), stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_cuda(at::Tensor& weight,
                                                                                 const at::Tensor& lora_A,
                                                                                 const at::Tensor& lora_B,
                                                                                 double scale, bool fan_in_fan_out,
                                                                                 bool record) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const MergeProblem mp = prepare_merge("merge_", weight, lora_A, lora_B, scale, fan_in_fan_out);
  return dispatch_storage("merge_", mp.S.scalar_type(),
                          [&](auto tag) { return merge_impl<typename decltype(tag)::type>(mp, record); });
}

void unmerge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                  bool fan_in_fan_out, const at::Tensor& counts, const at::Tensor& entries, const at::Tensor& esc_index,
                  const at::Tensor& esc_value) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const MergeProblem mp = prepare_merge("unmerge_", weight, lora_A, lora_B, scale, fan_in_fan_out);
  check_record_layout("unmerge_", mp, counts, entries, esc_index, esc_value);
  const at::Tensor entry_index = check_record_contents("unmerge_", mp, counts, entries, esc_index);
  dispatch_storage("unmerge_", mp.S.scalar_type(),
                   [&](auto tag) { unmerge_impl<typename decltype(tag)::type>(mp); });
  apply_record(mp, entry_index, entries, esc_index, esc_value);
}

}  // namespace

TORCH_LIBRARY_IMPL(pylora, CUDA, m) {
  m.impl("merge_", &merge_cuda);
  m.impl("unmerge_", &unmerge_cuda);
}

}  // namespace pylora
