// Rows added into a zero map (op pixcon::scatter_rows, CPU kernel): out = zeros shaped and
// strided like `like` (B, D, h, w), out[b, :, y, x] += rows[m] for every m with index[m] =
// (b h + y) w + x >= 0. The backward of every gather of pixel rows (ReCo's queries,
// ContrastiveSeg's anchors). Row by row, a channels-first map takes each row's D values h*w
// floats apart (a cache miss each: 51 ms for 8192 rows of 256 on this project's CPU); here the
// rows are visited in pixel order within each channel plane, planes split over threads (no two
// threads write one element; duplicates add in pixel-then-row order: the same bits on any
// thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "items.h"
#include "memory.h"
#include "parallel.h"

namespace pixcon {
namespace {

at::Tensor scatter_rows_cpu(const at::Tensor& rows_in, const at::Tensor& index_in,
                            const at::Tensor& like) {
  TORCH_CHECK(like.dim() == 4, "scatter_rows: like must be (B, D, h, w), got ", like.sizes());
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.size(1) == like.size(1) &&
                  index_in.dim() == 1 && index_in.size(0) == rows_in.size(0),
              "scatter_rows: rows must be (M, D) with one index per row");
  const int64_t M = rows_in.size(0), D = like.size(1), h = like.size(2), w = like.size(3);
  const int64_t P = like.size(0) * h * w;
  auto out = on_huge_pages(at::empty_like(like, like.options().dtype(rows_in.scalar_type())));
  TORCH_CHECK(out.is_non_overlapping_and_dense(), "scatter_rows: like must be dense");
  zero_fill(out);
  const at::Tensor rows = rows_in.t().contiguous();                 // (D, M): planes read in order
  const at::Tensor idx = index_in.to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> order;                                       // valid rows in pixel order
  order.reserve(M);
  for (int64_t m = 0; m < M; ++m)
    if (ip[m] >= 0 && ip[m] < P) order.push_back(m);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ip[a] < ip[b]; });
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<int64_t> off(n);                                      // element offset of each pixel
  const int64_t s0 = out.stride(0), s1 = out.stride(1), s2 = out.stride(2), s3 = out.stride(3);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = ip[order[j]], b = p / (h * w), y = (p / w) % h, x = p % w;
    off[j] = b * s0 + y * s2 + x * s3;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* r = rows.data_ptr<scalar_t>();
    // one thread below tiled_threads' work rule (2^27 adds): a parallel region on a loaded
    // machine can wait a scheduler tick, longer than these adds take
    const int64_t grain = tiled_threads(n * D, D) > 1 ? grain_for(D, std::max<int64_t>(n, 1)) : D;
    at::parallel_for(0, D, grain, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) {
        scalar_t* plane = o + d * s1;
        const scalar_t* src = r + d * M;
        for (int64_t j = 0; j < n; ++j) plane[off[j]] += src[order[j]];
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace pixcon

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("scatter_rows", &pixcon::scatter_rows_cpu);
}
