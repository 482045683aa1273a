// A pool of D-vectors for pointer arithmetic, as pixcon_kernels._utils.pool_layout: (P, D) rows,
// or a (B, D, h, w) map whose rows are its pixels (made contiguous only if h and w do not merge).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace pixcon {

struct Pool {
  at::Tensor t;
  int64_t P, D, HW, s_b, s_s, s_d;
  explicit Pool(const at::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 || x.dim() == 4, "pool must be (P, D) or (B, D, h, w), got ",
                x.sizes());
    if (x.dim() == 2) {
      t = x;
      P = x.size(0); D = x.size(1); HW = std::max<int64_t>(P, 1);
      s_b = 0; s_s = x.stride(0); s_d = x.stride(1);
    } else {
      const int64_t h = x.size(2), w = x.size(3);
      t = (h > 1 && x.stride(2) != w * x.stride(3)) ? x.contiguous() : x;
      P = x.size(0) * h * w; D = x.size(1); HW = std::max<int64_t>(h * w, 1);
      s_b = t.stride(0); s_s = w > 1 ? t.stride(3) : t.stride(2); s_d = t.stride(1);
    }
  }
  // element offset of row p (its element d is at + d * s_d)
  int64_t row(int64_t p) const { return (p / HW) * s_b + (p % HW) * s_s; }
};

// Pixels read from a dense channels-first image at a time when its rows are wanted: a block's
// D x kPixelBlock values are one cache line per channel.
constexpr int64_t kPixelBlock = 16;

// out[i * D + d] = image[d * HW + s0 + i] for the n <= kPixelBlock pixels from s0 of one dense
// (D, HW) image: its pixels as n contiguous rows.
template <typename T>
inline void pixel_rows_block(const T* image, int64_t HW, int64_t D, int64_t s0, int64_t n,
                             T* out) {
  const T* in = image + s0;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < n; ++i) out[i * D + d] = in[d * HW + i];
}

}  // namespace pixcon
