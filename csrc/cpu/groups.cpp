// U2PL's per-pixel class ranks and the grouping of a (pixels x classes) mask by class, on the
// CPU (ops pixcon::class_ranks and pixcon::group_columns; their CUDA kernels are the torch forms
// in pixcon.core.u2pl, which the reference uses). In torch the ranks are a sort of every pixel's
// C probabilities and the grouping a cumsum and a scatter over all C x P pairs: 16 and 12 ms of
// U2PL's VOC step on this project's 2-core machine, for what is one pass over the pixels each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <numeric>
#include <vector>

#include "parallel.h"

namespace pixcon {
namespace {

// x before y in a descending sort: larger, NaN largest (torch.sort's order); equal keeps
// class order (the sort is stable)
template <typename T>
inline bool before(T x, T y) {
  return (x != x && y == y) || x > y;
}

constexpr int64_t kCounted = 64;    // classes up to this: ranks by counting (C^2 compares, no branch)

// An unsigned key in the order of before(): larger values get larger keys, every NaN the
// largest (one key: NaNs tie, so keep class order).
inline uint32_t order_key(float x) {
  if (x != x) return ~uint32_t{0};
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  if (b == 0x80000000u) b = 0;                     // -0 ties with +0, as in a sort
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline uint64_t order_key(double x) {
  if (x != x) return ~uint64_t{0};
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  if (b == 0x8000000000000000ull) b = 0;
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

// ranks from the C keys of one pixel: class c's rank is the number of classes before it (a
// larger key, or an equal one at a lower index). Branch-free loops the compiler runs in vector
// lanes: a sort of 21 values mispredicts about half its compares (13 ms for U2PL's 66,564
// pixels at 2 threads).
template <typename K>
__attribute__((target_clones("avx512f", "avx2", "default")))
void ranks_by_count(const K* __restrict__ u, int64_t C, int64_t* __restrict__ out) {
  for (int64_t c = 0; c < C; ++c) {
    const K x = u[c];
    int64_t k = 0;
    for (int64_t c2 = 0; c2 < c; ++c2) k += u[c2] >= x;
    for (int64_t c2 = c + 1; c2 < C; ++c2) k += u[c2] > x;
    out[c] = k;
  }
}

// (P, C) int64: the position of each class in its pixel's descending order of prob (P, C), ties
// in class order.
at::Tensor class_ranks_cpu(const at::Tensor& prob_in) {
  TORCH_CHECK(prob_in.dim() == 2, "class_ranks: prob must be (P, C), got ", prob_in.sizes());
  const at::Tensor prob = prob_in.contiguous();
  const int64_t P = prob.size(0), C = prob.size(1);
  at::Tensor out = at::empty({P, C}, prob.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.scalar_type(), "class_ranks", [&] {
    const scalar_t* pr = prob.data_ptr<scalar_t>();
    using A = at::opmath_type<scalar_t>;                    // float, or double
    using K = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
    at::parallel_for(0, P, grain_for(P, C * std::min(C, kCounted)), [&](int64_t p0, int64_t p1) {
      if (C <= kCounted) {
        std::vector<K> u(C);
        for (int64_t p = p0; p < p1; ++p) {
          for (int64_t c = 0; c < C; ++c) u[c] = order_key(static_cast<A>(pr[p * C + c]));
          ranks_by_count(u.data(), C, o + p * C);
        }
        return;
      }
      std::vector<int64_t> idx(C);
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* r = pr + p * C;
        std::iota(idx.begin(), idx.end(), int64_t{0});
        std::stable_sort(idx.begin(), idx.end(),
                         [&](int64_t a, int64_t b) { return before(r[a], r[b]); });
        for (int64_t i = 0; i < C; ++i) o[p * C + idx[i]] = i;
      }
    });
  });
  return out;
}

// (order (C P,), offsets (C,), counts (C,)) int64 of a (P, C) bool mask: column c's kept rows p
// ascending at order[offsets[c] : offsets[c] + counts[c]]; after all kept pairs, the others in
// column-major order (the torch form's permutation, bit for bit).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_columns_cpu(const at::Tensor& mask_in) {
  TORCH_CHECK(mask_in.dim() == 2, "group_columns: mask must be (P, C), got ", mask_in.sizes());
  const at::Tensor mask = mask_in.to(at::kBool).contiguous();
  const int64_t P = mask.size(0), C = mask.size(1);
  const auto opt = mask.options().dtype(at::kLong);
  at::Tensor counts = at::zeros({C}, opt), offsets = at::empty({C}, opt);
  at::Tensor order = at::empty({C * P}, opt);
  const bool* m = mask.data_ptr<bool>();
  int64_t *cnt = counts.data_ptr<int64_t>(), *off = offsets.data_ptr<int64_t>();
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < C; ++c) cnt[c] += m[p * C + c];
  int64_t total = 0;
  for (int64_t c = 0; c < C; ++c) {
    off[c] = total;
    total += cnt[c];
  }
  at::parallel_for(0, C, grain_for(C, P), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t kept = off[c], rest = total + c * P - off[c];   // the others before column c
      for (int64_t p = 0; p < P; ++p) o[m[p * C + c] ? kept++ : rest++] = p;
    }
  });
  return {order, offsets, counts};
}

}  // namespace
}  // namespace pixcon

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("class_ranks", &pixcon::class_ranks_cpu);
  m.impl("group_columns", &pixcon::group_columns_cpu);
}
