// Exact Euclidean distance transform on the CPU (OpenMP), binary and multi-label, batched.
//
// For labels L and a background value b: D(p) = 0 where L(p) == b, else the distance from p to
// the nearest pixel q with L(q) != L(p) (so a binary mask with b = 0 gives SciPy's
// distance_transform_edt). Separable and exact in integer squared distances:
//   pass 1 (columns): G(x, y) = distance along the column to the nearest differing label;
//   pass 2 (rows): D^2(x) = min over x' of (x - x')^2 + [L(x') == L(x)] G(x')^2, evaluated run by
//   run with the Felzenszwalb-Huttenlocher lower envelope (O(W) per row); the pixels just outside
//   a run differ from it and enter as sites with cost 0.
// No differing pixel anywhere -> +inf (SciPy measures to a phantom pixel there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#include "memory.h"
#include "parallel.h"

namespace pixcon {
namespace {

// "no site": a quarter of the scratch type's range, so sums of two stay in it
template <typename I>
constexpr I kInf = std::numeric_limits<I>::max() / 4;
constexpr int64_t kNarrow = int64_t{1} << 14;    // sides below this: 32-bit scratch, 64-bit products
constexpr int64_t kBrute = 32;    // runs shorter than this: all sites, no envelope

// Lower envelope of parabolas (x - v)^2 + f[v] over sites v in [lo, hi], evaluated at x in
// [xlo, xhi]; sites with f >= kInf are skipped. out[x] receives the minimum. Intersections are
// kept as exact rationals num / den (den > 0) and compared by cross-multiplication: no division,
// no rounding. I: the scratch's type, M: the products'. Any map that fits in memory: I 64 bits,
// M 128 (|num| < 2^63, den <= 2W). Sides below kNarrow: I 32 bits (f < 2^28, hv < 2^29, den <
// 2^15, distances below kInf<int32_t> = 2^29 - 1) and M 64 (every product below 2^44): half the
// scratch's bytes, and 64-bit products were a third of the row pass's time against 128.
template <typename I, typename M>
void envelope(const I* __restrict__ f, int64_t lo, int64_t hi, int64_t xlo, int64_t xhi,
              I* __restrict__ v, I* __restrict__ hv, I* __restrict__ zn, I* __restrict__ zd,
              I* __restrict__ out) {
  int64_t k = -1;  // envelope sites v[0..k] (hv = f[v] + v^2); parabola k lowest on (z[k], z[k+1]]
  for (int64_t q = lo; q <= hi; ++q) {
    if (f[q] >= kInf<I>) continue;
    const I hq = f[q] + static_cast<I>(q * q);
    if (k < 0) {
      k = 0; v[0] = static_cast<I>(q); hv[0] = hq;
      continue;
    }
    I num, den;                           // s = num / den, where parabolas k and q meet
    for (;;) {                            // pop while s <= z[k]; z[0] = -inf never pops
      num = hq - hv[k];
      den = static_cast<I>(2 * (q - v[k]));
      if (k == 0 || static_cast<M>(num) * zd[k] > static_cast<M>(zn[k]) * den) break;
      --k;
    }
    ++k; v[k] = static_cast<I>(q); hv[k] = hq; zn[k] = num; zd[k] = den;
  }
  if (k < 0) {
    for (int64_t x = xlo; x <= xhi; ++x) out[x] = kInf<I>;
    return;
  }
  int64_t j = 0;
  for (int64_t x = xlo; x <= xhi; ++x) {
    while (j < k && zn[j + 1] < static_cast<M>(x) * zd[j + 1]) ++j;     // z[j+1] < x
    const I d = static_cast<I>(x - v[j]);
    out[x] = d * d + f[v[j]];
  }
}

// column distance "no differing pixel in this column": above any distance in a column of fewer
// than kFar rows (checked), and kFar + 1 still fits in int32
constexpr int32_t kFar = std::numeric_limits<int32_t>::max() - 1;

// Pass 1 on a block of nx columns (row stride W): G = distance along the column to the nearest
// differing pixel (kFar where the column run touches none), 0 on the background. Two branch-free
// row-major sweeps (cache-friendly, vector loops): up = distance to the nearest differing pixel
// above, then down, G = min(up, down). bl: nx ints of scratch.
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void column_block(const T* L, int32_t* G, int64_t H, int64_t W, int64_t nx, T bg, int32_t* bl) {
  for (int64_t x = 0; x < nx; ++x) G[x] = kFar;
  for (int64_t y = 1; y < H; ++y) {   // restrict: labels and G never alias (vectorises)
    const T* __restrict__ l = L + y * W;
    const T* __restrict__ la = l - W;
    int32_t* __restrict__ g = G + y * W;
    const int32_t* __restrict__ ga = g - W;
    for (int64_t x = 0; x < nx; ++x)
      g[x] = l[x] != la[x] ? 1 : std::min(ga[x] + 1, kFar);
  }
  for (int64_t x = 0; x < nx; ++x) bl[x] = kFar;
  for (int64_t y = H - 1; y >= 0; --y) {
    const T* __restrict__ l = L + y * W;
    int32_t* __restrict__ g = G + y * W;
    int32_t* __restrict__ b = bl;
    if (y < H - 1) {
      const T* __restrict__ lb = l + W;
      for (int64_t x = 0; x < nx; ++x)
        b[x] = l[x] != lb[x] ? 1 : std::min(b[x] + 1, kFar);
    }
    for (int64_t x = 0; x < nx; ++x) g[x] = l[x] == bg ? 0 : std::min(g[x], b[x]);
  }
}

// Pass 2 on one row, run by run. A run [x, e] of one label is bounded by differing pixels at
// x - 1 and e + 1 (cost 0 sites); short runs are solved by brute force, long ones by the
// envelope. f, d2, v, hv, zn, zd: scratch of W (+ 2) entries; cut: W + 1 bytes, 1 where a
// run ends (one vector pass, then memchr finds each run's end).
// G may be the same memory as o (float32 outputs): it is copied to gr (W ints of scratch) with
// memcpy, whose byte reads the compiler keeps ahead of the row's float stores.
template <typename T, typename O, typename I, typename M>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void row_pass(const T* L, const int32_t* G_in, O* o, int64_t W, T bg, bool squared, I* f, I* d2,
              I* v, I* hv, I* zn, I* zd, uint8_t* __restrict__ cut, int32_t* __restrict__ gr) {
  constexpr I inf_site = kInf<I>;
  std::memcpy(gr, G_in, W * sizeof(int32_t));
  const int32_t* G = gr;
  for (int64_t t = 0; t + 1 < W; ++t) cut[t] = L[t] != L[t + 1];
  cut[W - 1] = 1;
  int64_t x = 0;
  while (x < W) {
    const int64_t e = static_cast<const uint8_t*>(std::memchr(cut + x, 1, W - x)) - cut;
    if (L[x] == bg) {
      for (int64_t t = x; t <= e; ++t) d2[t] = 0;
    } else {
      // the run's sites and the differing pixels just outside it (cost 0)
      const int64_t lo = x > 0 ? x - 1 : x, hi = e + 1 < W ? e + 1 : e;
      for (int64_t t = lo; t <= hi; ++t)
        f[t] = (t < x || t > e) ? 0 : (G[t] >= kFar ? inf_site : static_cast<I>(G[t]) * G[t]);
      if (e - x < kBrute) {            // short runs: every site, a branch-free vector loop
        for (int64_t t = x; t <= e; ++t) {
          I best = inf_site;
          for (int64_t u = lo; u <= hi; ++u)
            best = std::min(best, static_cast<I>((t - u) * (t - u)) + f[u]);
          d2[t] = best;
        }
      } else {
        envelope<I, M>(f, lo, hi, x, e, v, hv, zn, zd, d2);
      }
    }
    x = e + 1;
  }
  const O inf = std::numeric_limits<O>::infinity();
  if (squared) {
    for (int64_t t = 0; t < W; ++t) o[t] = d2[t] >= inf_site ? inf : static_cast<O>(d2[t]);
  } else {        // two loops: GCC vectorises neither a sqrt under a condition nor a scalar one
    for (int64_t t = 0; t < W; ++t) o[t] = std::sqrt(static_cast<float>(d2[t]));
    for (int64_t t = 0; t < W; ++t) o[t] = d2[t] >= inf_site ? inf : o[t];
  }
}

// out: float32 distances, or float64 squared distances (exact integers below 2^53); gcol may be
// out's own memory for float32 (see transform)
template <typename T, typename O>
void edt_impl(const T* lab, int64_t N, int64_t H, int64_t W, T bg, int32_t* gcol, O* out,
              bool squared) {
  // pass 1: columns, in blocks of kCols (two sweeps per block)
  constexpr int64_t kCols = 512;
  const int64_t nblk = (W + kCols - 1) / kCols;
  const int64_t grain = grain_for(N * nblk, 2 * H * std::min(W, kCols));    // two sweeps per block
  at::parallel_for(0, N * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> below(kCols);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / nblk, x0 = (i % nblk) * kCols, nx = std::min(W, x0 + kCols) - x0;
      column_block<T>(lab + n * H * W + x0, gcol + n * H * W + x0, H, W, nx, bg, below.data());
    }
  });
  // pass 2: rows (32-bit scratch and 64-bit products below kNarrow: see envelope)
  auto rows = [&](auto zero, auto product) {
    using I = decltype(zero);
    using M = decltype(product);
    at::parallel_for(0, N * H, grain_for(N * H, 4 * W, 16), [&](int64_t begin, int64_t end) {
      std::vector<I> f(W), d2(W), v(W + 2), hv(W + 2), zn(W + 2), zd(W + 2);
      std::vector<uint8_t> cut(W + 1);
      std::vector<int32_t> gr(W);
      for (int64_t r = begin; r < end; ++r)
        row_pass<T, O, I, M>(lab + r * W, gcol + r * W, out + r * W, W, bg, squared, f.data(),
                             d2.data(), v.data(), hv.data(), zn.data(), zd.data(), cut.data(),
                             gr.data());
    });
  };
  if (H < kNarrow && W < kNarrow) rows(int32_t{0}, int64_t{0});
  else rows(int64_t{0}, __int128{0});
}

// exact: squared distances in float64 (exact integers below 2^53); else float32 distances or
// squared distances (exact below 2^24: the losses' feature maps)
at::Tensor transform(const at::Tensor& labels, int64_t background, bool squared, bool exact) {
  TORCH_CHECK(labels.dim() >= 2, "distance_transform: expected (..., H, W), got ", labels.sizes());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/true),
              "distance_transform: labels must be bool or integer, got ", labels.scalar_type());
  const int64_t H = labels.size(-2), W = labels.size(-1);
  TORCH_CHECK(H < kFar, "distance_transform: maps up to ", kFar - 1, " rows (int32 column "
              "distances), got ", H);
  TORCH_CHECK(!exact || std::max(H, W) <= (int64_t{1} << 26),
              "distance_transform: squared distances are float64, exact below 2^53: sides up "
              "to 2^26 with squared=True, got ", H, " x ", W);
  const int64_t N = H * W == 0 ? 0 : labels.numel() / (H * W);
  auto out = empty_large(labels.sizes(), labels.options().dtype(exact ? at::kDouble : at::kFloat));
  if (N == 0) return out;
  // The column distances G (int32) live in the float32 output itself: a row's G is read (into
  // the envelope's sites) before that row's distances are written over it, and rows never read
  // each other's G. A separate G was a second fresh image-sized block per call, and the kernel
  // zeroing its pages was a fifth of the time at 8 x 1024 x 2048. Float64 outputs (twice as
  // wide: row r would overwrite rows 2r and 2r + 1 of G) keep their own.
  auto g = exact ? empty_large({N, H, W}, labels.options().dtype(at::kInt))
                 : out.view(at::kInt);
  // bytes (binary masks) as they are; other labels as int32 where they and the background fit,
  // else int64 (a background outside int32 is compared in int64: no truncation)
  const auto st = labels.scalar_type();
  const bool bytes = (st == at::kByte || st == at::kBool) && background >= 0 && background <= 255;
  const bool small = background >= INT32_MIN && background <= INT32_MAX &&
                     (st != at::kLong || (labels.min().item<int64_t>() >= INT32_MIN &&
                                          labels.max().item<int64_t>() <= INT32_MAX));
  auto run = [&](auto* o) {
    if (bytes) {
      auto lab = labels.contiguous();
      edt_impl<uint8_t>(static_cast<const uint8_t*>(lab.data_ptr()), N, H, W,
                        static_cast<uint8_t>(background), g.data_ptr<int32_t>(), o, squared);
    } else if (small) {
      auto lab = labels.to(at::kInt).contiguous();
      edt_impl<int32_t>(lab.data_ptr<int32_t>(), N, H, W, static_cast<int32_t>(background),
                        g.data_ptr<int32_t>(), o, squared);
    } else {
      auto lab = labels.to(at::kLong).contiguous();
      edt_impl<int64_t>(lab.data_ptr<int64_t>(), N, H, W, background, g.data_ptr<int32_t>(), o,
                        squared);
    }
  };
  if (exact) run(out.data_ptr<double>());
  else run(out.data_ptr<float>());
  return out;
}

// op pixcon::edt: float32 (distances, or squared distances exact below 2^24)
at::Tensor distance_transform_cpu(const at::Tensor& labels, int64_t background, bool squared) {
  return transform(labels, background, squared, false);
}

// op pixcon::edt_exact: float64 squared distances, exact for every map that fits the guard
at::Tensor distance_transform_exact_cpu(const at::Tensor& labels, int64_t background) {
  return transform(labels, background, true, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("edt", &distance_transform_cpu);
  m.impl("edt_exact", &distance_transform_exact_cpu);
}

}  // namespace pixcon
