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
#include <limits>
#include <vector>
#include "memory.h"
#include "parallel.h"

namespace pixcon {
namespace {

constexpr int64_t kInf = std::numeric_limits<int64_t>::max() / 4;

// Lower envelope of parabolas (x - v)^2 + f[v] over sites v in [lo, hi], evaluated at x in
// [xlo, xhi]; sites with f >= kInf are skipped. out[x] receives the minimum. Intersections are
// kept as exact rationals num / den (den > 0) and compared by cross-multiplication in 128 bits:
// no division, no rounding (|num| < 2^63 and den <= 2W for any map that fits in memory).
void envelope(const int64_t* f, int64_t lo, int64_t hi, int64_t xlo, int64_t xhi,
              std::vector<int64_t>& v, std::vector<int64_t>& zn, std::vector<int64_t>& zd,
              int64_t* out) {
  int64_t k = -1;  // envelope sites v[0..k]; parabola k is lowest on (z[k], z[k+1]]
  for (int64_t q = lo; q <= hi; ++q) {
    if (f[q] >= kInf) continue;
    const int64_t hq = f[q] + q * q;
    while (k >= 0) {
      const int64_t p = v[k];
      const int64_t num = hq - (f[p] + p * p), den = 2 * (q - p);   // s = num / den
      // pop while s <= z[k]; z[0] = -inf never pops
      if (k > 0 && static_cast<__int128>(num) * zd[k] <= static_cast<__int128>(zn[k]) * den) {
        --k;
        continue;
      }
      ++k; v[k] = q; zn[k] = num; zd[k] = den;
      break;
    }
    if (k < 0) { k = 0; v[0] = q; }
  }
  if (k < 0) {
    for (int64_t x = xlo; x <= xhi; ++x) out[x] = kInf;
    return;
  }
  int64_t j = 0;
  for (int64_t x = xlo; x <= xhi; ++x) {
    while (j < k && zn[j + 1] < static_cast<__int128>(x) * zd[j + 1]) ++j;     // z[j+1] < x
    const int64_t d = x - v[j];
    out[x] = d * d + f[v[j]];
  }
}

// column distance "no differing pixel in this column": above any distance in a column of fewer
// than kFar rows (checked), and kFar + 1 still fits in int32
constexpr int32_t kFar = std::numeric_limits<int32_t>::max() - 1;

// out: float32 distances, or float64 squared distances (exact integers below 2^53)
template <typename T, typename O>
void edt_impl(const T* lab, int64_t N, int64_t H, int64_t W, T bg, int32_t* gcol, O* out,
              bool squared) {
  // pass 1: columns -> gcol = G (kFar where the column run touches no differing pixel). Two
  // branch-free row-major sweeps over blocks of columns (cache-friendly, vectorisable):
  // up = distance to the nearest differing pixel above, then down, G = min(up, down).
  constexpr int64_t kCols = 512;
  const int64_t nblk = (W + kCols - 1) / kCols;
  const int64_t grain = grain_for(N * nblk, 2 * H * std::min(W, kCols));    // two sweeps per block
  at::parallel_for(0, N * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> below(kCols);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / nblk, x0 = (i % nblk) * kCols, nx = std::min(W, x0 + kCols) - x0;
      const T* L = lab + n * H * W + x0;
      int32_t* G = gcol + n * H * W + x0;
      int32_t* __restrict__ bl = below.data();
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
        if (y < H - 1) {
          const T* __restrict__ lb = l + W;
          for (int64_t x = 0; x < nx; ++x)
            bl[x] = l[x] != lb[x] ? 1 : std::min(bl[x] + 1, kFar);
        }
        for (int64_t x = 0; x < nx; ++x) g[x] = l[x] == bg ? 0 : std::min(g[x], bl[x]);
      }
    }
  });
  // pass 2: rows, run by run. A run [x, e] of one label is bounded by differing pixels at x - 1
  // and e + 1 (cost 0 sites); short runs are solved by brute force, long ones by the envelope.
  at::parallel_for(0, N * H, grain_for(N * H, 4 * W, 16), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> f(W), d2(W), v(W + 2), zn(W + 2), zd(W + 2);
    for (int64_t r = begin; r < end; ++r) {
      const T* L = lab + r * W;
      const int32_t* G = gcol + r * W;
      O* o = out + r * W;
      int64_t x = 0;
      while (x < W) {
        int64_t e = x;
        while (e + 1 < W && L[e + 1] == L[x]) ++e;
        if (L[x] == bg) {
          for (int64_t t = x; t <= e; ++t) d2[t] = 0;
        } else if (e - x < 12) {
          for (int64_t t = x; t <= e; ++t) {
            int64_t best = kInf;
            if (x > 0) best = (t - x + 1) * (t - x + 1);
            if (e + 1 < W) best = std::min(best, (e + 1 - t) * (e + 1 - t));
            for (int64_t u = x; u <= e; ++u) {
              if (G[u] >= kFar) continue;
              const int64_t c = (t - u) * (t - u) + static_cast<int64_t>(G[u]) * G[u];
              best = std::min(best, c);
            }
            d2[t] = best;
          }
        } else {
          const int64_t lo = x > 0 ? x - 1 : x, hi = e + 1 < W ? e + 1 : e;
          for (int64_t t = lo; t <= hi; ++t)
            f[t] = (t < x || t > e) ? 0 : (G[t] >= kFar ? kInf : static_cast<int64_t>(G[t]) * G[t]);
          envelope(f.data(), lo, hi, x, e, v, zn, zd, d2.data());
        }
        x = e + 1;
      }
      const int64_t* __restrict__ dd = d2.data();
      O* __restrict__ oo = o;
      const O inf = std::numeric_limits<O>::infinity();
      if (squared) {
        for (int64_t t = 0; t < W; ++t) oo[t] = dd[t] >= kInf ? inf : static_cast<O>(dd[t]);
      } else {
        for (int64_t t = 0; t < W; ++t)
          oo[t] = dd[t] >= kInf ? inf : std::sqrt(static_cast<float>(dd[t]));
      }
    }
  });
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
  auto g = empty_large({N, H, W}, labels.options().dtype(at::kInt));
  const bool small = labels.scalar_type() != at::kLong ||
                     (background >= INT32_MIN && background <= INT32_MAX &&
                      labels.min().item<int64_t>() >= INT32_MIN &&
                      labels.max().item<int64_t>() <= INT32_MAX);
  auto run = [&](auto* o) {
    if (small) {
      auto lab = labels.to(at::kInt).contiguous();
      edt_impl<int32_t>(lab.data_ptr<int32_t>(), N, H, W, static_cast<int32_t>(background),
                        g.data_ptr<int32_t>(), o, squared);
    } else {
      auto lab = labels.contiguous();
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
