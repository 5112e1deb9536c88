// lora_apply_cpu: y[t] += scales[s] * B_s (A_s x[t]) over a paged pool of rank rows (see csrc/ops.cpp).
//
// Strategy. The plan is on the host, so the segments are first grouped by slot: every token of a
// slot, from all its segments, forms one group, and each used adapter's rows are then read from
// memory once per call whether its tokens arrive as one prefill segment (SGMV) or as scattered decode
// tokens (BGMV). Per group, two small GEMMs over the slot's rows, addressed through the pool's row
// indices (tokens through a token list):
//   shrink  H[n, r] = X_g[n, I] A_s[r, I]^T     fp32, register-blocked dot products over I, 8 rows of
//                                               A streamed at a time
//   expand  Y_g[n, O] = R(Y_g + s H B_s[r, O])  fp32 accumulators, one rounding into y per element:
//           - groups of <= 4 tokens (decode, short segments): B rows streamed 8 at a time straight
//             from the pool, each load feeding every token, accumulators in L1;
//           - larger groups (prefill): a panel of B gathered and packed once (fp32, contiguous), then
//             register-blocked over the group's token blocks, the next panel prefetched meanwhile.
// Each phase is cut into tasks of similar work (a group's rows or columns first, its tokens only when
// one block of rows is too much) that the threads take from a shared counter, so 64 one-token groups
// and one 300-token group both spread over the cores. Workspace: H (sum of n * r floats, proportional
// to the batch) and a per-thread panel buffer (proportional to one adapter), never to the pool.
// Every element's fp32 sequence is the same on every path, so a token's result does not depend on
// the rest of the batch or on the thread count. (On every path of one ISA level: the levels' vector
// widths, and the default level's separate multiply and add, give each level its own last bits.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/dtypes.h"
#include "../common/lora_apply_params.h"
#include "../common/lora_apply_problem.h"
#include "kernels.h"
#include "vec.h"

namespace pylora {
namespace cpu {
// One copy per ISA level (common/isa.h): setup.py compiles this file once per level.
namespace PYLORA_ISA_NS {
namespace {

using vec::W;

// Register blocking (accumulators stay in registers across the whole reduction), per vec.h's ISA:
// shrink: kShrinkRT tokens x kShrinkRR rows of dot products; expand: kExpandRT tokens x kExpandCV
// vectors of columns.
//   AVX-512 (32 zmm): shrink 3 x 8 (24 accumulators + 3 x + 1 A), expand 4 x 4 (16 accumulators + 4 B + 1 h)
//   AVX2 (16 ymm):    shrink 2 x 4 (8 accumulators + 2 x + 1 A),  expand 2 x 4 (8 accumulators + 4 B + 1 h)
//   plain C++:        shrink 2 x 4,                               expand 2 x 2
constexpr bool kAvx512 = vec::kIsa == vec::Isa::kAvx512, kAvx2 = vec::kIsa == vec::Isa::kAvx2;
constexpr int kShrinkRT = kAvx512 ? 3 : 2, kShrinkRR = kAvx512 ? 8 : 4;
constexpr int kExpandRT = kAvx512 ? 4 : 2, kExpandCV = (kAvx512 || kAvx2) ? 4 : 2;

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

// The call's parameters (y, x, A, B and their row strides, I, O, ...) and the CPU's grouping.
template <class T>
struct Ctx : LoraApplyParams<T> {
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
  if constexpr (vec::kBf16Dot && std::is_same_v<T, c10::BFloat16>) {
    // Two bf16 products per lane and instruction, x and A read as they are stored (the rest below).
    for (; i + 2 * W <= K; i += 2 * W) {
      vec::Pairs xv[RT];
      for (int t = 0; t < RT; ++t) xv[t] = vec::load_pairs(xr[t] + i);
      for (int j = 0; j < RR; ++j) {
        const vec::Pairs av = vec::load_pairs(ar[j] + i);
        for (int t = 0; t < RT; ++t) acc[t][j] = vec::dot2(acc[t][j], xv[t], av);
      }
    }
  }
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

// Every output element gets the same fp32 sequence on every path below: acc = 0, then for j = 0 .. r-1
// acc = fma(h[t, j], B[rows[j], o], acc) (vector lanes) or acc + h * B (the scalar tail, the last
// O % W columns), then y = R(fma(s, acc, y)) (or R(y + s * acc) in the tail). So a token's bits do not
// depend on the path its group takes, its group's size or the thread count.

// y_t[o + q] = R(y_t[o + q] + s * sum_j h_t[j] * b_j[q]) for t < RT, q < CV * W, with b_j = brow(j).
template <int RT, int CV, class T, class BRow>
inline void expand_block(const BRow& brow, int64_t r, const float* h, float scale, T* const* yr, int64_t o) {
  vec::V acc[RT][CV];
  for (int t = 0; t < RT; ++t)
    for (int q = 0; q < CV; ++q) acc[t][q] = vec::zero();
  for (int64_t j = 0; j < r; ++j) {
    const auto* b = brow(j);
    vec::V bv[CV];
    for (int q = 0; q < CV; ++q) bv[q] = vec::load(b + q * W);
    for (int t = 0; t < RT; ++t) {
      const vec::V hv = vec::set1(h[t * r + j]);
      for (int q = 0; q < CV; ++q) acc[t][q] = vec::fma(hv, bv[q], acc[t][q]);
    }
  }
  const vec::V sv = vec::set1(scale);
  for (int t = 0; t < RT; ++t)
    for (int q = 0; q < CV; ++q) {
      T* yp = yr[t] + o + q * W;
      vec::store(yp, vec::fma(sv, acc[t][q], vec::load(yp)));
    }
}

template <int CV, int RT, class T, class BRow>
void expand_tokens(const Ctx<T>& c, const Group& g, int64_t t, int64_t nt, const BRow& brow, int64_t o) {
  if constexpr (RT > 1) {
    if (nt < RT) return expand_tokens<CV, RT - 1>(c, g, t, nt, brow, o);
  }
  T* yr[RT];
  for (int k = 0; k < RT; ++k) yr[k] = c.y + c.tok[g.tok0 + t + k] * c.ldy;
  expand_block<RT, CV>(brow, g.r, c.h + g.h_off + t * g.r, g.scale, yr, o);
}

// Columns [o, o1) with o1 - o < W (the end of O), one at a time.
template <class T>
void expand_tail(const Ctx<T>& c, const Group& g, int64_t t, int64_t nt, int64_t o, int64_t o1) {
  for (int64_t k = 0; k < nt; ++k) {
    T* y = c.y + c.tok[g.tok0 + t + k] * c.ldy;
    const float* h = c.h + g.h_off + (t + k) * g.r;
    for (int64_t q = o; q < o1; ++q) {
      float acc = 0.f;
      for (int64_t j = 0; j < g.r; ++j) acc += h[j] * vec::to_f(c.B[g.rows[j] * c.ldb + q]);
      y[q] = vec::from_f<T>(vec::to_f(y[q]) + g.scale * acc);
    }
  }
}

// Small groups (at most kDecodeRT tokens: decode, and short segments whose packed panel would be used
// once): B is read straight from the pool, like A in the shrink: kDecodeRR rows at a time, each row
// one long sequential run over the columns (a few long streams are what the prefetchers follow; r
// short interleaved runs are not), each load of B feeding every token of the group, with the fp32
// accumulators of the column chunk in L1 between row blocks.
constexpr int kDecodeRT = 4, kDecodeRR = 8;
constexpr int64_t kDecodeAcc = 4096;  // fp32 accumulators (16 KiB, in L1): 4096 / nt columns per chunk

// acc_q[i] = fma chain over the RR rows k of hq[k] * b_k[i], continued from acc_q[i], for q < nt.
template <int RR, class T>
inline void accumulate_rows(const T* const* b, const float* const* hq, int nt, int64_t nv, int64_t n,
                            float* const* acc) {
  for (int64_t i = 0; i < nv; i += W) {
    vec::V bv[RR];
    for (int k = 0; k < RR; ++k) bv[k] = vec::load(b[k] + i);
    for (int q = 0; q < nt; ++q) {
      vec::V v = vec::load(acc[q] + i);
      for (int k = 0; k < RR; ++k) v = vec::fma(vec::set1(hq[q][k]), bv[k], v);
      vec::store(acc[q] + i, v);
    }
  }
  for (int64_t i = nv; i < n; ++i) {
    for (int q = 0; q < nt; ++q) {
      float v = acc[q][i];
      for (int k = 0; k < RR; ++k) v += hq[q][k] * vec::to_f(b[k][i]);
      acc[q][i] = v;
    }
  }
}

template <class T>
void expand_direct(const Ctx<T>& c, const Group& g, const Task& k) {
  alignas(64) float buf[kDecodeAcc];
  const int nt = static_cast<int>(k.t1 - k.t0);
  const int64_t chunk = kDecodeAcc / nt / 64 * 64;
  T* yr[kDecodeRT];
  const float* hr[kDecodeRT];
  float* acc[kDecodeRT];
  for (int q = 0; q < nt; ++q) {
    yr[q] = c.y + c.tok[g.tok0 + k.t0 + q] * c.ldy;
    hr[q] = c.h + g.h_off + (k.t0 + q) * g.r;
    acc[q] = buf + q * chunk;
  }
  for (int64_t ob = k.a0; ob < k.a1; ob += chunk) {
    const int64_t n = std::min(chunk, k.a1 - ob);
    const int64_t nv = std::min(n, (c.O - ob) / W * W);  // vector columns, then the tail of O
    for (int q = 0; q < nt; ++q) std::fill(acc[q], acc[q] + n, 0.f);
    const T* b[kDecodeRR];
    const float* hq[kDecodeRT];
    int64_t j = 0;
    for (; j + kDecodeRR <= g.r; j += kDecodeRR) {
      for (int q = 0; q < kDecodeRR; ++q) b[q] = c.B + g.rows[j + q] * c.ldb + ob;
      for (int q = 0; q < nt; ++q) hq[q] = hr[q] + j;
      accumulate_rows<kDecodeRR>(b, hq, nt, nv, n, acc);
    }
    for (; j < g.r; ++j) {
      b[0] = c.B + g.rows[j] * c.ldb + ob;
      for (int q = 0; q < nt; ++q) hq[q] = hr[q] + j;
      accumulate_rows<1>(b, hq, nt, nv, n, acc);
    }
    const vec::V sv = vec::set1(g.scale);
    for (int q = 0; q < nt; ++q) {
      T* yp = yr[q] + ob;
      for (int64_t i = 0; i < nv; i += W) vec::store(yp + i, vec::fma(sv, vec::load(acc[q] + i), vec::load(yp + i)));
      for (int64_t i = nv; i < n; ++i) yp[i] = vec::from_f<T>(vec::to_f(yp[i]) + g.scale * acc[q][i]);
    }
  }
}

// Larger groups: a panel of B (r rows x up to kPanelBytes of fp32 columns) is gathered from the pool
// once, converted and packed so that each kSub-column block is one contiguous [r, kSub] stream; then
// every token block of the group runs the register-blocked kernel over it (from L1/L2, no scattered
// rows, no repeated conversion), while each y row is read and written as a sequential run.
constexpr int64_t kPanelBytes = 256 * 1024;

template <class T>
void expand_packed(const Ctx<T>& c, const Group& g, const Task& k) {
  constexpr int64_t kSub = kExpandCV * W;
  const int64_t r = g.r;
  const int64_t panel = std::max<int64_t>(kSub, kPanelBytes / (r * 4) / kSub * kSub);
  thread_local std::vector<float> buf;  // per thread, reused across calls: r x panel floats
  if (static_cast<int64_t>(buf.size()) < r * panel) buf.resize(r * panel);
  float* pk = buf.data();
  for (int64_t op = k.a0; op < k.a1; op += panel) {
    const int64_t pw = std::min(panel, k.a1 - op);
    const int64_t nsub = pw / kSub;
    // kDecodeRR rows at a time, each a sequential run: a few long streams, as in expand_direct.
    for (int64_t j0 = 0; j0 < r; j0 += kDecodeRR) {
      const int64_t nr = std::min<int64_t>(kDecodeRR, r - j0);
      const T* b[kDecodeRR];
      for (int64_t q = 0; q < nr; ++q) b[q] = c.B + g.rows[j0 + q] * c.ldb + op;
      for (int64_t sb = 0; sb < nsub; ++sb)
        for (int q = 0; q < kExpandCV; ++q)
          for (int64_t jj = 0; jj < nr; ++jj)
            vec::store(pk + (sb * r + j0 + jj) * kSub + q * W, vec::load(b[jj] + sb * kSub + q * W));
    }
    const int64_t orest = op + nsub * kSub;  // columns past the last full block: only at the end of O
    const auto pool_row = [&](int64_t o) { return [&c, &g, o](int64_t j) { return c.B + g.rows[j] * c.ldb + o; }; };
    // While the token blocks compute on this panel, the next panel's rows are requested (into L2),
    // a share after each block, so reading B overlaps the arithmetic instead of preceding it.
    const int64_t next = op + pw, next_w = std::min(panel, k.a1 - next);
    const int64_t blocks = (k.t1 - k.t0 + kExpandRT - 1) / kExpandRT;
    const int64_t rows_per_block = next_w > 0 ? (r + blocks - 1) / blocks : 0;
    int64_t ahead = 0;  // next-panel rows requested so far
    for (int64_t t = k.t0; t < k.t1; t += kExpandRT) {
      for (int64_t e = std::min(r, ahead + rows_per_block); ahead < e; ++ahead) {
        vec::prefetch<false, 2>(c.B + g.rows[ahead] * c.ldb + next, next_w * static_cast<int64_t>(sizeof(T)));
      }
      const int64_t nt = std::min<int64_t>(kExpandRT, k.t1 - t);
      for (int64_t sb = 0; sb < nsub; ++sb) {
        const float* blk = pk + sb * r * kSub;
        expand_tokens<kExpandCV, kExpandRT>(c, g, t, nt, [blk](int64_t j) { return blk + j * kSub; }, op + sb * kSub);
      }
      int64_t o = orest;
      for (; o + W <= op + pw; o += W) expand_tokens<1, kExpandRT>(c, g, t, nt, pool_row(o), o);
      if (o < op + pw) expand_tail(c, g, t, nt, o, op + pw);
    }
  }
}

template <class T>
void expand_task(const Ctx<T>& c, const Task& k) {
  const Group& g = c.groups[k.g];
  if (g.n <= kDecodeRT) {
    expand_direct(c, g, k);
  } else {
    expand_packed(c, g, k);
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
// size still balance. Inside an enclosing parallel region at::parallel_for runs inline. Before each
// task, ahead(the task a thread is likely to take next) starts fetching that task's adapter rows.
template <class F, class Ahead>
void run_tasks(const std::vector<Task>& tasks, const F& f, const Ahead& ahead) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      if (i + workers < n) ahead(tasks[i + workers]);
      f(tasks[i]);
    }
  });
}

// The first lines of rows [0, nr) of the pool (row indices rows, stride ld elements), each from column
// o: a task's rows sit anywhere in the pool, and each is one sequential run that the hardware
// prefetcher follows once it has seen it start; requesting the starts of the next task's rows while
// this task computes saves their first misses.
template <class T>
inline void prefetch_row_starts(const T* base, const int32_t* rows, int64_t nr, int64_t ld, int64_t o,
                                int64_t len) {
  constexpr int64_t kLines = 8;
  const int64_t bytes = std::min<int64_t>(len * static_cast<int64_t>(sizeof(T)), kLines * 64);
  for (int64_t j = 0; j < nr; ++j) vec::prefetch<false, 2>(base + rows[j] * ld + o, bytes);
}

// Work per task: enough to amortise taking one (~32k fmas, a few microseconds), and about four tasks
// per thread when there is more.
int64_t task_work(int64_t total) {
  constexpr int64_t kMinWork = 32768, kTasksPerThread = 4;
  return std::max(kMinWork, total / (kTasksPerThread * std::max(1, at::get_num_threads())));
}

constexpr int64_t kSliceBytes = 256 * 1024;  // the slice of A or B one task keeps hot (half an L2)

template <class T>
void lora_apply_impl(const LoraApplyParams<T>& a) {
  if (a.T == 0 || a.O == 0) return;
  const int32_t *rp = a.row_ptr, *ri = a.row_idx, *sp = a.seg_ptr, *ss = a.seg_slot;
  const float* sc = a.scales;

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

  const Ctx<T> c{a, tok.data(), groups.data(), h.get()};

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
  run_tasks(tasks, [&](const Task& k) { shrink_task(c, k); }, [&](const Task& k) {
    const Group& g = groups[k.g];
    prefetch_row_starts(a.A, g.rows + k.a0, k.a1 - k.a0, a.lda, 0, a.I);
  });

  tasks.clear();
  const int64_t expand_work = task_work(expand_total);
  for (int64_t k = 0; k < static_cast<int64_t>(groups.size()); ++k) {
    const int64_t cols = kExpandCV * W;
    const int64_t max_cols = std::max<int64_t>(cols, kSliceBytes / (groups[k].r * elt) / cols * cols);
    cut(tasks, k, groups[k].n, a.O, groups[k].r, expand_work, cols, 4 * kExpandRT, max_cols);
  }
  run_tasks(tasks, [&](const Task& k) { expand_task(c, k); }, [&](const Task& k) {
    const Group& g = groups[k.g];
    prefetch_row_starts(a.B, g.rows, g.r, a.ldb, k.a0, k.a1 - k.a0);
  });
}

}  // namespace

// The entry points (kernels.h), registered by cpu/dispatch.cpp for the level the CPU runs.

void lora_apply_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& A_rows, const at::Tensor& B_rows,
                    const at::Tensor& row_ptr, const at::Tensor& row_idx, const at::Tensor& scales,
                    const at::Tensor& seg_ptr, const at::Tensor& seg_slot) {
  const char* op = "lora_apply_";
  LoraApplyProblem a = prepare_lora_apply(op, y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot);
  dispatch_dtype<DtypeSet::kF32F16BF16>(op, "y", a.y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    lora_apply_impl<T>(a.params.as<T>());
  });
  finish_lora_apply(a);
}

}  // namespace PYLORA_ISA_NS
}  // namespace cpu
}  // namespace pylora
