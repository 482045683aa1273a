// The tiled supervised contrast on the CPU (op pixcon::tiled_contrast and its backward; the same
// contract as pixcon_kernels.tiled, specs/fused_infonce.md §1). For anchor r (label y_r) and
// valid keys k, s_rk = a_r . k_k / t:
//   NL_r   = LSE over keys of another label of s_rk                    (pass 1, online)
//   term_r = mean over P(r) of softplus(NL_r - s_rp),  W_r = sum over P(r) of sigmoid(NL_r - s_rp)
// P(r) = keys of label y_r (in-batch: r itself excluded). Backward recomputes each tile:
//   ds_rk = (c_r W_r + g_nl_r) e^{s_rk - NL_r} (negatives), -c_r sigmoid(NL_r - s_rk) (positives),
//   c_r = g_r / |P(r)|;  da = ds k / t,  dk = ds^T a / t.
//
// Shape of the work (issue 34): rows are sorted by label (stable; no copy when they already are),
// so for every anchor row the positive keys are one contiguous range [plo, phi) of the sorted keys
// and the negatives are the valid keys outside it: no boolean tile masks, a pair of offsets per
// row. Each pass is ONE parallel region whose threads claim work items (an anchor tile x a chunk
// of keys) from an atomic counter: a thread that the OS deschedules (another process holding its
// core) delays the pass by at most the item in its hands, where one region per small op stalled
// every op. Items write partial results to their own slots, merged in a fixed order, so the
// result does not depend on the thread count or the schedule. The logits of a tile are one BLAS
// call (at::addmm on the thread's own buffer; MKL runs single-threaded inside the region), the
// exponentials a vectorised loop. A pass runs on one thread below kParallelWork multiply-adds
// (the rule is tiled_threads below; pixcon.ops.tiled documents and tests it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "items.h"
#include "memory.h"
#include "parallel.h"

namespace pixcon {

// A pass with fewer multiply-adds than this (about 2-4 ms on one core) runs on one thread: a
// parallel region costs a wake-up, and on a loaded machine a wake-up can wait a scheduler tick.
constexpr int64_t kParallelWork = int64_t{1} << 27;

// The backward's key-gradient slabs (one per group of anchor tiles) take at most this (below).
constexpr int64_t kPartialBytes = int64_t{32} << 20;

// Threads for a pass of `work` multiply-adds split into `items` items (the documented rule).
int64_t tiled_threads(int64_t work, int64_t items) {
  int64_t n = at::get_num_threads();
  const int64_t cap = thread_cap().load(std::memory_order_relaxed);
  if (cap > 0) n = std::min(n, cap);
  n = std::min(n, std::max<int64_t>(items, 1));
  if (work < kParallelWork) n = 1;
  return std::max<int64_t>(n, 1);
}

namespace {

// ---- vectorised exp (float): Cody-Waite reduction and a degree-6 polynomial, 16 lanes ---------
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline __attribute__((always_inline)) v16f vexp(v16f x) {
  const float lo = -87.33654f, hi = 88.37626f;
  v16f xc = x < lo ? v16f{} + lo : x;
  xc = xc > 88.0f ? v16f{} + 88.0f : xc;
  const v16f magic = v16f{} + 12582912.0f;                    // 1.5 * 2^23: round to nearest
  v16f n = (xc * 1.44269504088896341f + magic) - magic;
  v16f r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16f p = v16f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  v16f y = p * scale;
  y = x < lo ? v16f{} : y;
  y = x > hi ? v16f{} + std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;                                       // NaN stays NaN
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum (16 lanes, a fixed order).
__attribute__((target_clones("avx512f", "avx2", "default")))
float exp_shift_sum(float* x, int64_t n, float shift) {
  v16f acc{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16f v;
    std::memcpy(&v, x + i, sizeof(v));
    v = vexp(v - shift);
    std::memcpy(x + i, &v, sizeof(v));
    acc += v;
  }
  if (i < n) {
    v16f v = v16f{} + (-std::numeric_limits<float>::infinity());
    std::memcpy(&v, x + i, (n - i) * sizeof(float));
    v = vexp(v - shift);
    std::memcpy(x + i, &v, (n - i) * sizeof(float));
    acc += v;
  }
  float s = 0;
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

// x[i] = scale * exp(x[i] - shift)
__attribute__((target_clones("avx512f", "avx2", "default")))
void exp_shift_scale(float* x, int64_t n, float shift, float scale) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16f v;
    std::memcpy(&v, x + i, sizeof(v));
    v = vexp(v - shift) * scale;
    std::memcpy(x + i, &v, sizeof(v));
  }
  for (; i < n; ++i) x[i] = scale * std::exp(x[i] - shift);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
float row_max(const float* x, int64_t n) {
  v16f m = v16f{} + (-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16f v;
    std::memcpy(&v, x + i, sizeof(v));
    m = v > m ? v : m;
  }
  float r = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < 16; ++j) r = m[j] > r ? m[j] : r;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

double exp_shift_sum(double* x, int64_t n, double shift) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - shift));
  return s;
}
void exp_shift_scale(double* x, int64_t n, double shift, double scale) {
  for (int64_t i = 0; i < n; ++i) x[i] = scale * std::exp(x[i] - shift);
}
double row_max(const double* x, int64_t n) {
  double r = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

template <typename T>
inline T sigmoid(T x) {
  const T e = std::exp(-std::abs(x));
  return x >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

// ---- the sorted problem --------------------------------------------------------------------
// Rows sorted by label (a gathered copy only where they are not sorted already), the positive
// key range of every anchor, the first valid key, the tiles and the key chunks of an item.
struct Plan {
  at::Tensor A, K, ya, yk, pa, pk;   // A, K sorted, contiguous, in the accumulation type
  bool in_batch;
  int64_t M, N, D, kv0, av0, BM, BN, BNK, CH, nta, nch;
  bool small;                        // below kParallelWork: one thread on any count, big tiles
  std::vector<int64_t> plo, phi;     // positive keys of anchor r: [plo[r], phi[r])
};

// The glue around the passes (sorting labels, gathering and scattering rows, zeroing) is plain
// loops on the calling thread: each ATen call would be a parallel region of its own, and on a
// loaded machine every region can wait a scheduler tick (torch's radix sort took 10 ms a call
// for 8192 labels with one core busy).

// (sorted labels int64, permutation or undefined when already sorted)
std::pair<at::Tensor, at::Tensor> sorted(const at::Tensor& y) {
  auto y64 = y.to(at::kLong).contiguous();
  const int64_t* p = y64.data_ptr<int64_t>();
  const int64_t n = y64.numel();
  bool is_sorted = true;
  for (int64_t i = 1; i < n && is_sorted; ++i) is_sorted = p[i] >= p[i - 1];
  if (is_sorted) return {y64, at::Tensor()};
  auto perm = at::empty({n}, y64.options());
  int64_t* pp = perm.data_ptr<int64_t>();
  std::iota(pp, pp + n, int64_t{0});
  std::stable_sort(pp, pp + n, [&](int64_t a, int64_t b) { return p[a] < p[b]; });
  auto ys = at::empty({n}, y64.options());
  int64_t* ysp = ys.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) ysp[i] = p[pp[i]];
  return {ys, perm};
}

// rows x[perm] (x itself when perm is undefined) as contiguous rows of type acc, no gradient
at::Tensor rows_in(const at::Tensor& x, const at::Tensor& perm, at::ScalarType acc) {
  at::Tensor src = x.detach().to(acc).contiguous();
  if (!perm.defined()) return src;
  const int64_t n = perm.numel(), D = src.size(1), bytes = D * src.element_size();
  at::Tensor out = empty_large({n, D}, src.options());
  const int64_t* pp = perm.data_ptr<int64_t>();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * bytes, s + pp[i] * bytes, bytes);
  return out;
}

// x in sorted order (rows of any width) back to the callers' order
at::Tensor unsort(const at::Tensor& x, const at::Tensor& perm) {
  if (!perm.defined()) return x;
  at::Tensor src = x.contiguous();
  const int64_t n = perm.numel(), bytes = (n ? src.numel() / n : 0) * src.element_size();
  at::Tensor out = on_huge_pages(at::empty_like(src));
  const int64_t* pp = perm.data_ptr<int64_t>();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memcpy(o + pp[i] * bytes, s + i * bytes, bytes);
  return out;
}

// zeros, written on this thread
at::Tensor zeros_here(const at::Tensor& like) {
  at::Tensor z = at::empty_like(like, at::MemoryFormat::Contiguous);
  std::memset(z.data_ptr(), 0, z.numel() * z.element_size());
  return z;
}

Plan make_plan(const at::Tensor& a, const at::Tensor& ya, const c10::optional<at::Tensor>& k,
               const c10::optional<at::Tensor>& yk, at::IntArrayRef block) {
  TORCH_CHECK(a.dim() == 2, "tiled_contrast: a must be (M, D), got ", a.sizes());
  TORCH_CHECK(ya.dim() == 1 && ya.size(0) == a.size(0), "tiled_contrast: ya must be (M,)");
  TORCH_CHECK(k.has_value() == yk.has_value(), "tiled_contrast: k and yk go together");
  Plan p;
  p.in_batch = !k.has_value();
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::tie(p.ya, p.pa) = sorted(ya);
  p.A = rows_in(a, p.pa, acc);
  if (p.in_batch) {
    p.yk = p.ya; p.pk = p.pa; p.K = p.A;
  } else {
    TORCH_CHECK(k->dim() == 2 && k->size(1) == a.size(1), "tiled_contrast: k must be (N, D)");
    TORCH_CHECK(yk->dim() == 1 && yk->size(0) == k->size(0), "tiled_contrast: yk must be (N,)");
    std::tie(p.yk, p.pk) = sorted(*yk);
    p.K = rows_in(*k, p.pk, acc);
  }
  p.M = p.A.size(0); p.N = p.K.size(0); p.D = p.A.size(1);
  const int64_t* yap = p.ya.template data_ptr<int64_t>();
  const int64_t* ykp = p.yk.template data_ptr<int64_t>();
  p.kv0 = std::lower_bound(ykp, ykp + p.N, int64_t{0}) - ykp;
  p.av0 = std::lower_bound(yap, yap + p.M, int64_t{0}) - yap;
  p.plo.assign(p.M, 0); p.phi.assign(p.M, 0);
  for (int64_t r = p.av0; r < p.M; ++r) {
    if (r > p.av0 && yap[r] == yap[r - 1]) { p.plo[r] = p.plo[r - 1]; p.phi[r] = p.phi[r - 1]; continue; }
    p.plo[r] = std::lower_bound(ykp + p.kv0, ykp + p.N, yap[r]) - ykp;
    p.phi[r] = std::upper_bound(ykp + p.kv0, ykp + p.N, yap[r]) - ykp;
  }
  // Tiles: BM anchors x BN keys (one BLAS call), items of BM anchors x CH keys; the backward's
  // key tiles BNK. Chosen from the sizes alone, never from the thread count, so the result is
  // the same on any number of threads: a problem below kParallelWork runs on one thread
  // anyway and gets large tiles and one chunk (few BLAS calls), a larger one tiles that give
  // every thread many items.
  const int64_t Mv = p.M - p.av0, Nv = p.N - p.kv0;
  p.small = Mv * Nv * p.D < kParallelWork;
  const bool given = block.size() == 2;
  p.BM = given ? block[0] : p.small ? 128 : std::clamp<int64_t>((Mv + 15) / 16, 16, 64);
  p.BN = given ? block[1] : 512;
  TORCH_CHECK(p.BM > 0 && p.BN > 0, "tiled_contrast: block sizes must be positive");
  p.BNK = given || p.small ? p.BN : std::clamp<int64_t>((Nv + 3) / 4, 64, p.BN);
  p.CH = p.small && !given ? std::max<int64_t>(Nv, 1) : std::max<int64_t>(p.BN, (4096 / p.BN) * p.BN);
  p.nta = (Mv + p.BM - 1) / p.BM;
  p.nch = (Nv + p.CH - 1) / p.CH;
  return p;
}

// s (bm x bn, row-major in buf) = A[i0:i0+bm] . K[j0:j0+bn]^T / t
template <typename T>
at::Tensor logits(const Plan& p, at::Tensor& buf, int64_t i0, int64_t bm, int64_t j0, int64_t bn,
                  double inv_t) {
  at::Tensor s = buf.narrow(0, 0, bm * bn).view({bm, bn});
  at::addmm_out(s, s, p.A.narrow(0, i0, bm), p.K.narrow(0, j0, bn).t(), 0, inv_t);
  return s;
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const Plan& p, double t, bool positives) {
  const int64_t M = p.M, nch = std::max<int64_t>(p.nch, 1);
  const auto opt = p.A.options();
  const T ninf = -std::numeric_limits<T>::infinity();
  std::vector<T> part(nch * M, ninf);                 // per (chunk, anchor): the chunk's LSE
  const double inv_t = 1.0 / t;
  const int64_t work = (M - p.av0) * (p.N - p.kv0) * p.D;

  // pass 1: the negatives' log-sum-exp, an item = (anchor tile, key chunk)
  for_items<T>(p.nta * p.nch, work, p.BM * p.BN, [&](int64_t it, at::Tensor& buf) {
    const int64_t ti = it / p.nch, c = it % p.nch;
    const int64_t i0 = p.av0 + ti * p.BM, i1 = std::min(i0 + p.BM, M);
    const int64_t c0 = p.kv0 + c * p.CH, c1 = std::min(c0 + p.CH, p.N);
    // no negative in the chunk for any row: every row's positive range covers it
    bool any_neg = false;
    for (int64_t r = i0; r < i1 && !any_neg; ++r) any_neg = !(p.plo[r] <= c0 && p.phi[r] >= c1);
    if (!any_neg) return;
    std::vector<T> m(i1 - i0, ninf), l(i1 - i0, 0);
    for (int64_t j0 = c0; j0 < c1; j0 += p.BN) {
      const int64_t j1 = std::min(j0 + p.BN, c1), bn = j1 - j0;
      bool tile_neg = false;
      for (int64_t r = i0; r < i1 && !tile_neg; ++r) tile_neg = !(p.plo[r] <= j0 && p.phi[r] >= j1);
      if (!tile_neg) continue;
      at::Tensor s = logits<T>(p, buf, i0, i1 - i0, j0, bn, inv_t);
      T* sp = s.template data_ptr<T>();
      for (int64_t r = i0; r < i1; ++r) {
        T* row = sp + (r - i0) * bn;
        // negatives: [j0, plo) and [phi, j1) in tile coordinates
        const int64_t a0 = 0, a1 = std::clamp(p.plo[r] - j0, int64_t{0}, bn);
        const int64_t b0 = std::clamp(p.phi[r] - j0, int64_t{0}, bn), b1 = bn;
        if (a1 <= a0 && b1 <= b0) continue;
        const T mx = std::max(a1 > a0 ? row_max(row + a0, a1 - a0) : ninf,
                              b1 > b0 ? row_max(row + b0, b1 - b0) : ninf);
        T& mr = m[r - i0];
        T& lr = l[r - i0];
        const T mn = std::max(mr, mx);
        if (mn == ninf) continue;
        lr = (mr == ninf ? T(0) : lr * std::exp(mr - mn));
        mr = mn;
        if (a1 > a0) lr += exp_shift_sum(row + a0, a1 - a0, mn);
        if (b1 > b0) lr += exp_shift_sum(row + b0, b1 - b0, mn);
      }
    }
    for (int64_t r = i0; r < i1; ++r)
      if (m[r - i0] != ninf) part[c * M + r] = m[r - i0] + std::log(l[r - i0]);
  });
  auto NL = at::full({M}, ninf, opt);
  T* nl = NL.template data_ptr<T>();
  for (int64_t r = p.av0; r < M; ++r) {          // merge the chunks in order
    T mx = ninf;
    for (int64_t c = 0; c < nch; ++c) mx = std::max(mx, part[c * M + r]);
    if (mx == ninf) continue;
    T s = 0;
    for (int64_t c = 0; c < nch; ++c) s += std::exp(part[c * M + r] - mx);
    nl[r] = mx + std::log(s);
  }

  auto terms = at::zeros({M}, opt), W = at::zeros({M}, opt);
  auto npos = at::zeros({M}, opt.dtype(at::kLong));
  if (positives) {
    // pass 2: per positive softplus(NL - s) and sigmoid(NL - s); an item = (anchor tile, chunk)
    // of the chunks that meet the tile's positive band
    std::vector<T> psp(nch * M, 0), pw(nch * M, 0);
    int64_t work2 = 0;
    for (int64_t r = p.av0; r < M; ++r) work2 += (p.phi[r] - p.plo[r]) * p.D;
    for_items<T>(p.nta * p.nch, work2 * 2, p.BM * p.BN, [&](int64_t it, at::Tensor& buf) {
      const int64_t ti = it / p.nch, c = it % p.nch;
      const int64_t i0 = p.av0 + ti * p.BM, i1 = std::min(i0 + p.BM, M);
      const int64_t lo = std::max(p.kv0 + c * p.CH, p.plo[i0]);
      const int64_t hi = std::min(std::min(p.kv0 + (c + 1) * p.CH, p.N), p.phi[i1 - 1]);
      for (int64_t j0 = lo; j0 < hi; j0 += p.BN) {
        const int64_t j1 = std::min(j0 + p.BN, hi), bn = j1 - j0;
        at::Tensor s = logits<T>(p, buf, i0, i1 - i0, j0, bn, inv_t);
        const T* sp = s.template data_ptr<T>();
        for (int64_t r = i0; r < i1; ++r) {
          const T* row = sp + (r - i0) * bn;
          const T x0 = nl[r];
          T a = 0, w = 0;
          const int64_t q0 = std::max(p.plo[r], j0), q1 = std::min(p.phi[r], j1);
          for (int64_t q = q0; q < q1; ++q) {
            if (p.in_batch && q == r) continue;
            const T x = x0 - row[q - j0];
            a += softplus(x);
            w += sigmoid(x);
          }
          psp[c * M + r] += a;
          pw[c * M + r] += w;
        }
      }
    });
    T* tp = terms.template data_ptr<T>();
    T* wp = W.template data_ptr<T>();
    int64_t* np = npos.template data_ptr<int64_t>();
    for (int64_t r = p.av0; r < M; ++r) {
      const int64_t n = p.phi[r] - p.plo[r] - (p.in_batch ? 1 : 0);
      T a = 0, w = 0;
      for (int64_t c = 0; c < nch; ++c) { a += psp[c * M + r]; w += pw[c * M + r]; }
      np[r] = std::max<int64_t>(n, 0);
      tp[r] = n > 0 ? a / T(n) : T(0);
      wp[r] = w;
    }
  }
  return {terms, npos, NL, W};
}

// ds (in place of s, rows i0.., keys j0..) for the backward: negatives cw e^{s - NL}, positives
// -c sigmoid(NL - s), everything else 0.
template <typename T>
void dlogits(const Plan& p, T* sp, int64_t i0, int64_t i1, int64_t j0, int64_t bn, const T* nl,
             const T* cw, const T* c) {
  for (int64_t r = i0; r < i1; ++r) {
    T* row = sp + (r - i0) * bn;
    const int64_t v = std::clamp(p.kv0 - j0, int64_t{0}, bn);
    const int64_t q0 = std::clamp(p.plo[r] - j0, v, bn), q1 = std::clamp(p.phi[r] - j0, q0, bn);
    std::fill(row, row + v, T(0));
    if (cw[r] != 0) {
      exp_shift_scale(row + v, q0 - v, nl[r], cw[r]);
      exp_shift_scale(row + q1, bn - q1, nl[r], cw[r]);
    } else {
      std::fill(row + v, row + q0, T(0));
      std::fill(row + q1, row + bn, T(0));
    }
    for (int64_t q = q0; q < q1; ++q)
      row[q] = (p.in_batch && q + j0 == r) ? T(0) : -c[r] * sigmoid(nl[r] - row[q]);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const Plan& p, const at::Tensor& g_in,
                                                 const at::Tensor& gnl_in, const at::Tensor& nl_in,
                                                 const at::Tensor& w_in, const at::Tensor& np_in,
                                                 double t, bool key_grad) {
  const int64_t M = p.M;
  const auto acc = p.A.scalar_type();
  auto sortrows = [&](const at::Tensor& x, at::ScalarType dt) {
    return rows_in(x.reshape({-1, 1}), p.pa, dt).reshape({-1});
  };
  at::Tensor g = sortrows(g_in, acc), gnl = sortrows(gnl_in, acc), NL = sortrows(nl_in, acc);
  at::Tensor W = sortrows(w_in, acc), np = sortrows(np_in, at::kLong);
  std::vector<T> c(M, 0), cw(M, 0);
  const T* gp = g.template data_ptr<T>();
  const T* gn = gnl.template data_ptr<T>();
  const T* wp = W.template data_ptr<T>();
  const T* nl = NL.template data_ptr<T>();
  const int64_t* npp = np.template data_ptr<int64_t>();
  std::vector<char> live(M, 0);
  for (int64_t r = p.av0; r < M; ++r) {
    c[r] = npp[r] > 0 ? gp[r] / T(npp[r]) : T(0);
    cw[r] = c[r] * wp[r] + gn[r];
    if (nl[r] == -std::numeric_limits<T>::infinity()) cw[r] = 0;   // no negative at all
    live[r] = c[r] != 0 || cw[r] != 0;
  }
  const double inv_t = 1.0 / t;
  const int64_t work = (M - p.av0) * (p.N - p.kv0) * p.D * 2;
  auto dA = zeros_here(p.A);
  const bool need_dk = key_grad || p.in_batch;
  at::Tensor dK = need_dk ? zeros_here(p.K) : at::Tensor();
  const int64_t BNK = p.BNK, nk = (p.N - p.kv0 + BNK - 1) / BNK;
  auto tile_live = [&](int64_t i0, int64_t i1) {
    for (int64_t r = i0; r < i1; ++r)
      if (live[r]) return true;
    return false;
  };
  // ds of the tile (anchors i0..i1, keys j0..j0+bn) in the thread's buffer
  auto ds = [&](at::Tensor& buf, int64_t i0, int64_t i1, int64_t j0, int64_t bn) {
    at::Tensor s = logits<T>(p, buf, i0, i1 - i0, j0, bn, inv_t);
    dlogits<T>(p, s.template data_ptr<T>(), i0, i1, j0, bn, nl, cw.data(), c.data());
    return s;
  };
  const int64_t Nv = p.N - p.kv0;
  // anchor tiles [t0, t1) in order, each ds tile computed once and added into its da rows and,
  // where dk_rows (the Nv valid keys' rows) is given, into dk_rows: written over while `fresh`
  // (cleared after the first tile with a live row), added to after
  auto sweep = [&](at::Tensor& buf, int64_t t0, int64_t t1, const at::Tensor& dk_rows,
                   bool& fresh) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t i0 = p.av0 + ti * p.BM, i1 = std::min(i0 + p.BM, M);
      if (!tile_live(i0, i1)) continue;
      at::Tensor dAi = dA.narrow(0, i0, i1 - i0), Ai = p.A.narrow(0, i0, i1 - i0);
      for (int64_t j0 = p.kv0; j0 < p.N; j0 += BNK) {
        const int64_t bn = std::min(BNK, p.N - j0);
        at::Tensor s = ds(buf, i0, i1, j0, bn);
        dAi.addmm_(s, p.K.narrow(0, j0, bn));
        if (!dk_rows.defined()) continue;
        at::Tensor out = dk_rows.narrow(0, j0 - p.kv0, bn);
        if (fresh) at::mm_out(out, s.t(), Ai);
        else out.addmm_(s.t(), Ai);
      }
      fresh = false;
    }
  };
  // Key gradients from slabs, where at least two (keys x D) slabs fit in kPartialBytes: the
  // anchor tiles fall into G groups of consecutive tiles (G = tiles, or as many slabs as fit:
  // in-batch ContrastiveSeg 16 groups of one tile, dense at 3,072 pixels 10 of about five), an
  // item is a group, and each tile's ds is computed once and feeds both its da rows and its
  // group's slab of dk (tiles in order); the slabs are summed in group order afterwards. Three
  // GEMMs a tile instead of the four of the two passes below, which recompute the logits for dk
  // (so two threads did a third more work than one). G comes from the sizes alone: the same bits
  // on any thread count.
  const int64_t G = need_dk ? std::min(p.nta, kPartialBytes / std::max<int64_t>(
                                                  Nv * p.D * int64_t(sizeof(T)), 1))
                            : 0;
  if (G >= 2) {
    at::Tensor slabs = empty_large({G, Nv, p.D}, p.A.options());
    std::vector<char> wrote(G, 0);
    for_items<T>(G, work, p.BM * BNK, [&](int64_t gi, at::Tensor& buf) {
      bool fresh = true;
      sweep(buf, gi * p.nta / G, (gi + 1) * p.nta / G, slabs.select(0, gi), fresh);
      wrote[gi] = !fresh;
    });
    // dk rows = the written slabs' rows added in group order, rows split over the threads
    const int64_t rows_per = std::max<int64_t>(1, (int64_t{1} << 14) / p.D);
    const int64_t nr = (Nv + rows_per - 1) / rows_per;
    for_items<T>(nr, work, 1, [&](int64_t it, at::Tensor&) {
      const int64_t r0 = it * rows_per, n = std::min(rows_per, Nv - r0) * p.D;
      T* o = dK.template data_ptr<T>() + (p.kv0 + r0) * p.D;
      for (int64_t gi = 0; gi < G; ++gi) {
        if (!wrote[gi]) continue;
        const T* src = slabs.template data_ptr<T>() + (gi * Nv + r0) * p.D;
        for (int64_t e = 0; e < n; ++e) o[e] += src[e];
      }
    });
  } else if (tiled_threads(work, p.nta) == 1 && (!need_dk || tiled_threads(work, nk) == 1)) {
    // one thread: one sweep (one item), each tile's ds feeding both gradients. The same BLAS
    // calls in the same order per output row as the two passes below, so the same bits.
    for_items<T>(1, work, p.BM * BNK, [&](int64_t, at::Tensor& buf) {
      bool fresh = false;                                 // dK is zeros: accumulate from the start
      sweep(buf, 0, p.nta, need_dk ? dK.narrow(0, p.kv0, Nv) : at::Tensor(), fresh);
    });
  } else {
    // da: an item = one anchor tile, over every key tile
    for_items<T>(p.nta, work, p.BM * BNK, [&](int64_t ti, at::Tensor& buf) {
      const int64_t i0 = p.av0 + ti * p.BM, i1 = std::min(i0 + p.BM, M);
      if (!tile_live(i0, i1)) return;
      at::Tensor dAi = dA.narrow(0, i0, i1 - i0);
      for (int64_t j0 = p.kv0; j0 < p.N; j0 += BNK) {
        const int64_t bn = std::min(BNK, p.N - j0);
        dAi.addmm_(ds(buf, i0, i1, j0, bn), p.K.narrow(0, j0, bn));
      }
    });
    // dk: an item = BNK keys, over every anchor tile (the logits recomputed: no atomics, no
    // per-thread copies of dk)
    if (need_dk) {
      for_items<T>(nk, work, p.BM * BNK, [&](int64_t tk, at::Tensor& buf) {
        const int64_t j0 = p.kv0 + tk * BNK, bn = std::min(BNK, p.N - j0);
        at::Tensor dKj = dK.narrow(0, j0, bn);
        for (int64_t i0 = p.av0; i0 < M; i0 += p.BM) {
          const int64_t i1 = std::min(i0 + p.BM, M);
          if (!tile_live(i0, i1)) continue;
          dKj.addmm_(ds(buf, i0, i1, j0, bn).t(), p.A.narrow(0, i0, i1 - i0));
        }
      });
    }
  }
  if (p.in_batch) dA.add_(dK);
  dA.mul_(inv_t);
  at::Tensor da = unsort(dA, p.pa);
  at::Tensor dk;
  if (key_grad && !p.in_batch) dk = unsort(dK.mul_(inv_t), p.pk);
  return {da, dk};
}

}  // namespace

// precision: the GPU kernels' opt-in for their tensor-core products ("fp32", "tf32", "bf16");
// this kernel multiplies in fp32 (fp64 for fp64 rows) whatever it says.
static void check_precision(c10::string_view precision) {
  TORCH_CHECK(precision == "fp32" || precision == "tf32" || precision == "bf16",
              "tiled_contrast: precision must be 'fp32', 'tf32' or 'bf16', got '", precision, "'");
}

// Forward: (terms (M,), npos (M,) int64, NL (M,), W (M,)) in the callers' row order, float32
// (float64 for float64 anchors). k, yk None: in-batch (keys = anchors, r not its own positive).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_contrast_cpu(
    const at::Tensor& a, const at::Tensor& ya, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& yk, double temperature, bool positives,
    at::IntArrayRef block, c10::string_view precision) {
  check_precision(precision);
  Plan p = make_plan(a, ya, k, yk, block);
  auto out = p.A.scalar_type() == at::kDouble ? forward_impl<double>(p, temperature, positives)
                                                : forward_impl<float>(p, temperature, positives);
  return {unsort(std::get<0>(out), p.pa), unsort(std::get<1>(out), p.pa),
          unsort(std::get<2>(out), p.pa), unsort(std::get<3>(out), p.pa)};
}

// Backward: (da, dk) in the inputs' dtypes; dk is empty unless key_grad (in-batch: da holds
// both sides).
std::tuple<at::Tensor, at::Tensor> tiled_contrast_backward_cpu(
    const at::Tensor& grad, const at::Tensor& grad_nl, const at::Tensor& a, const at::Tensor& ya,
    const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& yk, const at::Tensor& nl,
    const at::Tensor& w, const at::Tensor& npos, double temperature, bool key_grad,
    at::IntArrayRef block, c10::string_view precision) {
  check_precision(precision);
  Plan p = make_plan(a, ya, k, yk, block);
  auto out = p.A.scalar_type() == at::kDouble
                 ? backward_impl<double>(p, grad, grad_nl, nl, w, npos, temperature, key_grad)
                 : backward_impl<float>(p, grad, grad_nl, nl, w, npos, temperature, key_grad);
  at::Tensor da = std::get<0>(out).to(a.scalar_type());
  at::Tensor dk = std::get<1>(out).defined() ? std::get<1>(out).to(k->scalar_type())
                                             : a.new_empty({0});
  return {da, dk};
}

}  // namespace pixcon

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("tiled_contrast", &pixcon::tiled_contrast_cpu);
  m.impl("tiled_contrast_backward", &pixcon::tiled_contrast_backward_cpu);
}
