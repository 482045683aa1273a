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
// + inv^3 on (dS_g . x)).
//
// Sparse tiles: the loss reads s_{c,p} only at each pixel's own class and at the columns of
// BANE's selected negatives (about a tenth of the pixels), and ds (so W) is nonzero only there.
// So a tile takes each pixel's own logit as one dot product with its class's anchor (a lookup in
// the transposed anchor table, one permute per 16 pixels where C < 32) and the negatives' whole
// columns as one small product over their gathered columns; its gradient likewise is one anchor
// row a pixel plus that product at the negatives. About C times fewer multiply-adds than dense
// (C x n) tiles: each pass is bound by its read of the embedding. Nothing is kept between the
// passes but one positive logit per pixel while the forward runs; pass B remakes its weights.
//
// Parallel shape: one pass = one region of work items claimed from a counter (items.h). An item
// is a chunk of consecutive tiles with its own partial sums ((C, D), online log-sum-exp (C,)),
// merged in chunk order afterwards; the chunks depend on the sizes only, so results are the same
// on any number of threads. A tile holds (D + 2C) x n values of about 768 KiB (L2) and never
// spans two images; BLAS runs single-threaded inside the region (float: gemm.h's kernels).
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
#include <type_traits>
#include <vector>

#include "gemm.h"
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

// The tiles' products: float through gemm.h's kernels where the CPU has them (one side is
// class-sized, where BLAS is slow), else BLAS.
template <typename T>
bool own_gemm(int64_t table = 0) {
  if constexpr (std::is_same_v<T, float>)
    return table <= gemm::kMaxTable && gemm::available();
  return false;
}

template <typename T>
void add_products_t(const T* A, int64_t lda, const at::Tensor& B, int64_t M, T* c, int64_t ldc) {
  const int64_t N = B.size(0), len = B.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (own_gemm<T>()) {
      gemm::nt(M, N, len, A, lda, ptr<T>(B), B.stride(0), c, ldc);
      return;
    }
  }
  at::Tensor out = at::from_blob(c, {M, N}, {ldc, 1}, B.options());
  out.addmm_(at::from_blob(const_cast<T*>(A), {M, len}, {lda, 1}, B.options()), B.t());
}

// out (M x N, rows ldo apart) = A (M x K, rows lda apart) B (K x N, rows ldb apart); the class
// table lookups of gemm.h (float, C + 1 <= 32, AVX-512). Each is false where the kernel does not
// run: the caller then takes BLAS or its run loops.
template <typename T>
bool own_mm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
            T* out, int64_t ldo) {
  if constexpr (std::is_same_v<T, float>) {
    if (!own_gemm<T>()) return false;
    gemm::mm(M, N, K, a, lda, b, ldb, out, ldo);
    return true;
  }
  return false;
}
template <typename T>
bool fast_dots(int64_t D, int64_t len, const T* x, int64_t ld, const int32_t* gi, const T* Tt,
               int64_t Cp, T* u) {
  if constexpr (std::is_same_v<T, float>) {
    if (!own_gemm<T>(Cp)) return false;
    gemm::class_dots(D, len, x, ld, gi, Tt, Cp, u);
    return true;
  }
  return false;
}
template <typename T>
bool fast_row(int64_t len, const T* A, const T* B, const T* w, const T* s, const int32_t* gi,
              int64_t Cp, T* row) {
  if constexpr (std::is_same_v<T, float>) {
    if (!own_gemm<T>(Cp)) return false;
    gemm::class_row(len, A, B, w, s, gi, Cp, row);
    return true;
  }
  return false;
}
template <typename T>
bool fast_sums(int64_t D, int64_t len, const T* x, int64_t ld, const int32_t* gi, const T* w,
               int64_t Cp, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (!own_gemm<T>(Cp)) return false;
    gemm::class_sums(D, len, x, ld, gi, w, Cp, out, D);
    return true;
  }
  return false;
}

// s[p] = 1 / max(|x_p|, eps) for a tile's columns (x: D rows ld apart), ones without normalize
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void tile_norms(const T* __restrict__ x, int64_t ld, int64_t D, int64_t len, bool normalize,
                T* __restrict__ s) {
  for (int64_t p = 0; p < len; ++p) s[p] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const T* r = x + d * ld;
    for (int64_t p = 0; p < len; ++p) s[p] += r[p] * r[p];
  }
  for (int64_t p = 0; p < len; ++p)
    s[p] = normalize ? T(1) / std::max(std::sqrt(s[p]), T(kEps)) : T(1);
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
      tile_norms<T>(ptr<T>(X), X.stride(0), tl.D, len, true, o + b * tl.HW + lo);
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

// u[p] = sum_d Tt[d, gc_p] x[d, p]: each pixel's dot product with its class's row of a table
// given transposed, Tt (D, Cp) with a zero column C (ignored pixels; gc: each pixel's class, C
// where ignored), by runs where they are long.
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void class_dots(int64_t D, int64_t len, int64_t ld, const T* __restrict__ x, const int64_t* gc,
                const int64_t* at, const int64_t* cls, int64_t runs, const T* Tt, int64_t Cp,
                T* __restrict__ u) {
  const bool by_run = runs * kShortRun <= len;
  for (int64_t p = 0; p < len; ++p) u[p] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const T *xr = x + d * ld, *tr = Tt + d * Cp;
    if (!by_run) {
      for (int64_t p = 0; p < len; ++p) u[p] += tr[gc[p]] * xr[p];
      continue;
    }
    for (int64_t r = 0; r < runs; ++r) {
      const T tv = tr[cls[r]];
      for (int64_t p = at[r]; p < at[r + 1]; ++p) u[p] += tv * xr[p];
    }
  }
}

// The class sums' gradient on a tile, in two steps. Gt: their gradient G transposed, (D, C + 1)
// with a zero column C; g: each pixel's class, C where ignored.
// Radial factor: coef[p] += s_p^3 on_p (G_{g_p} . x_p).
template <typename T>
void sums_radial(int64_t D, int64_t len, int64_t ld, const T* x, const T* s, const T* on,
                 const int64_t* g, const int64_t* at, const int64_t* cls, int64_t runs,
                 const T* Gt, int64_t Cp, T* u, T* coef) {
  class_dots<T>(D, len, ld, x, g, at, cls, runs, Gt, Cp, u);
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
      std::vector<int32_t> gi(tl.n);
      TileClasses tc;
      for (int64_t i = tl.first(k); i < tl.first(k + 1); ++i) {
        int64_t b, lo, len;
        tl.tile(i, b, lo, len);
        const at::Tensor X = cols<T>(x, tl, b, lo, len);
        const int64_t off = b * tl.HW + lo;
        T* s = iv + off;
        if (own_gemm<T>(C + 1)) {                       // masked lane sums, no copy
          tile_norms<T>(ptr<T>(X), X.stride(0), D, len, normalize, s);
          for (int64_t p = 0; p < len; ++p)
            gi[p] = static_cast<int32_t>(g[off + p] >= 0 && g[off + p] < C ? g[off + p] : C);
          if (fast_sums(D, len, ptr<T>(X), X.stride(0), gi.data(), s, C + 1, sums)) continue;
        }
        copy_and_norms<T>(ptr<T>(X), X.stride(0), D, len, normalize, xb, s);
        const int64_t K = tc.make(g + off, len, C);
        if (K <= kmax) {
          tc.scaled_onehot(s, len, e);
          std::fill(r, r + K * D, T(0));
          add_products_t<T>(e, len, at::from_blob(xb, {D, len}, X.options()), K, r, D);
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

// out (M x N, rows ldo apart) = A (M x K) B (K x N), rows lda / ldb apart: gemm.h's kernels for
// float, else BLAS.
template <typename T>
void mm_into(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
             T* out, int64_t ldo) {
  if (M == 0 || N == 0) return;
  if (own_mm(M, N, K, a, lda, b, ldb, out, ldo)) return;
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor o = at::from_blob(out, {M, N}, {ldo, 1}, opt);
  if (K == 0) {
    o.zero_();
    return;
  }
  at::mm_out(o, at::from_blob(const_cast<T*>(a), {M, K}, {lda, 1}, opt),
             at::from_blob(const_cast<T*>(b), {K, N}, {ldb, 1}, opt));
}

// row[p] = wpos_p At[gc_p] + s_p Gt[gc_p] for the pixels of a tile (At, Gt: row d of the
// anchors' and of the class sums' gradient tables, C + 1 entries, the last zero), by runs.
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void class_row(int64_t len, const T* At, const T* Gt, const T* __restrict__ wpos,
               const T* __restrict__ s, const int64_t* gc, const int64_t* at, const int64_t* cls,
               int64_t runs, T* __restrict__ row) {
  if (runs * kShortRun > len) {
    for (int64_t p = 0; p < len; ++p) row[p] = wpos[p] * At[gc[p]] + s[p] * Gt[gc[p]];
    return;
  }
  for (int64_t r = 0; r < runs; ++r) {
    const T av = At[cls[r]], gv = Gt[cls[r]];
    for (int64_t p = at[r]; p < at[r + 1]; ++p) row[p] = wpos[p] * av + s[p] * gv;
  }
}

// A tile's logits where the loss reads them, s_{c,p} = inv_p (a_c . x_p) / t: each pixel's own
// class's, pos_p (the dot product with its class's anchor, by runs of equal class), and the
// whole column of each of the tile's BANE negatives (q: about a tenth of the pixels), sn
// (C x nq) = a xn scaled, xn (D x nq) their gathered columns. Each pixel's gradient is likewise
// one anchor's row plus, at the negatives, a product over all anchors: C times fewer
// multiply-adds than a dense (C x n) tile, the pass bound by its read of the tile.
template <typename T>
struct SparseTile {
  int64_t C, D;
  bool only_own, normalize;
  T inv_t;
  const T *iv, *a, *aTp;                // inverse norms; anchors (C, D); (D, C + 1) transposed
  const int64_t *g, *nc;
  // the tile
  int64_t b = 0, lo = 0, len = 0, off = 0, nq = 0, runs = 0, ld = 0;
  const T* X = nullptr;                 // its (D, len) columns, rows ld apart
  at::Tensor Xt;
  std::vector<int64_t> at, cls, gc, q;
  std::vector<int32_t> gi;              // gc as int32 (the permute lookups' indices)
  T *f, *on, *pos, *wpos, *coef, *u, *row, *xn, *sn, *wn, *y;   // in the thread's scratch

  static int64_t scratch(int64_t C, int64_t D, int64_t n) { return (2 * D + 2 * C + 7) * n; }
  SparseTile(int64_t C_, int64_t D_, bool own, bool norm, T inv_t_, const T* iv_, const T* a_,
             const T* aTp_, const int64_t* g_, const int64_t* nc_, T* buf, int64_t n)
      : C(C_), D(D_), only_own(own), normalize(norm), inv_t(inv_t_), iv(iv_), a(a_), aTp(aTp_),
        g(g_), nc(nc_) {
    f = buf; on = f + n; pos = on + n; wpos = pos + n; coef = wpos + n; u = coef + n;
    row = u + n; xn = row + n; sn = xn + D * n; wn = sn + C * n; y = wn + C * n;
  }

  // tile i: f = inv / t and on, the class runs, pos, the negatives and their logits
  void logits(const Tiles& tl, const at::Tensor& x, int64_t i) {
    tl.tile(i, b, lo, len);
    off = b * tl.HW + lo;
    Xt = cols<T>(x, tl, b, lo, len);
    X = ptr<T>(Xt);
    ld = Xt.stride(0);
    scales(iv, normalize, off, len, f, on);
    for (int64_t p = 0; p < len; ++p) f[p] *= inv_t;
    gc.resize(len);
    class_runs(g + off, len, C, at, cls, gc.data());
    runs = static_cast<int64_t>(cls.size());
    gi.resize(len);
    for (int64_t p = 0; p < len; ++p) gi[p] = static_cast<int32_t>(gc[p]);
    dots(aTp, pos);
    for (int64_t p = 0; p < len; ++p) pos[p] *= f[p];
    q.clear();
    for (int64_t p = 0; p < len; ++p)
      if (nc[off + p] >= 0) q.push_back(p);
    nq = static_cast<int64_t>(q.size());
    if (nq == 0) return;
    for (int64_t d = 0; d < D; ++d) {
      const T* xr = X + d * ld;
      T* o = xn + d * nq;
      for (int64_t j = 0; j < nq; ++j) o[j] = xr[q[j]];
    }
    mm_into<T>(C, nq, D, a, D, xn, nq, sn, nq);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < nq; ++j) sn[c * nq + j] *= f[q[j]];
  }

  // u[p] = sum_d Tt[d, g_p] x[d, p], Tt (D, C + 1) with a zero column C
  void dots(const T* Tt, T* u) const {
    if (!fast_dots(D, len, X, ld, gi.data(), Tt, C + 1, u))
      class_dots<T>(D, len, ld, X, gc.data(), at.data(), cls.data(), runs, Tt, C + 1, u);
  }

  // The backward's weights (after logits): ds at each pixel's own class, ds_{g,p} =
  // -G_g sigmoid(NL_g - s_{g,p}) (classes with negatives), and at the negatives' columns
  // ds_{c,q} = G_c Sig_c exp(s_{c,q} - NL_c) too; W = ds inv / t, kept as wpos_p (0 at the
  // negatives) and wn (C x nq); coef_p = inv_p^2 on_p (s . ds)_p.
  void weights(const T* G, const T* nl, const T* wneg, const T* nl0) {
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t p = 0; p < len; ++p) {
      const int64_t gp = gc[p];
      wpos[p] = 0;
      coef[p] = 0;
      if (nc[off + p] >= 0 || gp >= C || nl[gp] == ninf) continue;
      const T ds = -G[gp] * sigmoid(nl0[gp] - pos[p]);
      coef[p] = pos[p] * ds;
      wpos[p] = ds * f[p];
    }
    std::fill(wn, wn + C * nq, T(0));
    for (int64_t j = 0; j < nq; ++j) {
      const int64_t p = q[j], gp = gc[p];
      for_negatives(nc[off + p], C, only_own, [&](int64_t c) {
        wn[c * nq + j] = wneg[c] * std::exp(sn[c * nq + j] - nl0[c]);
      });
      if (gp < C && nl[gp] != ninf) wn[gp * nq + j] -= G[gp] * sigmoid(nl0[gp] - sn[gp * nq + j]);
      T acc = 0;
      for (int64_t c = 0; c < C; ++c) acc += sn[c * nq + j] * wn[c * nq + j];
      coef[p] = acc;
      for (int64_t c = 0; c < C; ++c) wn[c * nq + j] *= f[p];
    }
    for (int64_t p = 0; p < len; ++p) coef[p] *= iv[off + p] * iv[off + p] * on[p];
  }
};

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
  const at::Tensor aTp = padded_t(a, C, D, opt);
  at::Tensor loss = at::zeros({C}, opt), sig = at::zeros({C}, opt);
  at::Tensor nl = at::full({C}, -std::numeric_limits<double>::infinity(), opt);
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_contrast", [&] {
    using T = scalar_t;
    const T ninf = -std::numeric_limits<T>::infinity();
    const T *iv = ptr<T>(inv), inv_t = T(1.0 / temperature);
    const int64_t *g = gt.data_ptr<int64_t>(), *ncp = nc.data_ptr<int64_t>();
    std::vector<T> pos(P, T(0));                 // s_{g_p, p}: the positive logit of each pixel
    std::vector<T> mx(K * C, ninf), se(K * C, T(0));   // per chunk: online log-sum-exp
    // pass 1: each tile's logits, the negatives' log-sum-exp per chunk, the positives
    for_items<T>(K, kScalar * P * D, SparseTile<T>::scratch(C, D, tl.n),
                 [&](int64_t k, at::Tensor& buf) {
      SparseTile<T> st(C, D, only_own, normalize, inv_t, iv, ptr<T>(a), ptr<T>(aTp), g, ncp,
                       buf.data_ptr<T>(), tl.n);
      T *m = mx.data() + k * C, *e = se.data() + k * C;
      for (int64_t i = tl.first(k); i < tl.first(k + 1); ++i) {
        st.logits(tl, x, i);
        for (int64_t p = 0; p < st.len; ++p)
          if (st.gc[p] < C) pos[st.off + p] = st.pos[p];
        for (int64_t j = 0; j < st.nq; ++j)
          for_negatives(ncp[st.off + st.q[j]], C, only_own, [&](int64_t c) {
            lse_add(m[c], e[c], st.sn[c * st.nq + j], T(1));
          });
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

// The backward's per-call constants.
template <typename T>
struct BackwardConsts {
  std::vector<T> wneg, nl0;                 // G_c Sig_c on each negative; NL (0: none)
  BackwardConsts(int64_t C, const T* G, const T* nl, const T* sig) : wneg(C), nl0(C) {
    for (int64_t c = 0; c < C; ++c) {
      wneg[c] = G[c] * sig[c];
      nl0[c] = std::isinf(nl[c]) ? T(0) : nl[c];
    }
  }
};

// Pass A of the backward: the anchors' gradient da = W x^T (partials per chunk, merged in
// order): each pixel's weight times its row into its class's row of da, by runs, and the
// negatives' columns as one product. Nothing is kept for pass B: it remakes the same sparse
// weights (a tenth of a dense tile's work) from its one read of the tile.
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
  const auto opt = x.options().dtype(acc);
  const at::Tensor inv = inv_.to(acc).contiguous(), a = anchors.to(acc).contiguous();
  const at::Tensor aTp = padded_t(a, C, D, opt);
  const at::Tensor G = grad_.to(acc).contiguous(), nl = nl_.to(acc).contiguous();
  const at::Tensor sig = sig_.to(acc).contiguous();
  at::Tensor part = at::zeros({K, C, D}, opt);
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_contrast_da", [&] {
    using T = scalar_t;
    const BackwardConsts<T> bc(C, ptr<T>(G), ptr<T>(nl), ptr<T>(sig));
    for_items<T>(K, 2 * kScalar * P * D, SparseTile<T>::scratch(C, D, tl.n),
                 [&](int64_t k, at::Tensor& buf) {
      SparseTile<T> st(C, D, only_own, normalize, T(1.0 / temperature), ptr<T>(inv), ptr<T>(a),
                       ptr<T>(aTp), gt.data_ptr<int64_t>(), nc.data_ptr<int64_t>(),
                       buf.data_ptr<T>(), tl.n);
      T* da = part[k].data_ptr<T>();
      for (int64_t i = tl.first(k); i < tl.first(k + 1); ++i) {
        st.logits(tl, x, i);
        st.weights(ptr<T>(G), ptr<T>(nl), bc.wneg.data(), bc.nl0.data());
        if (!fast_sums(D, st.len, st.X, st.ld, st.gi.data(), st.wpos, C + 1, da))
          sums_tile<T>(D, st.len, st.ld, st.X, st.wpos, st.gc.data(), st.at.data(),
                       st.cls.data(), st.runs, C, da);
        if (st.nq > 0)
          add_products_t<T>(st.wn, st.nq, at::from_blob(st.xn, {D, st.nq}, opt), C, da, D);
      }
    });
  });
  at::Tensor da = part[0].clone();
  for (int64_t k = 1; k < K; ++k) da.add_(part[k]);                  // chunk order: fixed
  return {da.to(anchors.scalar_type()), at::empty({0}, opt)};
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
// (dS_g . x)): the anchor terms (W, coef remade as in pass A: one anchor row a pixel, a product
// at the negatives) and, given the gradient dS (C, D) of the layer's unit class sums (empty:
// none), theirs. kept: unused (pass A keeps nothing on the CPU).
at::Tensor anchor_dx_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& inv_,
    const at::Tensor& anchors, const at::Tensor& gt_, const at::Tensor& negcls_,
    const at::Tensor& nl_, const at::Tensor& sig_, const at::Tensor& /*logits: recomputed*/,
    const at::Tensor& /*kept*/, const at::Tensor& dsums, double temperature, bool only_own,
    bool normalize) {
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  const int64_t C = anchors.size(0);
  const Tiles tl(x, C, at::elementSize(acc));
  const int64_t D = tl.D, P = tl.B * tl.HW;
  const at::Tensor gt = gt_.to(at::kLong).contiguous(), nc = negcls_.to(at::kLong).contiguous();
  const auto opt = x.options().dtype(acc);
  const at::Tensor inv = inv_.to(acc).contiguous(), a = anchors.to(acc).contiguous();
  const at::Tensor aTp = padded_t(a, C, D, opt);
  const at::Tensor G = grad_.to(acc).contiguous(), nl = nl_.to(acc).contiguous();
  const at::Tensor sig = sig_.to(acc).contiguous();
  const bool has_ds = dsums.numel() > 0;
  const at::Tensor Gt = padded_t(dsums, C, D, opt);        // zeros without dS
  at::Tensor grad = empty_large(x.sizes(), opt);
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_contrast_dx", [&] {
    using T = scalar_t;
    const BackwardConsts<T> bc(C, ptr<T>(G), ptr<T>(nl), ptr<T>(sig));
    const T *aT = ptr<T>(aTp), *gtab = ptr<T>(Gt);
    T* out = grad.data_ptr<T>();
    for_items<T>(tl.count, 3 * kScalar * P * D, SparseTile<T>::scratch(C, D, tl.n) + tl.n,
                 [&](int64_t i, at::Tensor& buf) {
      SparseTile<T> st(C, D, only_own, normalize, T(1.0 / temperature), ptr<T>(inv), ptr<T>(a),
                       aT, gt.data_ptr<int64_t>(), nc.data_ptr<int64_t>(), buf.data_ptr<T>(),
                       tl.n);
      T* s = buf.data_ptr<T>() + SparseTile<T>::scratch(C, D, tl.n);
      st.logits(tl, x, i);
      st.weights(ptr<T>(G), ptr<T>(nl), bc.wneg.data(), bc.nl0.data());
      const int64_t len = st.len, nq = st.nq;
      T* on = st.on;
      scales(st.iv, normalize, st.off, len, s, on);                 // s = inv
      if (has_ds) {                           // the class sums' radial term: inv^3 on (dS_g . x)
        st.dots(gtab, st.u);
        for (int64_t p = 0; p < len; ++p) st.coef[p] += st.u[p] * s[p] * s[p] * s[p] * on[p];
      }
      if (nq > 0) mm_into<T>(D, nq, C, aT, C + 1, st.wn, nq, st.y, nq);   // a^T W at negatives
      bool fenced = false;
      for (int64_t d = 0; d < D; ++d) {
        if (!fast_row(len, aT + d * (C + 1), gtab + d * (C + 1), st.wpos, s, st.gi.data(), C + 1,
                      st.row))
          class_row<T>(len, aT + d * (C + 1), gtab + d * (C + 1), st.wpos, s, st.gc.data(),
                       st.at.data(), st.cls.data(), st.runs, st.row);
        const T* yr = st.y + d * nq;
        for (int64_t j = 0; j < nq; ++j) st.row[st.q[j]] += yr[j];
        const T* xr = st.X + d * st.ld;
        T* o = out + (st.b * D + d) * tl.HW + st.lo;
        if (fms_streamed(o, st.row, xr, st.coef, len)) {
          fenced = true;
          continue;
        }
        for (int64_t p = 0; p < len; ++p) o[p] = st.row[p] - xr[p] * st.coef[p];
      }
      if (fenced) _mm_sfence();                        // the streamed rows visible to readers
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
