// Contextrast's per-layer statistics on the CPU: the kernels of the ops pixcon::inv_norms,
// unit_class_sums, anchor_contrast and their backwards (schemas in pixcon/ops/_library.py; the
// same contract as their Triton kernels, pixcon_kernels.anchor), straight from the NCHW embedding
// in tiles of one image's pixels, recomputed in backward. With x_p the pixel's raw column,
// inv_p = 1 / max(|x_p|, eps) (ones without normalisation), t the temperature:
//
//   class sums     S_c = sum_{p : g_p = c} inv_p x_p                                  (C, D)
//   logits         s_{c,p} = inv_p (a_c . x_p) / t                                    (C, n)
//   anchor terms   L_c = sum_{p : g_p = c, c has negatives} softplus(NL_c - s_{g_p,p})
//                  NL_c = log sum_{q negative of c} exp(s_{c,q})                      (C,)
//
// Backward, with sigma_p = sigmoid(NL_g - s_{g,p}), Sig_c (the forward's sigmoid sums) and the
// incoming gradient G (C,): ds_{c,q} = G_c Sig_c exp(s_{c,q} - NL_c) on negatives, ds_{g,p} -=
// G_g sigma_p on positives; W = ds inv / t; then
//
//   dx = a^T W - x inv^2 on (s . ds),     da = W x^T
//
// (on: the norm is above eps, where the normalisation's radial term exists). The class sums'
// backward is the same with dz_p = dS_{g_p}. The backward is two passes, so that each pixel's
// gradient is written once with both terms: pass A (anchor_contrast_da) gives da, which the
// caller turns into the gradient dS of the layer's class sums (through the anchors' fusion
// across layers); pass B (anchor_contrast_dx) writes dx = a^T W + inv dS_g - x (inv^2 on (s . ds)
// + inv^3 on (dS_g . x)). Nothing of size P x C is kept by the forward: it keeps one positive
// logit per pixel while it runs; pass A remakes each tile's logits (one BLAS call) and keeps W
// for pass B when C + 1 floats a pixel are no more than its embedding row (else B remakes it).
//
// Parallel shape: one pass = one region of work items claimed from a counter (items.h). An item
// is a chunk of consecutive tiles with its own partial sums ((C, D), online log-sum-exp (C,)),
// merged in chunk order afterwards; the chunks depend on the sizes only, so results are the same
// on any number of threads. A tile holds (D + 2C) x n values of about 768 KiB (L2) and never
// spans two images; BLAS runs single-threaded inside the region.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "items.h"
#include "memory.h"
#include "parallel.h"
#include "vec.h"

namespace pixcon {
namespace {

// Each norm is clamped to at least eps (torch.cosine_similarity's; pixcon.core.common.EPS).
constexpr double kEps = 1e-8;

// A scalar loop's element costs about this many of BLAS's multiply-adds (the unit of
// tiled_threads' rule): a pass over a 90-million-element embedding is worth two threads.
constexpr int64_t kScalar = 16;

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The tiles of a (B, D, h, w) map and their chunks.
struct Tiles {
  int64_t B, D, HW, n, per_img, count, chunks;
  Tiles(const at::Tensor& x, int64_t C, int64_t elt) {
    TORCH_CHECK(x.dim() == 4, "the Contextrast CPU kernels take a (B, D, h, w) map, got ",
                x.sizes());
    B = x.size(0); D = x.size(1); HW = x.size(2) * x.size(3);
    const int64_t set = anchor_tile().load(std::memory_order_relaxed);
    n = set > 0 ? set : std::clamp<int64_t>((196608 / std::max<int64_t>(D + 2 * C, 1)) / 16 * 16,
                                            16, 4096);
    n = std::max<int64_t>(std::min(n, HW), 1);
    per_img = HW > 0 ? (HW + n - 1) / n : 0;
    count = B * per_img;
    // at most 64 chunks, and their (C, D) partials within 64 MiB
    const int64_t cap = std::max<int64_t>((int64_t{64} << 20) / std::max<int64_t>(C * D * elt, 1), 1);
    chunks = std::min<int64_t>({count, 64, cap});
  }
  // chunk k: tiles [first(k), first(k + 1)); no tile at all (an empty map): no chunk
  int64_t first(int64_t k) const { return chunks > 0 ? k * count / chunks : 0; }
  // tile i: image b, pixels [lo, lo + len) of it
  void tile(int64_t i, int64_t& b, int64_t& lo, int64_t& len) const {
    b = i / per_img;
    lo = (i % per_img) * n;
    len = std::min(n, HW - lo);
  }
};

// The (D, len) columns of a tile in T: a view of x when it is already T (row stride HW), else a
// converted copy (half inputs compute in float32).
template <typename T>
at::Tensor cols(const at::Tensor& x, const Tiles& tl, int64_t b, int64_t lo, int64_t len) {
  at::Tensor v = x.select(0, b).view({tl.D, tl.HW}).narrow(1, lo, len);
  const auto st = c10::CppTypeToScalarType<T>::value;
  return v.scalar_type() == st ? v : v.to(st);
}

template <typename T>
const T* ptr(const at::Tensor& t) { return t.template data_ptr<T>(); }

// X (D, len) itself when contiguous, else copied into xb: MKL's products with a (D, len) operand
// whose rows lie HW apart ran at 70 GFLOP/s a thread where a contiguous copy runs at 180-200
// (19 x 256 x 668, this project's CPU), and the copy costs less than the difference.
template <typename T>
at::Tensor contiguous_cols(const at::Tensor& X, T* xb) {
  const int64_t D = X.size(0), len = X.size(1);
  if (X.stride(0) == len) return X;
  const T* src = ptr<T>(X);
  for (int64_t d = 0; d < D; ++d) std::memcpy(xb + d * len, src + d * X.stride(0), len * sizeof(T));
  return at::from_blob(xb, {D, len}, X.options());
}

// ---- inv_norms -------------------------------------------------------------------------------
at::Tensor inv_norms_cpu(const at::Tensor& x_) {
  const at::Tensor x = x_.contiguous();
  const Tiles tl(x, 0, 0);
  at::Tensor out = at::empty({tl.B * tl.HW}, x.options().dtype(acc_type(x)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "inv_norms", [&] {
    using T = scalar_t;
    T* o = out.data_ptr<T>();
    for_items<T>(tl.count, kScalar * tl.B * tl.HW * tl.D, 0, [&](int64_t i, at::Tensor&) {
      int64_t b, lo, len;
      tl.tile(i, b, lo, len);
      const at::Tensor X = cols<T>(x, tl, b, lo, len);
      const T* xp = ptr<T>(X);
      const int64_t ld = X.stride(0);
      T* op = o + b * tl.HW + lo;
      std::fill(op, op + len, T(0));
      for (int64_t d = 0; d < tl.D; ++d) {
        const T* xr = xp + d * ld;
        for (int64_t p = 0; p < len; ++p) op[p] += xr[p] * xr[p];
      }
      for (int64_t p = 0; p < len; ++p) op[p] = T(1) / std::max(std::sqrt(op[p]), T(kEps));
    });
  });
  return out;
}

// The per-pixel factors of tile (b, lo, len): s_p = inv_p and on_p (1 where the norm is above eps
// and the normalisation is on, else 0).
template <typename T>
void scales(const T* inv, bool normalize, int64_t off, int64_t len, T* s, T* on) {
  for (int64_t p = 0; p < len; ++p) {
    s[p] = inv[off + p];
    on[p] = normalize && s[p] * T(kEps) < T(1) ? T(1) : T(0);
  }
}

// ---- unit_class_sums -------------------------------------------------------------------------
// The runs of equal class in a tile's labels: run r covers pixels [at[r], at[r + 1]) of class
// cls[r] (C for ignored and out-of-range pixels). Segmentation labels come in regions, so runs are
// long, and every inner loop below is a vector loop over one run with its class's value
// broadcast: no gathers, no scatters, no branches per pixel.
constexpr int64_t kShortRun = 8;      // runs shorter than this on average: pixel by pixel

// (gc: each pixel's class, C where ignored, when given.)
void class_runs(const int64_t* g, int64_t len, int64_t C, std::vector<int64_t>& at,
                std::vector<int64_t>& cls, int64_t* gc = nullptr) {
  at.clear();
  cls.clear();
  for (int64_t p = 0; p < len; ++p) {
    const int64_t c = g[p] >= 0 && g[p] < C ? g[p] : C;
    if (gc) gc[p] = c;
    if (p == 0 || c != cls.back()) {
      at.push_back(p);
      cls.push_back(c);
    }
  }
  at.push_back(len);
}

// sums[c, d] += sum over the run's pixels of s_p x[d, p], every run of a tile (x: D rows, ld apart)
// (Short runs, labels scattered pixel by pixel: one pixel at a time.)
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void sums_tile(int64_t D, int64_t len, int64_t ld, const T* __restrict__ x,
               const T* __restrict__ s, const int64_t* g, const int64_t* at, const int64_t* cls,
               int64_t runs, int64_t C, T* __restrict__ sums) {
  const bool by_run = runs * kShortRun <= len;
  for (int64_t d = 0; d < D; ++d) {
    const T* xr = x + d * ld;
    if (by_run) {
      for (int64_t r = 0; r < runs; ++r)
        if (cls[r] < C) sums[cls[r] * D + d] += dot(s + at[r], xr + at[r], at[r + 1] - at[r]);
    } else {
      for (int64_t p = 0; p < len; ++p)
        if (g[p] >= 0 && g[p] < C) sums[g[p] * D + d] += s[p] * xr[p];
    }
  }
}

// The class sums' gradient on a tile, in two steps. Gt: their gradient G transposed, (D, C + 1)
// with a zero column C; g: each pixel's class, C where ignored (read when the runs are short).
// Radial factor: coef[p] += s_p^3 on_p (G_{g_p} . x_p).
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void sums_radial(int64_t D, int64_t len, int64_t ld, const T* __restrict__ x,
                 const T* __restrict__ s, const T* __restrict__ on, const int64_t* g,
                 const int64_t* at, const int64_t* cls, int64_t runs, const T* Gt, int64_t Cp,
                 T* __restrict__ u, T* __restrict__ coef) {
  const bool by_run = runs * kShortRun <= len;
  for (int64_t p = 0; p < len; ++p) u[p] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const T *xr = x + d * ld, *gr = Gt + d * Cp;
    if (!by_run) {
      for (int64_t p = 0; p < len; ++p) u[p] += gr[g[p]] * xr[p];
      continue;
    }
    for (int64_t r = 0; r < runs; ++r) {
      const T gv = gr[cls[r]];
      for (int64_t p = at[r]; p < at[r + 1]; ++p) u[p] += gv * xr[p];
    }
  }
  for (int64_t p = 0; p < len; ++p) coef[p] += u[p] * s[p] * s[p] * s[p] * on[p];
}

// The pixels' gradient: out[d, p] = s_p G[g_p, d] - x[d, p] coef_p (G: Gt as above; coef: the
// radial factor of every term), added to out when `add` (the anchor products are there).
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void grad_out(int64_t D, int64_t len, int64_t ld, const T* __restrict__ x,
              const T* __restrict__ s, const int64_t* g, const int64_t* at, const int64_t* cls,
              int64_t runs, const T* Gt, int64_t Cp, const T* __restrict__ coef, bool add,
              T* __restrict__ out, int64_t ldo) {
  const bool by_run = runs * kShortRun <= len;
  for (int64_t d = 0; d < D; ++d) {
    const T *xr = x + d * ld, *gr = Gt + d * Cp;
    T* o = out + d * ldo;
    if (!by_run) {
      if (add) {
        for (int64_t p = 0; p < len; ++p) o[p] += s[p] * gr[g[p]] - xr[p] * coef[p];
      } else {
        for (int64_t p = 0; p < len; ++p) o[p] = s[p] * gr[g[p]] - xr[p] * coef[p];
      }
      continue;
    }
    for (int64_t r = 0; r < runs; ++r) {
      const T gv = gr[cls[r]];
      if (add) {
        for (int64_t p = at[r]; p < at[r + 1]; ++p) o[p] += s[p] * gv - xr[p] * coef[p];
      } else {
        for (int64_t p = at[r]; p < at[r + 1]; ++p) o[p] = s[p] * gv - xr[p] * coef[p];
      }
    }
  }
}

// G (C, D) transposed, with a zero column for ignored pixels: (D, C + 1); zeros without G
at::Tensor padded_t(const at::Tensor& G, int64_t C, int64_t D, const at::TensorOptions& opt) {
  if (!G.defined() || G.numel() == 0) return at::zeros({D, C + 1}, opt);
  return at::cat({G.to(opt.dtype()), at::zeros({1, D}, opt)}).t().contiguous();
}

// Up to this many classes in a tile the class sums are one product, E x^T with E (K x len) the
// pixels' one-hot rows over the tile's K classes scaled by inv: 2K multiply-adds a value at BLAS
// speed beat the run loops' one at scalar speed (labels come in runs of a few pixels at the
// deeper layers); above it, the run loops.
constexpr int64_t kOneHotClasses = 32;

// The classes present in a tile, in order of first appearance (list), and each pixel's row in
// that list (idx; -1 where ignored): the one-hot products take only the tile's classes (a tile
// of a segmentation map holds a few), so they cost 2 K multiply-adds a value for K classes.
struct TileClasses {
  std::vector<int64_t> list, slot;
  std::vector<int64_t> idx;
  int64_t make(const int64_t* g, int64_t len, int64_t C) {
    if (static_cast<int64_t>(slot.size()) != C) slot.assign(C, -1);
    for (const int64_t c : list) slot[c] = -1;
    list.clear();
    idx.resize(len);
    for (int64_t p = 0; p < len; ++p) {
      const int64_t c = g[p];
      if (c < 0 || c >= C) {
        idx[p] = -1;
        continue;
      }
      if (slot[c] < 0) {
        slot[c] = static_cast<int64_t>(list.size());
        list.push_back(c);
      }
      idx[p] = slot[c];
    }
    return static_cast<int64_t>(list.size());
  }
  // e (K x len): pixel p's one-hot row over the tile's classes, scaled by s_p
  template <typename T>
  void scaled_onehot(const T* s, int64_t len, T* e) const {
    std::fill(e, e + static_cast<int64_t>(list.size()) * len, T(0));
    for (int64_t p = 0; p < len; ++p)
      if (idx[p] >= 0) e[idx[p] * len + p] = s[p];
  }
};

// The (D, len) columns of tile (b, lo, len) copied into xb (contiguous: MKL's products with rows
// HW apart run at a third of the speed), and with `normalize` each pixel's inverse norm
// 1 / max(|x_p|, eps) in s (ones without); one read of the tile.
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void copy_and_norms(const T* __restrict__ src, int64_t ld, int64_t D, int64_t len,
                    bool normalize, T* __restrict__ xb, T* __restrict__ s) {
  for (int64_t p = 0; p < len; ++p) s[p] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const T* r = src + d * ld;
    T* o = xb + d * len;
    for (int64_t p = 0; p < len; ++p) {
      o[p] = r[p];
      s[p] += r[p] * r[p];
    }
  }
  for (int64_t p = 0; p < len; ++p)
    s[p] = normalize ? T(1) / std::max(std::sqrt(s[p]), T(kEps)) : T(1);
}

// The class sums, counts and inverse norms in one read of the map.
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_sums_cpu(const at::Tensor& x_,
                                                              const at::Tensor& gt_,
                                                              int64_t num_classes,
                                                              bool normalize) {
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  const int64_t C = num_classes;
  const Tiles tl(x, C, at::elementSize(acc));
  const int64_t D = tl.D, P = tl.B * tl.HW;
  TORCH_CHECK(gt_.numel() == P, "unit_class_sums: gt must have one entry per pixel (", P, ")");
  const at::Tensor gt = gt_.to(at::kLong).contiguous();
  const int64_t* g = gt.data_ptr<int64_t>();
  at::Tensor counts = at::zeros({C}, x.options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    if (g[p] >= 0 && g[p] < C) ++cnt[g[p]];
  at::Tensor inv = at::empty({P}, x.options().dtype(acc));
  at::Tensor part = at::zeros({std::max<int64_t>(tl.chunks, 1), C, D}, x.options().dtype(acc));
  const int64_t kmax = std::min(C, kOneHotClasses);
  AT_DISPATCH_FLOATING_TYPES(acc, "unit_class_sums", [&] {
    using T = scalar_t;
    T* iv = inv.data_ptr<T>();
    const int64_t scratch = (D + kmax) * tl.n + kmax * D;
    for_items<T>(tl.chunks, 2 * kmax * P * D, scratch, [&](int64_t k, at::Tensor& buf) {
      T* sums = part[k].data_ptr<T>();
      T *xb = buf.data_ptr<T>(), *e = xb + D * tl.n, *r = e + kmax * tl.n;
      std::vector<int64_t> at, cls;
      TileClasses tc;
      for (int64_t i = tl.first(k); i < tl.first(k + 1); ++i) {
        int64_t b, lo, len;
        tl.tile(i, b, lo, len);
        const at::Tensor X = cols<T>(x, tl, b, lo, len);
        const int64_t off = b * tl.HW + lo;
        T* s = iv + off;
        copy_and_norms<T>(ptr<T>(X), X.stride(0), D, len, normalize, xb, s);
        const int64_t K = tc.make(g + off, len, C);
        if (K <= kmax) {
          tc.scaled_onehot(s, len, e);
          at::Tensor R = at::from_blob(r, {K, D}, X.options());
          at::mm_out(R, at::from_blob(e, {K, len}, X.options()),
                     at::from_blob(xb, {D, len}, X.options()).t());
          for (int64_t c = 0; c < K; ++c) {
            T* o = sums + tc.list[c] * D;
            const T* q = r + c * D;
            for (int64_t d = 0; d < D; ++d) o[d] += q[d];
          }
        } else {
          class_runs(g + off, len, C, at, cls);
          sums_tile<T>(D, len, len, xb, s, g + off, at.data(), cls.data(),
                       static_cast<int64_t>(cls.size()), C, sums);
        }
      }
    });
  });
  at::Tensor sums = part[0].clone();
  for (int64_t k = 1; k < tl.chunks; ++k) sums.add_(part[k]);         // chunk order: fixed
  return {sums, counts, inv};
}

at::Tensor class_sums_backward_cpu(const at::Tensor& gs_, const at::Tensor& x_,
                                   const at::Tensor& inv_, const at::Tensor& gt_, bool normalize) {
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  const int64_t C = gs_.size(0);
  const Tiles tl(x, C, at::elementSize(acc));
  const int64_t D = tl.D, P = tl.B * tl.HW;
  const at::Tensor gt = gt_.to(at::kLong).contiguous(), inv = inv_.to(acc).contiguous();
  const at::Tensor Gt = padded_t(gs_, C, D, x.options().dtype(acc));
  at::Tensor grad = empty_large(x.sizes(), x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "unit_class_sums_backward", [&] {
    using T = scalar_t;
    const T* iv = ptr<T>(inv);
    const int64_t* g = gt.data_ptr<int64_t>();
    T* out = grad.data_ptr<T>();
    for_items<T>(tl.count, 2 * kScalar * P * D, 4 * tl.n, [&](int64_t i, at::Tensor& buf) {
      int64_t b, lo, len;
      tl.tile(i, b, lo, len);
      const at::Tensor X = cols<T>(x, tl, b, lo, len);
      const int64_t off = b * tl.HW + lo;
      T *s = buf.data_ptr<T>(), *on = s + tl.n, *coef = on + tl.n, *u = coef + tl.n;
      scales(iv, normalize, off, len, s, on);
      std::vector<int64_t> at, cls, gc(len);
      class_runs(g + off, len, C, at, cls, gc.data());
      const int64_t runs = static_cast<int64_t>(cls.size());
      // z . dz = inv (dS_g . x), then the radial factor inv^2 (z . dz), then the gradient
      std::fill(coef, coef + len, T(0));
      sums_radial<T>(D, len, X.stride(0), ptr<T>(X), s, on, gc.data(), at.data(), cls.data(),
                     runs, ptr<T>(Gt), C + 1, u, coef);
      grad_out<T>(D, len, X.stride(0), ptr<T>(X), s, gc.data(), at.data(), cls.data(), runs,
                  ptr<T>(Gt), C + 1, coef, false, out + b * D * tl.HW + lo, tl.HW);
    });
  });
  return grad.to(x_.scalar_type());
}

// ---- anchor_contrast -------------------------------------------------------------------------
// fn(c) for every anchor c that a pixel of error class nc (-1: not selected) is a negative of.
// R1: every anchor but its own class's; R2 (only_own): its own class's only.
template <typename F>
inline void for_negatives(int64_t nc, int64_t C, bool only_own, const F& fn) {
  if (nc < 0) return;
  if (only_own) {
    if (nc < C) fn(nc);
    return;
  }
  for (int64_t c = 0; c < C; ++c)
    if (c != nc) fn(c);
}

// Add (mk, ek), a log-sum-exp as its maximum and the sum of exp(. - max), into (m, e); a single
// value v is (v, 1). -inf: nothing yet.
template <typename T>
inline void lse_add(T& m, T& e, T mk, T ek) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (mk == ninf) return;
  if (mk > m) {
    e = (m == ninf ? T(0) : e * std::exp(m - mk)) + ek;
    m = mk;
  } else {
    e += ek * std::exp(mk - m);
  }
}

template <typename T>
T softplus(T v) { return v > T(20) ? v : std::log1p(std::exp(v)); }    // torch's threshold 20
template <typename T>
T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }

// S (C x len, row stride len, in buf) = a @ X, then column p scaled by f_p = inv_p / t.
template <typename T>
at::Tensor tile_logits(const at::Tensor& a, const at::Tensor& X, T* buf, const T* f, int64_t C,
                       int64_t len) {
  at::Tensor S = at::from_blob(buf, {C, len}, X.options());
  at::mm_out(S, a, X);
  for (int64_t c = 0; c < C; ++c) {
    T* row = buf + c * len;
    for (int64_t p = 0; p < len; ++p) row[p] *= f[p];
  }
  return S;
}

// Tile i of a pass over the logits: its image b, pixels [lo, lo + len), its columns (returned),
// f = inv / t and on per pixel, and its logits in sb.
// The columns are copied into xb (D x n), contiguous (contiguous_cols); the backward's products
// read the copy too.
template <typename T>
at::Tensor logits_of_tile(const Tiles& tl, const at::Tensor& x, const at::Tensor& a, const T* iv,
                          bool normalize, T inv_t, int64_t i, T* sb, T* f, T* on, T* xb,
                          int64_t& b, int64_t& lo, int64_t& len) {
  tl.tile(i, b, lo, len);
  scales(iv, normalize, b * tl.HW + lo, len, f, on);
  for (int64_t p = 0; p < len; ++p) f[p] *= inv_t;
  const at::Tensor X = contiguous_cols<T>(cols<T>(x, tl, b, lo, len), xb);
  tile_logits<T>(a, X, sb, f, a.size(0), len);
  return X;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> anchor_forward_cpu(
    const at::Tensor& x_, const at::Tensor& inv_, const at::Tensor& anchors,
    const at::Tensor& gt_, const at::Tensor& negcls_, double temperature, bool only_own,
    bool normalize, bool keep_logits) {
  TORCH_CHECK_VALUE(!keep_logits, "pixcon::anchor_contrast: the CPU kernel recomputes its logits "
                    "in backward (keep_logits=False)");
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  const int64_t C = anchors.size(0);
  const Tiles tl(x, C, at::elementSize(acc));
  const int64_t D = tl.D, P = tl.B * tl.HW, K = std::max<int64_t>(tl.chunks, 1);
  TORCH_CHECK(anchors.size(1) == D, "anchor_contrast: anchors must be (C, ", D, ")");
  const at::Tensor gt = gt_.to(at::kLong).contiguous(), nc = negcls_.to(at::kLong).contiguous();
  const at::Tensor inv = inv_.to(acc).contiguous(), a = anchors.to(acc).contiguous();
  const auto opt = x.options().dtype(acc);
  at::Tensor loss = at::zeros({C}, opt), sig = at::zeros({C}, opt);
  at::Tensor nl = at::full({C}, -std::numeric_limits<double>::infinity(), opt);
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_contrast", [&] {
    using T = scalar_t;
    const T ninf = -std::numeric_limits<T>::infinity();
    const T *iv = ptr<T>(inv), inv_t = T(1.0 / temperature);
    const int64_t *g = gt.data_ptr<int64_t>(), *ncp = nc.data_ptr<int64_t>();
    std::vector<T> pos(P, T(0));                 // s_{g_p, p}: the positive logit of each pixel
    std::vector<T> mx(K * C, ninf), se(K * C, T(0));   // per chunk: online log-sum-exp
    // pass 1: the logits of every tile, the negatives' log-sum-exp per chunk, the positives
    for_items<T>(K, P * C * D, (C + D) * tl.n + 2 * tl.n, [&](int64_t k, at::Tensor& buf) {
      T *sb = buf.data_ptr<T>(), *f = sb + C * tl.n, *on = f + tl.n, *xb = on + tl.n;
      T *m = mx.data() + k * C, *e = se.data() + k * C;
      for (int64_t i = tl.first(k); i < tl.first(k + 1); ++i) {
        int64_t b, lo, len;
        logits_of_tile<T>(tl, x, a, iv, normalize, inv_t, i, sb, f, on, xb, b, lo, len);
        const int64_t off = b * tl.HW + lo;
        for (int64_t p = 0; p < len; ++p) {
          const int64_t gp = g[off + p], q = ncp[off + p];
          if (gp >= 0 && gp < C) pos[off + p] = sb[gp * len + p];
          for_negatives(q, C, only_own,
                        [&](int64_t c) { lse_add(m[c], e[c], sb[c * len + p], T(1)); });
        }
      }
    });
    // merge the chunks in order: NL_c
    T* nlp = nl.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      T m = ninf, e = 0;
      for (int64_t k = 0; k < K; ++k) lse_add(m, e, mx[k * C + c], se[k * C + c]);
      nlp[c] = m == ninf ? ninf : m + std::log(e);
    }
    // pass 2: softplus(NL_g - s_{g,p}) and its sigmoid over the pixels of classes with negatives
    std::vector<T> pl(K * C, T(0)), ps(K * C, T(0));
    for_items<T>(K, 0, 0, [&](int64_t k, at::Tensor&) {
      for (int64_t i = tl.first(k); i < tl.first(k + 1); ++i) {
        int64_t b, lo, len;
        tl.tile(i, b, lo, len);
        const int64_t off = b * tl.HW + lo;
        for (int64_t p = off; p < off + len; ++p) {
          const int64_t gp = g[p];
          if (gp < 0 || gp >= C || nlp[gp] == ninf) continue;
          const T v = nlp[gp] - pos[p];
          pl[k * C + gp] += softplus(v);
          ps[k * C + gp] += sigmoid(v);
        }
      }
    });
    T *lp = loss.data_ptr<T>(), *sp = sig.data_ptr<T>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) { lp[c] += pl[k * C + c]; sp[c] += ps[k * C + c]; }
  });
  return {loss, nl, sig, at::empty({0}, opt)};
}

// The backward's per-call constants, and what it does on one tile.
template <typename T>
struct Backward {
  int64_t C;
  bool only_own, normalize;
  const T *iv, *G, *nl;
  const int64_t *g, *nc;
  T inv_t;
  std::vector<T> wneg, nl0;                 // G_c Sig_c on each negative; NL (0: none)

  Backward(int64_t C_, bool own, bool norm, const T* iv_, const T* G_, const T* nl_,
           const T* sig, const int64_t* g_, const int64_t* nc_, T inv_t_)
      : C(C_), only_own(own), normalize(norm), iv(iv_), G(G_), nl(nl_), g(g_), nc(nc_),
        inv_t(inv_t_), wneg(C_), nl0(C_) {
    for (int64_t c = 0; c < C; ++c) {
      wneg[c] = G[c] * sig[c];
      nl0[c] = std::isinf(nl[c]) ? T(0) : nl[c];
    }
  }

  // From tile (off, len)'s logits sb (C x len): W = ds inv / t in w (C x len) and each pixel's
  // radial factor coef_p = inv_p^2 on_p (s . ds)_p (z . dz = s . ds).
  void weights(const T* sb, const T* f, const T* on, int64_t off, int64_t len, T* w,
               T* coef) const {
    const T ninf = -std::numeric_limits<T>::infinity();
    std::fill(w, w + C * len, T(0));
    for (int64_t p = 0; p < len; ++p) {
      const int64_t gp = g[off + p], q = nc[off + p];
      for_negatives(q, C, only_own, [&](int64_t c) {
        w[c * len + p] = wneg[c] * std::exp(sb[c * len + p] - nl0[c]);
      });
      if (gp >= 0 && gp < C && nl[gp] != ninf)
        w[gp * len + p] -= G[gp] * sigmoid(nl0[gp] - sb[gp * len + p]);
    }
    std::fill(coef, coef + len, T(0));
    for (int64_t c = 0; c < C; ++c) {
      const T *sr = sb + c * len, *dr = w + c * len;
      for (int64_t p = 0; p < len; ++p) coef[p] += sr[p] * dr[p];
    }
    for (int64_t c = 0; c < C; ++c) {
      T* dr = w + c * len;
      for (int64_t p = 0; p < len; ++p) dr[p] *= f[p];
    }
    for (int64_t p = 0; p < len; ++p) coef[p] *= iv[off + p] * iv[off + p] * on[p];
  }
};

// What pass A keeps for pass B: each tile's W and coef, (C + 1) x len values at (off) (C + 1),
// when C + 1 accumulator values are no larger than the pixel's embedding row (else nothing:
// pass B remakes them, one more product).
int64_t kept_size(const at::Tensor& x, int64_t C) {
  const int64_t D = x.size(1), P = x.size(0) * x.size(2) * x.size(3);
  const int64_t acc = static_cast<int64_t>(at::elementSize(acc_type(x)));
  return (C + 1) * acc <= D * static_cast<int64_t>(x.element_size()) ? P * (C + 1) : 0;
}

// Pass A of the backward: the anchors' gradient da = W x^T (partials per chunk, merged in
// order), and what pass B needs (kept_size).
std::tuple<at::Tensor, at::Tensor> anchor_da_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& inv_,
    const at::Tensor& anchors, const at::Tensor& gt_, const at::Tensor& negcls_,
    const at::Tensor& nl_, const at::Tensor& sig_, const at::Tensor& /*logits: recomputed*/,
    double temperature, bool only_own, bool normalize) {
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  const int64_t C = anchors.size(0);
  const Tiles tl(x, C, at::elementSize(acc));
  const int64_t D = tl.D, P = tl.B * tl.HW, K = std::max<int64_t>(tl.chunks, 1);
  const at::Tensor gt = gt_.to(at::kLong).contiguous(), nc = negcls_.to(at::kLong).contiguous();
  const at::Tensor inv = inv_.to(acc).contiguous(), a = anchors.to(acc).contiguous();
  const at::Tensor G = grad_.to(acc).contiguous(), nl = nl_.to(acc).contiguous();
  const at::Tensor sig = sig_.to(acc).contiguous();
  at::Tensor kept = at::empty({kept_size(x, C)}, x.options().dtype(acc));
  at::Tensor part = at::zeros({K, C, D}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_contrast_da", [&] {
    using T = scalar_t;
    const Backward<T> bw(C, only_own, normalize, ptr<T>(inv), ptr<T>(G), ptr<T>(nl), ptr<T>(sig),
                         gt.data_ptr<int64_t>(), nc.data_ptr<int64_t>(), T(1.0 / temperature));
    T* kp = kept.numel() ? kept.data_ptr<T>() : nullptr;
    for_items<T>(K, 2 * P * C * D, (2 * C + D) * tl.n + 3 * tl.n, [&](int64_t k, at::Tensor& buf) {
      T *sb = buf.data_ptr<T>(), *w = sb + C * tl.n, *f = w + C * tl.n, *on = f + tl.n;
      T *coef = on + tl.n, *xb = coef + tl.n;
      at::Tensor da = part[k];
      for (int64_t i = tl.first(k); i < tl.first(k + 1); ++i) {
        int64_t b, lo, len;
        const at::Tensor X = logits_of_tile<T>(tl, x, a, bw.iv, normalize, bw.inv_t, i, sb, f,
                                               on, xb, b, lo, len);
        const int64_t off = b * tl.HW + lo;
        T* wt = kp ? kp + off * (C + 1) : w;           // W straight into what is kept
        bw.weights(sb, f, on, off, len, wt, kp ? wt + C * len : coef);
        da.addmm_(at::from_blob(wt, {C, len}, X.options()), X.t());
      }
    });
  });
  at::Tensor da = part[0].clone();
  for (int64_t k = 1; k < K; ++k) da.add_(part[k]);                  // chunk order: fixed
  return {da.to(anchors.scalar_type()), kept};
}

// o[p] = t[p] - x[p] c[p] for p < n, each element one fused multiply-add. Float rows on AVX-512
// are stored non-temporally: pass B writes the embedding-sized gradient once and nothing reads
// it back in this op, so a plain store's read of each line first (its read-for-ownership) is
// wasted traffic. The caller fences (_mm_sfence) before its results are read.
__attribute__((target("avx512f,fma"))) void fms_stream(float* o, const float* t, const float* x,
                                                       const float* c, int64_t n) {
  int64_t p = 0;
  for (; p < n && (reinterpret_cast<uintptr_t>(o + p) & 63) != 0; ++p)
    o[p] = std::fma(-x[p], c[p], t[p]);
  for (; p + 16 <= n; p += 16)
    _mm512_stream_ps(o + p, _mm512_fnmadd_ps(_mm512_loadu_ps(x + p), _mm512_loadu_ps(c + p),
                                             _mm512_loadu_ps(t + p)));
  for (; p < n; ++p) o[p] = std::fma(-x[p], c[p], t[p]);
}

template <typename T>
bool fms_streamed(T*, const T*, const T*, const T*, int64_t) { return false; }
template <>
bool fms_streamed<float>(float* o, const float* t, const float* x, const float* c, int64_t n) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (!avx512) return false;
  fms_stream(o, t, x, c, n);
  return true;
}

// Pass B: each pixel's gradient written once, dx = a^T W + inv dS_g - x (coef + inv^3 on
// (dS_g . x)): the anchor terms' (W, coef: kept by pass A or remade) and, given the gradient dS
// (C, D) of the layer's unit class sums (empty: none), theirs.
at::Tensor anchor_dx_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& inv_,
    const at::Tensor& anchors, const at::Tensor& gt_, const at::Tensor& negcls_,
    const at::Tensor& nl_, const at::Tensor& sig_, const at::Tensor& /*logits: recomputed*/,
    const at::Tensor& kept_, const at::Tensor& dsums, double temperature, bool only_own,
    bool normalize) {
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  const int64_t C = anchors.size(0);
  const Tiles tl(x, C, at::elementSize(acc));
  const int64_t D = tl.D, P = tl.B * tl.HW;
  const at::Tensor gt = gt_.to(at::kLong).contiguous(), nc = negcls_.to(at::kLong).contiguous();
  const at::Tensor inv = inv_.to(acc).contiguous(), a = anchors.to(acc).contiguous();
  const at::Tensor aT = a.t().contiguous();
  const at::Tensor G = grad_.to(acc).contiguous(), nl = nl_.to(acc).contiguous();
  const at::Tensor sig = sig_.to(acc).contiguous(), kept = kept_.to(acc).contiguous();
  TORCH_CHECK(kept.numel() == 0 || kept.numel() == P * (C + 1),
              "anchor_contrast_dx: kept must be anchor_contrast_da's (", P * (C + 1), " values)");
  const bool has_ds = dsums.numel() > 0;
  // Up to kOneHotClasses classes the class sums' terms are products too: a^T W + dS^T E in one
  // (E: the tile's one-hot rows scaled by inv) and u = dS x read at each pixel's class; above
  // that the run loops (Gt).
  // Tiles of at most kOneHotClasses classes take the class sums' terms as products too:
  // a^T W + dS_t^T E and u = dS_t x read at each pixel's class, dS_t the rows of the tile's K
  // classes, E their one-hot rows scaled by inv; other tiles the run loops (Gt).
  const at::Tensor Gt = padded_t(dsums, C, D, x.options().dtype(acc));
  const at::Tensor dS = has_ds ? dsums.to(acc).contiguous() : at::Tensor();
  const int64_t kmax = has_ds ? std::min(C, kOneHotClasses) : 0;
  at::Tensor grad = empty_large(x.sizes(), x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_contrast_dx", [&] {
    using T = scalar_t;
    const Backward<T> bw(C, only_own, normalize, ptr<T>(inv), ptr<T>(G), ptr<T>(nl), ptr<T>(sig),
                         gt.data_ptr<int64_t>(), nc.data_ptr<int64_t>(), T(1.0 / temperature));
    const T* kp = kept.numel() ? kept.data_ptr<T>() : nullptr;
    const T* dsp = has_ds ? ptr<T>(dS) : nullptr;
    T* out = grad.data_ptr<T>();
    const int64_t work = (kp ? 1 : 2) * P * C * D + (has_ds ? 4 * kmax : kScalar) * P * D;
    const int64_t scratch = (2 * C + kmax + 2 * D + 4) * tl.n + kmax * D;
    for_items<T>(tl.count, work, scratch, [&](int64_t i, at::Tensor& buf) {
      T *sb = buf.data_ptr<T>(), *w = sb + C * tl.n, *e = w + C * tl.n, *f = e + kmax * tl.n;
      T *on = f + tl.n, *coef = on + tl.n, *u = coef + tl.n, *xb = u + tl.n, *ob = xb + D * tl.n;
      T* dsb = ob + D * tl.n;
      int64_t b, lo, len;
      at::Tensor X;
      if (kp) {
        tl.tile(i, b, lo, len);
        scales(bw.iv, normalize, b * tl.HW + lo, len, f, on);
        X = cols<T>(x, tl, b, lo, len);
        const T* wt = kp + (b * tl.HW + lo) * (C + 1);
        std::copy(wt, wt + C * len, w);
        std::copy(wt + C * len, wt + (C + 1) * len, coef);
      } else {
        X = logits_of_tile<T>(tl, x, a, bw.iv, normalize, bw.inv_t, i, sb, f, on, xb, b, lo,
                              len);
        bw.weights(sb, f, on, b * tl.HW + lo, len, w, coef);          // f = inv / t here
        scales(bw.iv, normalize, b * tl.HW + lo, len, f, on);          // f = inv from here on
      }
      const int64_t off = b * tl.HW + lo;
      const int64_t* g = bw.g + off;
      TileClasses tc;
      const int64_t K = has_ds ? tc.make(g, len, C) : 0;
      if (has_ds && K <= kmax) {
        X = contiguous_cols<T>(X, xb);                 // the products' operand
        tc.scaled_onehot(f, len, e);
        for (int64_t c = 0; c < K; ++c)
          std::copy(dsp + tc.list[c] * D, dsp + (tc.list[c] + 1) * D, dsb + c * D);
        const at::Tensor dSt = at::from_blob(dsb, {K, D}, X.options());
        at::Tensor O = at::from_blob(ob, {D, len}, X.options());
        at::mm_out(O, aT, at::from_blob(w, {C, len}, X.options()));
        O.addmm_(dSt.t(), at::from_blob(e, {K, len}, X.options()));
        at::Tensor U = at::from_blob(sb, {K, len}, X.options());
        at::mm_out(U, dSt, X);                         // u_p = (dS x)_{g_p, p}
        for (int64_t p = 0; p < len; ++p)
          if (tc.idx[p] >= 0) coef[p] += sb[tc.idx[p] * len + p] * f[p] * f[p] * f[p] * on[p];
        const T* xp = ptr<T>(X);
        bool fenced = false;
        for (int64_t d = 0; d < D; ++d) {
          const T *xr = xp + d * X.stride(0), *t = ob + d * len;
          T* o = out + (b * D + d) * tl.HW + lo;
          if (fms_streamed(o, t, xr, coef, len)) {
            fenced = true;
            continue;
          }
          for (int64_t p = 0; p < len; ++p) o[p] = t[p] - xr[p] * coef[p];
        }
        if (fenced) _mm_sfence();                      // the streamed rows visible to readers
        return;
      }
      at::Tensor dst = grad.select(0, b).view({D, tl.HW}).narrow(1, lo, len);
      at::mm_out(dst, aT, at::from_blob(w, {C, len}, X.options()));
      std::vector<int64_t> at, cls, gc(len);
      class_runs(g, len, C, at, cls, gc.data());
      const int64_t runs = static_cast<int64_t>(cls.size());
      if (has_ds)
        sums_radial<T>(D, len, X.stride(0), ptr<T>(X), f, on, gc.data(), at.data(), cls.data(),
                       runs, ptr<T>(Gt), C + 1, u, coef);
      grad_out<T>(D, len, X.stride(0), ptr<T>(X), f, gc.data(), at.data(), cls.data(), runs,
                  ptr<T>(Gt), C + 1, coef, true, out + b * D * tl.HW + lo, tl.HW);
    });
  });
  return grad.to(x_.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("inv_norms", &inv_norms_cpu);
  m.impl("unit_class_sums", &class_sums_cpu);
  m.impl("unit_class_sums_backward", &class_sums_backward_cpu);
  m.impl("anchor_contrast", &anchor_forward_cpu);
  m.impl("anchor_contrast_da", &anchor_da_cpu);
  m.impl("anchor_contrast_dx", &anchor_dx_cpu);
}

}  // namespace pixcon
