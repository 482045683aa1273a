// ContrastiveSeg's segmentation-aware hard anchors on the CPU (op pixcon::sample_anchors; the
// same samples as its torch form in pixcon/ops/_library.py and as
// pixcon.reference.contrastiveseg.sample_anchors). Per (image, class) pair with more than
// max_views valid pixels ("kept"; T of them, in image-then-class order), n_view = min(M / T,
// max_views) anchors: keep_h hard ones (prediction != label) then n_view - keep_h easy ones,
// each the smallest (Philox key, pixel) of its kind. Slot s = v T + t holds pair t's anchor v.
// The torch form sorts every pixel twice by (pair, kind, key); here each image counts its pairs
// (a table, or sorted distinct labels when labels are large) and keeps, per pair and kind, a
// bounded heap of the n_view smallest: O(P log max_views), images over threads, no sort of P.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "parallel.h"
#include "philox.h"

namespace pixcon {
namespace {

constexpr int64_t kStreamAnchor = 3;                  // pixcon.core.rng.STREAM_ANCHOR
constexpr int64_t kLabelLimit = int64_t{1} << 31;     // pixcon.ops.contrastiveseg.LABEL_LIMIT
constexpr int64_t kTable = int64_t{1} << 16;          // labels below this: a counting table

using Pick = std::pair<uint32_t, int64_t>;            // (key, pixel): a total order

// One image's pairs: its distinct valid labels ascending, and each pixel's pair (-1: invalid).
struct Pairs {
  std::vector<int64_t> label;
  std::vector<int32_t> of;        // pixel -> index into label
};

Pairs image_pairs(const int64_t* g, int64_t n) {
  Pairs out;
  out.of.assign(n, -1);
  int64_t top = -1;
  for (int64_t i = 0; i < n; ++i)
    if (g[i] >= 0 && g[i] < kLabelLimit) top = std::max(top, g[i]);
  if (top < 0) return out;
  if (top < kTable) {
    std::vector<int32_t> id(top + 1, -1);
    for (int64_t i = 0; i < n; ++i)
      if (g[i] >= 0 && g[i] < kLabelLimit) id[g[i]] = 0;
    for (int64_t c = 0; c <= top; ++c)
      if (id[c] == 0) {
        id[c] = static_cast<int32_t>(out.label.size());
        out.label.push_back(c);
      }
    for (int64_t i = 0; i < n; ++i)
      if (g[i] >= 0 && g[i] < kLabelLimit) out.of[i] = id[g[i]];
    return out;
  }
  for (int64_t i = 0; i < n; ++i)
    if (g[i] >= 0 && g[i] < kLabelLimit) out.label.push_back(g[i]);
  std::sort(out.label.begin(), out.label.end());
  out.label.erase(std::unique(out.label.begin(), out.label.end()), out.label.end());
  for (int64_t i = 0; i < n; ++i)
    if (g[i] >= 0 && g[i] < kLabelLimit)
      out.of[i] = static_cast<int32_t>(
          std::lower_bound(out.label.begin(), out.label.end(), g[i]) - out.label.begin());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_anchors_cpu(
    const at::Tensor& gt, const at::Tensor& pred, int64_t max_samples, int64_t max_views,
    int64_t seed) {
  TORCH_CHECK(gt.dim() == 3 && pred.sizes() == gt.sizes(),
              "sample_anchors: gt and pred must be (B, h, w) of one shape");
  const at::Tensor g = gt.to(at::kLong).contiguous(), p = pred.to(at::kLong).contiguous();
  const int64_t B = gt.size(0), P = g.numel(), HW = B > 0 ? P / B : 0, M = max_samples;
  const int64_t* gp = g.data_ptr<int64_t>();
  const int64_t* pp = p.data_ptr<int64_t>();
  const DrawStream rng(seed, kStreamAnchor);
  // per image: its pairs and their (hard, easy) counts
  std::vector<Pairs> pairs(B);
  std::vector<std::vector<int64_t>> hard(B), easy(B);
  at::parallel_for(0, B, grain_for(B, HW), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      pairs[b] = image_pairs(gp + b * HW, HW);
      hard[b].assign(pairs[b].label.size(), 0);
      easy[b].assign(pairs[b].label.size(), 0);
      for (int64_t i = 0; i < HW; ++i) {
        const int32_t k = pairs[b].of[i];
        if (k < 0) continue;
        (pp[b * HW + i] == gp[b * HW + i] ? easy : hard)[b][k] += 1;
      }
    }
  });
  // the kept pairs in (image, class) order: first_t[b], the slot index t of image b's first
  std::vector<int64_t> first_t(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    first_t[b + 1] = first_t[b];
    for (size_t k = 0; k < pairs[b].label.size(); ++k)
      first_t[b + 1] += hard[b][k] + easy[b][k] > max_views;
  }
  const int64_t T = first_t[B];
  const int64_t n_view = std::min(M / std::max<int64_t>(T, 1), max_views);
  auto index = at::full({M}, -1, g.options());
  auto labels = at::full({M}, -1, g.options());
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* lp = labels.data_ptr<int64_t>();
  if (n_view > 0 && T > 0) {          // n_view > 0: T <= M, every kept pair has its slots
    at::parallel_for(0, B, grain_for(B, HW), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const size_t K = pairs[b].label.size();
        std::vector<int64_t> t_of(K, -1), keep_h(K, 0);
        int64_t t = first_t[b];
        for (size_t k = 0; k < K; ++k) {
          const int64_t nh = hard[b][k], ne = easy[b][k];
          if (nh + ne <= max_views) continue;
          t_of[k] = t++;
          const bool h_ok = 2 * nh >= n_view, e_ok = 2 * ne >= n_view;
          keep_h[k] = h_ok && e_ok ? n_view / 2 : (h_ok ? n_view - ne : nh);
        }
        // heaps[2k]: pair k's hard picks, heaps[2k + 1] its easy ones (max-heaps, bounded)
        std::vector<std::vector<Pick>> heaps(2 * K);
        for (int64_t i = 0; i < HW; ++i) {
          const int32_t k = pairs[b].of[i];
          if (k < 0 || t_of[k] < 0) continue;
          const int64_t pix = b * HW + i;
          const bool is_easy = pp[pix] == gp[pix];
          const int64_t cap = is_easy ? n_view - keep_h[k] : keep_h[k];
          if (cap <= 0) continue;
          uint32_t w[4];
          rng.draw(pix, w);
          auto& h = heaps[2 * k + is_easy];
          const Pick c{w[0], pix};
          if (static_cast<int64_t>(h.size()) < cap) {
            h.push_back(c);
            std::push_heap(h.begin(), h.end());
          } else if (c < h.front()) {
            std::pop_heap(h.begin(), h.end());
            h.back() = c;
            std::push_heap(h.begin(), h.end());
          }
        }
        for (size_t k = 0; k < K; ++k) {
          if (t_of[k] < 0) continue;
          int64_t v = 0;
          for (int e = 0; e < 2; ++e) {
            auto& h = heaps[2 * k + e];
            std::sort_heap(h.begin(), h.end());
            for (const Pick& c : h) {
              ip[v * T + t_of[k]] = c.second;
              lp[v * T + t_of[k]] = gp[c.second];
              ++v;
            }
          }
        }
      }
    });
  }
  return {index, labels, at::scalar_tensor(T, g.options()), at::scalar_tensor(n_view, g.options())};
}

}  // namespace
}  // namespace pixcon

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("sample_anchors", &pixcon::sample_anchors_cpu);
}
