// lora_apply_cpu: y[t] += scales[s] * B_s (A_s x[t]) over a paged pool of rank rows (see csrc/ops.cpp).
//
// Strategy. The plan is on the host, so the segments are first grouped by slot: every token of a
// slot, from all its segments, forms one group, and each used adapter's rows are then read once per
// call whether its tokens arrive as one prefill segment (SGMV) or as scattered decode tokens (BGMV).
// Per group, two small GEMMs over the gathered rows, with no copies (rows are addressed through the
// pool's row indices, tokens through a token list):
//   shrink  H[n, r] = X_g[n, I] A_s[r, I]^T     (fp32, register-blocked dot products over I)
//   expand  Y_g[n, O] = R(Y_g + s H B_s[r, O])  (fp32 accumulators, one rounding into y per element)
// Each phase is cut into tasks of similar work (a group's rows or columns first, its tokens only when
// one block of rows is too much) that the threads take from a shared counter, so 64 one-token groups
// and one 300-token group both spread over the cores. The only workspace is H (sum of n * r floats),
// proportional to the batch, never to the pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "../common/lora_apply_args.h"
#include "vec.h"

namespace pylora {
namespace {

using vec::W;

// Register blocking (accumulators stay in registers across the whole reduction):
// shrink: kShrinkRT tokens x kShrinkRR rows of dot products; expand: kExpandRT tokens x kExpandCV
// vectors of columns; a one-token expand (decode) takes kDecodeCV vectors, loading B from memory operands.
#if defined(__AVX512F__)
constexpr int kShrinkRT = 3, kShrinkRR = 8;  // 24 zmm accumulators + 3 x + 1 A
constexpr int kExpandRT = 4, kExpandCV = 4;  // 16 accumulators + 4 B + 1 h
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int kShrinkRT = 2, kShrinkRR = 4;  // 8 ymm accumulators + 2 x + 1 A
constexpr int kExpandRT = 2, kExpandCV = 4;  // 8 accumulators + 4 B + 1 h
#else
constexpr int kShrinkRT = 2, kShrinkRR = 4;
constexpr int kExpandRT = 2, kExpandCV = 2;
#endif
constexpr int kDecodeCV = 8;

// One slot's tokens: tok[tok0, tok0 + n) index y / x; its rows are rows[0, r); H_g at h + h_off, [n, r].
struct Group {
  const int32_t* rows;
  int64_t r, tok0, n, h_off;
  float scale;
};

// A rectangle of one group's work: tokens [t0, t1) (group-local) x rows or columns [a0, a1).
struct Task {
  int64_t g, t0, t1, a0, a1;
};

template <class T>
struct Ctx {
  T* y;
  const T *x, *A, *B;
  int64_t ldy, ldx, lda, ldb, I, O;
  const int64_t* tok;
  const Group* groups;
  float* h;
};

// h[t * ldh + j] = sum_i x_t[i] * a_j[i] (fp32) for t < RT, j < RR.
template <int RT, int RR, class T>
inline void dot_block(const T* const* xr, const T* const* ar, int64_t K, float* h, int64_t ldh) {
  vec::V acc[RT][RR];
  for (int t = 0; t < RT; ++t)
    for (int j = 0; j < RR; ++j) acc[t][j] = vec::zero();
  int64_t i = 0;
  for (; i + W <= K; i += W) {
    vec::V xv[RT];
    for (int t = 0; t < RT; ++t) xv[t] = vec::load(xr[t] + i);
    for (int j = 0; j < RR; ++j) {
      const vec::V av = vec::load(ar[j] + i);
      for (int t = 0; t < RT; ++t) acc[t][j] = vec::fma(xv[t], av, acc[t][j]);
    }
  }
  for (int t = 0; t < RT; ++t) {
    for (int j = 0; j < RR; ++j) {
      float s = vec::hsum(acc[t][j]);
      for (int64_t k = i; k < K; ++k) s += vec::to_f(xr[t][k]) * vec::to_f(ar[j][k]);
      h[t * ldh + j] = s;
    }
  }
}

// Rows [j0, j1) of group g for the RT tokens xr: blocks of kShrinkRR rows, then 4, then single rows.
template <int RT, class T>
void shrink_rows(const Ctx<T>& c, const Group& g, const T* const* xr, float* h, int64_t j0, int64_t j1) {
  const T* ar[kShrinkRR];
  int64_t j = j0;
  for (; j + kShrinkRR <= j1; j += kShrinkRR) {
    for (int k = 0; k < kShrinkRR; ++k) ar[k] = c.A + g.rows[j + k] * c.lda;
    dot_block<RT, kShrinkRR>(xr, ar, c.I, h + j, g.r);
  }
  if (kShrinkRR > 4 && j + 4 <= j1) {
    for (int k = 0; k < 4; ++k) ar[k] = c.A + g.rows[j + k] * c.lda;
    dot_block<RT, 4>(xr, ar, c.I, h + j, g.r);
    j += 4;
  }
  for (; j < j1; ++j) {
    ar[0] = c.A + g.rows[j] * c.lda;
    dot_block<RT, 1>(xr, ar, c.I, h + j, g.r);
  }
}

template <int RT, class T>
void shrink_tokens(const Ctx<T>& c, const Group& g, int64_t t, int64_t nt, int64_t j0, int64_t j1) {
  if constexpr (RT > 1) {
    if (nt < RT) return shrink_tokens<RT - 1>(c, g, t, nt, j0, j1);
  }
  const T* xr[RT];
  for (int k = 0; k < RT; ++k) xr[k] = c.x + c.tok[g.tok0 + t + k] * c.ldx;
  shrink_rows<RT>(c, g, xr, c.h + g.h_off + t * g.r, j0, j1);
}

// Tokens outermost: a token block's x rows stay in L1 while the task's A rows (capped in size when
// the tasks are cut) come from L2.
template <class T>
void shrink_task(const Ctx<T>& c, const Task& k) {
  const Group& g = c.groups[k.g];
  for (int64_t t = k.t0; t < k.t1; t += kShrinkRT)
    shrink_tokens<kShrinkRT>(c, g, t, std::min<int64_t>(kShrinkRT, k.t1 - t), k.a0, k.a1);
}

// y_t[o + q] = R(y_t[o + q] + s * sum_j h_t[j] * B[rows[j], o + q]) for t < RT, q < CV * W.
template <int RT, int CV, class T>
inline void expand_block(const Ctx<T>& c, const Group& g, const float* h, T* const* yr, int64_t o) {
  vec::V acc[RT][CV];
  for (int t = 0; t < RT; ++t)
    for (int q = 0; q < CV; ++q) acc[t][q] = vec::zero();
  for (int64_t j = 0; j < g.r; ++j) {
    const T* b = c.B + g.rows[j] * c.ldb + o;
    vec::V bv[CV];
    for (int q = 0; q < CV; ++q) bv[q] = vec::load(b + q * W);
    for (int t = 0; t < RT; ++t) {
      const vec::V hv = vec::set1(h[t * g.r + j]);
      for (int q = 0; q < CV; ++q) acc[t][q] = vec::fma(hv, bv[q], acc[t][q]);
    }
  }
  const vec::V sv = vec::set1(g.scale);
  for (int t = 0; t < RT; ++t)
    for (int q = 0; q < CV; ++q) {
      T* yp = yr[t] + o + q * W;
      vec::store(yp, vec::fma(sv, acc[t][q], vec::load(yp)));
    }
}

// Columns [o, o1) with o1 - o < W, one at a time.
template <class T>
void expand_tail(const Ctx<T>& c, const Group& g, const float* h, T* const* yr, int nt, int64_t o, int64_t o1) {
  for (int t = 0; t < nt; ++t) {
    for (int64_t q = o; q < o1; ++q) {
      float acc = 0.f;
      for (int64_t j = 0; j < g.r; ++j) acc += h[t * g.r + j] * vec::to_f(c.B[g.rows[j] * c.ldb + q]);
      yr[t][q] = vec::from_f<T>(vec::to_f(yr[t][q]) + g.scale * acc);
    }
  }
}

template <int CV, int RT, class T>
void expand_tokens(const Ctx<T>& c, const Group& g, int64_t t, int64_t nt, int64_t o) {
  if constexpr (RT > 1) {
    if (nt < RT) return expand_tokens<CV, RT - 1>(c, g, t, nt, o);
  }
  T* yr[RT];
  for (int k = 0; k < RT; ++k) yr[k] = c.y + c.tok[g.tok0 + t + k] * c.ldy;
  expand_block<RT, CV>(c, g, c.h + g.h_off + t * g.r, yr, o);
}

// Columns outermost: one column block of B (r rows) stays in L1 while the task's tokens pass over it.
template <class T>
void expand_task(const Ctx<T>& c, const Task& k) {
  const Group& g = c.groups[k.g];
  int64_t o = k.a0;
  if (k.t1 - k.t0 == 1) {
    for (; o + kDecodeCV * W <= k.a1; o += kDecodeCV * W) expand_tokens<kDecodeCV, 1>(c, g, k.t0, 1, o);
  }
  for (; o + kExpandCV * W <= k.a1; o += kExpandCV * W)
    for (int64_t t = k.t0; t < k.t1; t += kExpandRT)
      expand_tokens<kExpandCV, kExpandRT>(c, g, t, std::min<int64_t>(kExpandRT, k.t1 - t), o);
  for (; o + W <= k.a1; o += W)
    for (int64_t t = k.t0; t < k.t1; t += kExpandRT)
      expand_tokens<1, kExpandRT>(c, g, t, std::min<int64_t>(kExpandRT, k.t1 - t), o);
  if (o < k.a1) {
    for (int64_t t = k.t0; t < k.t1; t += kExpandRT) {
      const int nt = static_cast<int>(std::min<int64_t>(kExpandRT, k.t1 - t));
      T* yr[kExpandRT];
      for (int q = 0; q < nt; ++q) yr[q] = c.y + c.tok[g.tok0 + t + q] * c.ldy;
      expand_tail(c, g, c.h + g.h_off + t * g.r, yr, nt, o, k.a1);
    }
  }
}

// Cuts group g's [n tokens x m units] (units: rows for shrink, columns for expand; `k` fmas per token
// and unit) into tasks of about `work` fmas: units first, in multiples of uq and at most max_units (an
// L2-sized slice of the adapter), all tokens per task; tokens (multiples of tq) only when one quantum
// of units is already too much work.
void cut(std::vector<Task>& out, int64_t g, int64_t n, int64_t m, int64_t k, int64_t work, int64_t uq, int64_t tq,
         int64_t max_units) {
  int64_t units = m, toks = n;
  if (n * m * k > work || m > max_units) {
    const int64_t u = work / std::max<int64_t>(1, n * k) / uq * uq;
    if (u >= uq) {
      units = std::min({m, u, max_units});
    } else {
      units = std::min(m, uq);
      toks = std::min(n, std::max(tq, work / std::max<int64_t>(1, units * k) / tq * tq));
    }
  }
  for (int64_t t0 = 0; t0 < n; t0 += toks)
    for (int64_t a0 = 0; a0 < m; a0 += units) out.push_back(Task{g, t0, std::min(n, t0 + toks), a0, std::min(m, a0 + units)});
}

// Runs f(task) for every task; threads take the next task from a shared counter, so tasks of uneven
// size still balance. Inside an enclosing parallel region at::parallel_for runs inline.
template <class F>
void run_tasks(const std::vector<Task>& tasks, const F& f) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(tasks[i]);
  });
}

// Work per task: enough to amortise taking one (~32k fmas, a few microseconds), and about four tasks
// per thread when there is more.
int64_t task_work(int64_t total) {
  constexpr int64_t kMinWork = 32768, kTasksPerThread = 4;
  return std::max(kMinWork, total / (kTasksPerThread * std::max(1, at::get_num_threads())));
}

constexpr int64_t kSliceBytes = 256 * 1024;  // the slice of A or B one task keeps hot (half an L2)

template <class T>
void lora_apply_impl(const LoraApplyArgs& a) {
  if (a.T == 0 || a.O == 0) return;
  const int32_t* rp = a.row_ptr.const_data_ptr<int32_t>();
  const int32_t* ri = a.row_idx.const_data_ptr<int32_t>();
  const int32_t* sp = a.seg_ptr.const_data_ptr<int32_t>();
  const int32_t* ss = a.seg_slot.const_data_ptr<int32_t>();
  const float* sc = a.scales.const_data_ptr<float>();

  // Group the segments by slot (stable, so a slot's tokens keep their order). Segments with no
  // adapter, no tokens or a rank-0 slot add nothing and are left out: y keeps its bits there.
  std::vector<int64_t> segs;
  segs.reserve(a.S);
  for (int64_t g = 0; g < a.S; ++g) {
    const int32_t s = ss[g];
    if (s >= 0 && sp[g + 1] > sp[g] && rp[s + 1] > rp[s]) segs.push_back(g);
  }
  std::stable_sort(segs.begin(), segs.end(), [&](int64_t u, int64_t v) { return ss[u] < ss[v]; });
  std::vector<Group> groups;
  std::vector<int64_t> tok;
  int64_t h_size = 0;
  for (size_t k = 0; k < segs.size(); ++k) {
    const int32_t s = ss[segs[k]];
    if (k == 0 || ss[segs[k - 1]] != s) {
      if (!groups.empty()) h_size += groups.back().n * groups.back().r;
      groups.push_back(Group{ri + rp[s], rp[s + 1] - rp[s], static_cast<int64_t>(tok.size()), 0, h_size, sc[s]});
    }
    for (int64_t t = sp[segs[k]]; t < sp[segs[k] + 1]; ++t) tok.push_back(t);
    groups.back().n += sp[segs[k] + 1] - sp[segs[k]];
  }
  if (groups.empty()) return;
  h_size += groups.back().n * groups.back().r;
  std::unique_ptr<float[]> h(new float[h_size]);

  Ctx<T> c{static_cast<T*>(a.y.data_ptr()),
           static_cast<const T*>(a.x.const_data_ptr()),
           static_cast<const T*>(a.A.const_data_ptr()),
           static_cast<const T*>(a.B.const_data_ptr()),
           a.ldy, a.ldx, a.lda, a.ldb, a.I, a.O, tok.data(), groups.data(), h.get()};

  int64_t shrink_total = 0, expand_total = 0;
  for (const Group& g : groups) {
    shrink_total += g.n * g.r * std::max<int64_t>(a.I, 1);
    expand_total += g.n * g.r * a.O;
  }
  const int64_t elt = static_cast<int64_t>(sizeof(T));
  std::vector<Task> tasks;
  const int64_t shrink_work = task_work(shrink_total);
  for (int64_t k = 0; k < static_cast<int64_t>(groups.size()); ++k) {
    const int64_t max_rows = std::max<int64_t>(kShrinkRR, kSliceBytes / std::max<int64_t>(1, a.I * elt));
    cut(tasks, k, groups[k].n, groups[k].r, std::max<int64_t>(a.I, 1), shrink_work, kShrinkRR, 4 * kShrinkRT,
        max_rows);
  }
  run_tasks(tasks, [&](const Task& k) { shrink_task(c, k); });

  tasks.clear();
  const int64_t expand_work = task_work(expand_total);
  for (int64_t k = 0; k < static_cast<int64_t>(groups.size()); ++k) {
    const int64_t cols = kExpandCV * W;
    const int64_t max_cols = std::max<int64_t>(cols, kSliceBytes / (groups[k].r * elt) / cols * cols);
    cut(tasks, k, groups[k].n, a.O, groups[k].r, expand_work, cols, 4 * kExpandRT, max_cols);
  }
  run_tasks(tasks, [&](const Task& k) { expand_task(c, k); });
}

void lora_apply_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& A_rows, const at::Tensor& B_rows,
                    const at::Tensor& row_ptr, const at::Tensor& row_idx, const at::Tensor& scales,
                    const at::Tensor& seg_ptr, const at::Tensor& seg_slot) {
  LoraApplyArgs a = prepare_lora_apply("lora_apply_", y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot);
  switch (a.y.scalar_type()) {
    case at::kFloat: lora_apply_impl<float>(a); break;
    case at::kHalf: lora_apply_impl<c10::Half>(a); break;
    default: lora_apply_impl<c10::BFloat16>(a); break;
  }
  finish_lora_apply(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(pylora, CPU, m) { m.impl("lora_apply_", &lora_apply_cpu); }

}  // namespace pylora
