// U2PL's queue push on the CPU (op pixcon::bank_push; the same contract as
// pixcon_kernels.bank, plus channels-first maps): keys[slot[c, p]] = rows[p] wherever
// keep[c, p]. Row by row, each row read once and copied to every queue that keeps it, rows
// split over threads in chunks: the slots of one push are distinct, so no two threads write one
// row and the result does not depend on the split. This replaces a compaction (nonzero), a gather
// of the kept rows into a fresh (pairs, D) tensor and an index_put: at U2PL's VOC setting
// 186,000 pairs, 107 ms of the step on this project's 2-core machine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "pool.h"

namespace pixcon {
namespace {

// One float row to its queue slot with non-temporal stores (AVX-512; elsewhere memcpy): the bank
// (665 MB of rows at U2PL's VOC setting) is far larger than the caches and is read back only by
// the next step's sampler, so a plain store's read of each destination line first (its
// read-for-ownership) is wasted traffic. n: a multiple of 16; dst: 64-byte aligned.
__attribute__((target("avx512f"))) void stream_row(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
}

template <typename T>
inline bool streamed(T*, const T*, int64_t) { return false; }
template <>
inline bool streamed<float>(float* dst, const float* src, int64_t n) {
  stream_row(dst, src, n);
  return true;
}

// rows: (P, D), or a dense (B, D, HW) channels-first map (pixel p = b HW + s), read in blocks of
// kPixelBlock pixels transposed into a buffer (pool.h): the caller makes no (P, D) copy of the
// map.
void bank_push_cpu(const at::Tensor& keys, const at::Tensor& rows_in, const at::Tensor& keep_in,
                   const at::Tensor& slot_in) {
  TORCH_CHECK(keys.dim() == 2 && keys.is_contiguous(), "bank_push: keys must be (S, D) contiguous");
  const bool map = rows_in.dim() == 3;
  TORCH_CHECK((rows_in.dim() == 2 || map) && rows_in.size(1) == keys.size(1) &&
                  rows_in.scalar_type() == keys.scalar_type(),
              "bank_push: rows must be (P, D) or (B, D, HW) in keys' dtype");
  const int64_t P = map ? rows_in.size(0) * rows_in.size(2) : rows_in.size(0);
  TORCH_CHECK(keep_in.dim() == 2 && keep_in.size(1) == P && slot_in.sizes() == keep_in.sizes(),
              "bank_push: keep and slot must be (C, P)");
  const int64_t C = keep_in.size(0), S = keys.size(0), D = keys.size(1);
  const int64_t HW = map ? rows_in.size(2) : 1;
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor keep = keep_in.to(at::kBool).contiguous();
  const at::Tensor slot = slot_in.to(at::kLong).contiguous();
  const bool* kp = keep.data_ptr<bool>();
  const int64_t* sp = slot.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "bank_push", [&] {
    const scalar_t* src = rows.data_ptr<scalar_t>();
    scalar_t* dst = keys.data_ptr<scalar_t>();
    const bool stream = std::is_same_v<scalar_t, float> && D % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(dst) % 64 == 0 &&
                        __builtin_cpu_supports("avx512f");
    auto put = [&](int64_t p, const scalar_t* row) {    // row p into every queue keeping it
      for (int64_t c = 0; c < C; ++c) {
        if (!kp[c * P + p]) continue;
        const int64_t s = sp[c * P + p];
        TORCH_CHECK(s >= 0 && s < S, "bank_push: slot ", s, " outside the bank's ", S, " rows");
        if (stream && streamed(dst + s * D, row, D)) continue;
        std::memcpy(dst + s * D, row, D * sizeof(scalar_t));
      }
    };
    if (!map) {
      at::parallel_for(0, P, grain_for(P, C + D), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) put(p, src + p * D);
        _mm_sfence();                       // the streamed rows visible before the region ends
      });
      return;
    }
    const int64_t per_image = (HW + kPixelBlock - 1) / kPixelBlock;
    const int64_t blocks = rows.size(0) * per_image;
    at::parallel_for(0, blocks, grain_for(blocks, kPixelBlock * (C + D)),
                     [&](int64_t k0, int64_t k1) {
      std::vector<scalar_t> buf(kPixelBlock * D);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / per_image, s0 = (k % per_image) * kPixelBlock;
        const int64_t n = std::min(kPixelBlock, HW - s0), p0 = b * HW + s0;
        bool any = false;
        for (int64_t c = 0; c < C && !any; ++c)
          for (int64_t i = 0; i < n; ++i) any |= kp[c * P + p0 + i];
        if (!any) continue;
        pixel_rows_block(src + b * D * HW, HW, D, s0, n, buf.data());
        for (int64_t i = 0; i < n; ++i) put(p0 + i, buf.data() + i * D);
      }
      _mm_sfence();
    });
  });
}

}  // namespace
}  // namespace pixcon

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("bank_push", &pixcon::bank_push_cpu);
}
