// lora_apply_cuda: y[t] += scales[s] * B_s (A_s x[t]) over a paged pool of rank rows (see csrc/ops.cpp).
//
// The plan (segments, slots, row pointers) stays on the device: reading it on the host would
// synchronise, and a server calls this once per wrapped module per forward. So the launch is sized
// from tensor sizes alone and every block finds its work, and checks every index, on the device.
//
// One fused kernel, no workspace. A block takes a tile of up to kTT tokens of one segment and a range
// of output columns:
//   shrink  h[t, j] = A_rows[rows(s)[j]] . x[t] into shared memory (fp32): a warp per group of kRW
//           rows, lanes striding over I with 16-byte loads, one x load feeding kRW rows;
//   expand  each thread owns 4 consecutive columns and keeps kTT x 4 fp32 accumulators over all r
//           rows (one B load feeds kTT tokens), then y = R(y + s * acc), one rounding per element.
// Decode: a segment of one token is a tile of one token (BGMV): the block streams the adapter's rows
// once for it, with the whole shared buffer for h (ranks up to kHs in one pass). Prefill: a long
// segment is cut into tiles of kTT tokens (SGMV); each tile gathers the adapter's rows once and reuses
// every load across its tokens (the adapter stays in L2 across tiles). Ranks past a pass (kHs / kTT
// for a tile) are done in chunks, the shrink then repeated per column block, so any rank works.
// Few tiles (small batches) split the columns over gridDim.y so that every SM streams a share of B.
//
// Grid x: block g < S takes the first tile of segment g; block S + k takes the tokens of global tile
// [k kTT, (k+1) kTT) that lie past the first tile of their segment (at most one segment's: first
// tiles are kTT long, so two such ranges are at least kTT apart). S + ceil(T / kTT) blocks cover
// every tile of any plan; the blocks with nothing to do return at once.
//
// Guards: token ranges and row pointers are clamped to [0, T] and [0, nnz]; a slot outside [0, N) or
// a row outside [0, P) is skipped. A bad plan gives a wrong result, never a read or write outside the
// tensors. Each token's sums run in an order fixed by I, r and the column, so a token gives the same
// bits alone or in any batch (for the same vector path).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/dtypes.h"
#include "../common/lora_apply_params.h"
#include "../common/lora_apply_problem.h"

namespace pylora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTT = 8;     // tokens per prefill tile
constexpr int kRW = 4;     // rows per warp in the shrink
constexpr int kHs = 4096;  // shared fp32 h: kHs / tokens-per-tile rows per pass

// The call's parameters (common/lora_apply_params.h) and the launch's column split.
template <class T>
struct Params : LoraApplyParams<T> {
  int64_t cols_per_y;  // output columns per blockIdx.y, a multiple of 32 * VB
};

struct Tile {
  int64_t t0, n;      // tokens [t0, t0 + n), n <= kTT
  int64_t p0, r;      // rows row_idx[p0, p0 + r)
  float scale;
};

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Raw vector of V elements of T: one 16-byte or 8-byte access when V > 1 (the host checked alignment).
template <class T, int V>
struct alignas(V * sizeof(T)) Packed {
  T e[V];
};

// Loads V consecutive elements as fp32 (read-only path: x and the pool).
template <class T, int V>
__device__ __forceinline__ void load_f(const T* p, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = static_cast<float>(p[0]);
  } else {
    static_assert(V * sizeof(T) == 16 || V * sizeof(T) == 8, "vector accesses are 8 or 16 bytes");
    using U = std::conditional_t<V * sizeof(T) == 16, uint4, uint2>;
    const U u = __ldg(reinterpret_cast<const U*>(p));
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int v = 0; v < V; ++v) f[v] = static_cast<float>(e[v]);
  }
}

template <class T, int V>
__device__ __forceinline__ void load_y(const T* p, float (&f)[V]) {
  const Packed<T, V> u = *reinterpret_cast<const Packed<T, V>*>(p);
#pragma unroll
  for (int v = 0; v < V; ++v) f[v] = static_cast<float>(u.e[v]);
}

template <class T, int V>
__device__ __forceinline__ void store_y(T* p, const float (&f)[V]) {
  Packed<T, V> u;
#pragma unroll
  for (int v = 0; v < V; ++v) u.e[v] = static_cast<T>(f[v]);
  *reinterpret_cast<Packed<T, V>*>(p) = u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Pool row of position j of the tile's slot, or -1 when row_idx holds a value outside [0, P).
template <class T>
__device__ __forceinline__ int64_t pool_row(const Params<T>& p, const Tile& tile, int64_t j) {
  const int64_t row = __ldg(p.row_idx + tile.p0 + j);
  return (row >= 0 && row < p.P) ? row : -1;
}

// Finds this block's tile; false when it has none.
template <class T>
__device__ bool find_tile(const Params<T>& p, Tile& tile) {
  int64_t g, lo, hi;
  const int64_t b = blockIdx.x;
  if (b < p.S) {
    g = b;
    lo = 0;
    hi = p.T;
  } else {
    lo = (b - p.S) * kTT;
    hi = min(lo + kTT, p.T);
    if (lo >= hi) return false;
    // The last segment whose start is <= lo (with a valid plan, the one holding token lo).
    int64_t a = 0, z = p.S;
    while (a < z) {
      const int64_t mid = (a + z + 1) / 2;
      if (__ldg(p.seg_ptr + mid) <= lo) a = mid; else z = mid - 1;
    }
    if (a >= p.S) return false;
    g = a;
  }
  const int64_t start = clamp64(__ldg(p.seg_ptr + g), 0, p.T);
  const int64_t end = clamp64(__ldg(p.seg_ptr + g + 1), 0, p.T);
  int64_t t0, t1;
  if (b < p.S) {
    t0 = start;
    t1 = min(end, start + kTT);
  } else {
    t0 = max(lo, start + kTT);
    t1 = min(hi, end);
  }
  if (t1 <= t0) return false;
  const int64_t s = __ldg(p.seg_slot + g);
  if (s < 0 || s >= p.N) return false;
  const int64_t p0 = clamp64(__ldg(p.row_ptr + s), 0, p.nnz);
  const int64_t p1 = clamp64(__ldg(p.row_ptr + s + 1), 0, p.nnz);
  if (p1 <= p0) return false;
  tile = Tile{t0, t1 - t0, p0, p1 - p0, __ldg(p.scales + s)};
  return true;
}

// h[t * ld + j - j0] = A_rows[row(j)] . x[t0 + t] for j in [j0, j1), t < TT (zero for t >= n and
// skipped rows). Each dot product: lane partial sums over i = lane*VA + k*32*VA in order, then a
// fixed butterfly: the same order for any tile.
template <int TT, int VA, class T>
__device__ void shrink(const Params<T>& p, const Tile& tile, int64_t j0, int64_t j1, float* h, int ld) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t jg = j0 + warp * kRW; jg < j1; jg += kWarps * kRW) {
    const T* arow[kRW];
#pragma unroll
    for (int k = 0; k < kRW; ++k) {
      const int64_t row = (jg + k < j1) ? pool_row(p, tile, jg + k) : -1;
      arow[k] = row >= 0 ? p.A + row * p.lda : nullptr;
    }
    float acc[kRW][TT];
#pragma unroll
    for (int k = 0; k < kRW; ++k)
#pragma unroll
      for (int t = 0; t < TT; ++t) acc[k][t] = 0.f;
    for (int64_t i = static_cast<int64_t>(lane) * VA; i < p.I; i += 32 * VA) {
      float a[kRW][VA];
#pragma unroll
      for (int k = 0; k < kRW; ++k) {
        if (arow[k] != nullptr) {
          load_f<T, VA>(arow[k] + i, a[k]);
        } else {
#pragma unroll
          for (int v = 0; v < VA; ++v) a[k][v] = 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        if (t < tile.n) {
          float xv[VA];
          load_f<T, VA>(p.x + (tile.t0 + t) * p.ldx + i, xv);
#pragma unroll
          for (int k = 0; k < kRW; ++k)
#pragma unroll
            for (int v = 0; v < VA; ++v) acc[k][t] = __fmaf_rn(a[k][v], xv[v], acc[k][t]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kRW; ++k) {
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        const float v = warp_sum(acc[k][t]);
        if (lane == 0 && jg + k < j1) h[t * ld + (jg + k - j0)] = v;
      }
    }
  }
}

// acc[t][v] += sum_{j in [j0, j1)} h[t * ld + j - j0] * B_rows[row(j), o + v] for this thread's columns.
template <int TT, int VB, class T>
__device__ __forceinline__ void expand(const Params<T>& p, const Tile& tile, int64_t j0, int64_t j1,
                                       const float* h, int ld, int64_t o, float (&acc)[TT][VB]) {
  const bool full = o + VB <= p.O;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t row = pool_row(p, tile, j);
    if (row < 0) continue;
    const T* b = p.B + row * p.ldb + o;
    float bv[VB];
    if (full) {
      load_f<T, VB>(b, bv);
    } else {
#pragma unroll
      for (int v = 0; v < VB; ++v) bv[v] = (o + v < p.O) ? static_cast<float>(b[v]) : 0.f;
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      const float hv = h[t * ld + (j - j0)];
#pragma unroll
      for (int v = 0; v < VB; ++v) acc[t][v] = __fmaf_rn(hv, bv[v], acc[t][v]);
    }
  }
}

template <int TT, int VA, int VB, class T>
__device__ void run_tile(const Params<T>& p, const Tile& tile, float* h) {
  constexpr int kRC = kHs / TT;  // rows per pass
  const int64_t o_lo = static_cast<int64_t>(blockIdx.y) * p.cols_per_y;
  const int64_t o_hi = min(p.O, o_lo + p.cols_per_y);
  const int64_t chunks = (tile.r + kRC - 1) / kRC;
  bool have_h = false;  // h holds the one chunk of a rank that fits a pass
  for (int64_t ob = o_lo; ob < o_hi; ob += static_cast<int64_t>(kThreads) * VB) {
    const int64_t o = ob + static_cast<int64_t>(threadIdx.x) * VB;
    const bool active = o < o_hi;
    float acc[TT][VB];
#pragma unroll
    for (int t = 0; t < TT; ++t)
#pragma unroll
      for (int v = 0; v < VB; ++v) acc[t][v] = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j0 = c * kRC, j1 = min(tile.r, j0 + kRC);
      if (!have_h) {
        __syncthreads();  // every thread is done reading the previous chunk
        shrink<TT, VA>(p, tile, j0, j1, h, kRC);
        __syncthreads();
        have_h = chunks == 1;
      }
      if (active) expand<TT, VB>(p, tile, j0, j1, h, kRC, o, acc);
    }
    if (!active) continue;
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      if (t >= tile.n) break;
      T* yp = p.y + (tile.t0 + t) * p.ldy + o;
      if (o + VB <= p.O) {
        float yv[VB];
        load_y<T, VB>(yp, yv);
#pragma unroll
        for (int v = 0; v < VB; ++v) yv[v] = __fmaf_rn(tile.scale, acc[t][v], yv[v]);
        store_y<T, VB>(yp, yv);
      } else {
        for (int v = 0; v < VB && o + v < p.O; ++v)
          yp[v] = static_cast<T>(__fmaf_rn(tile.scale, acc[t][v], static_cast<float>(yp[v])));
      }
    }
  }
}

template <class T, int VA, int VB>
__global__ void __launch_bounds__(kThreads, 2) lora_apply_kernel(const Params<T> p) {
  __shared__ float h[kHs];
  Tile tile;
  if (!find_tile(p, tile)) return;  // uniform across the block
  if (tile.n == 1) {
    run_tile<1, VA, VB>(p, tile, h);
  } else {
    run_tile<kTT, VA, VB>(p, tile, h);
  }
}

int sm_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 1;
  if (counts[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device] = std::max(n, 1);
  }
  return counts[device];
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <class T, int VA, int VB>
void launch(const Params<T>& prm, dim3 grid, cudaStream_t stream) {
  lora_apply_kernel<T, VA, VB><<<grid, kThreads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void lora_apply_impl(const LoraApplyParams<T>& a, int device) {
  if (a.T == 0 || a.O == 0 || a.S == 0) return;
  // Shrink: 16-byte loads of x and A. Expand: 4 columns per thread (16 or 8 bytes), which keeps the
  // kTT x 4 accumulators of a prefill tile in registers. Vector accesses need aligned rows: base
  // pointers, row strides and (for x and A, read to the end of the row) I a multiple of the width;
  // rows of y and B end in a guarded scalar tail.
  constexpr int VA = 16 / sizeof(T), VB = 4;
  const bool va = aligned(a.x, VA * sizeof(T)) && aligned(a.A, VA * sizeof(T)) && a.I % VA == 0 &&
                  (a.ldx % VA == 0 || a.T == 1) && a.lda % VA == 0;
  const bool vb = aligned(a.y, VB * sizeof(T)) && aligned(a.B, VB * sizeof(T)) && (a.ldy % VB == 0 || a.T == 1) &&
                  a.ldb % VB == 0;
  const int64_t vbw = vb ? VB : 1;

  const int64_t blocks_x = a.S + (a.T + kTT - 1) / kTT;
  // Tiles there will be: about one per segment plus the prefill tiles. With fewer than ~2 per SM,
  // split the columns (each split repeats the shrink, reading A from L2) so every SM has work.
  const int64_t tiles = std::min(a.S, a.T) + a.T / kTT;
  const int64_t warp_cols = 32 * vbw;
  const int64_t max_ny = std::min<int64_t>(65535, (a.O + warp_cols - 1) / warp_cols);
  const int64_t want = (2 * sm_count(device) + std::max<int64_t>(tiles, 1) - 1) / std::max<int64_t>(tiles, 1);
  const int64_t ny = std::clamp<int64_t>(want, 1, max_ny);
  const int64_t cols = ((a.O + ny - 1) / ny + warp_cols - 1) / warp_cols * warp_cols;
  TORCH_CHECK_VALUE(blocks_x <= 0x7FFFFFFF, "lora_apply_: S + T/", kTT, "=", blocks_x, " is too large for the CUDA grid");

  const Params<T> prm{a, cols};
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>((a.O + cols - 1) / cols));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (va && vb) {
    launch<T, VA, VB>(prm, grid, stream);
  } else if (va) {
    launch<T, VA, 1>(prm, grid, stream);
  } else if (vb) {
    launch<T, 1, VB>(prm, grid, stream);
  } else {
    launch<T, 1, 1>(prm, grid, stream);
  }
}

void lora_apply_cuda(at::Tensor& y, const at::Tensor& x, const at::Tensor& A_rows, const at::Tensor& B_rows,
                     const at::Tensor& row_ptr, const at::Tensor& row_idx, const at::Tensor& scales,
                     const at::Tensor& seg_ptr, const at::Tensor& seg_slot) {
  const c10::cuda::CUDAGuard guard(y.device());
  const char* op = "lora_apply_";
  LoraApplyProblem a = prepare_lora_apply(op, y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot);
  dispatch_dtype<DtypeSet::kF32F16BF16>(op, "y", a.y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    lora_apply_impl<T>(a.params.as<T>(), a.y.get_device());
  });
  finish_lora_apply(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(pylora, CUDA, m) { m.impl("lora_apply_", &lora_apply_cuda); }

}  // namespace pylora
