// CPU samplers on the counter-based generator: the same draws as pixcon_kernels.sampling (Triton)
// and the torch reference samplers in pixcon.ops.primitives, bit for bit, whatever the thread
// count (each draw depends on its counter only).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "philox.h"
#include "parallel.h"

namespace pixcon {
namespace {

constexpr int64_t kGrain = 2048;

at::Tensor as_i64(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

// out[r, k] = order[offsets[g] + uniform(w0, counts[g])], g = row_group[r], counter r*per_row+k;
// -1 where g < 0 or the group is empty.
at::Tensor sample_in_groups_cpu(const at::Tensor& order, const at::Tensor& offsets,
                                const at::Tensor& counts, const at::Tensor& row_group,
                                int64_t per_row, int64_t seed, int64_t stream) {
  auto ord = as_i64(order), off = as_i64(offsets), cnt = as_i64(counts), grp = as_i64(row_group);
  const int64_t R = grp.numel(), total = R * per_row;
  auto out = at::empty({R, per_row}, order.options().dtype(at::kInt));
  const int64_t *o = ord.data_ptr<int64_t>(), *of = off.data_ptr<int64_t>(),
                *n = cnt.data_ptr<int64_t>(), *g = grp.data_ptr<int64_t>();
  int32_t* y = out.data_ptr<int32_t>();
  const DrawStream rng(seed, stream);
  at::parallel_for(0, total, grain_for(total, 64, kGrain), [&](int64_t begin, int64_t end) {
    uint32_t w[4];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t grp_i = g[i / per_row];
      if (grp_i < 0 || n[grp_i] <= 0) { y[i] = -1; continue; }
      rng.draw(i, w);
      y[i] = static_cast<int32_t>(o[of[grp_i] + uniform_index(w[0], n[grp_i])]);
    }
  });
  return out;
}

// Relation-weighted negatives: class j = #{k : cdf[c, k] <= w0} (cdf rows nondecreasing), pixel
// uniform in class j by w1; -1 where the row has no class, j == C or class j is empty.
at::Tensor sample_negatives_cpu(const at::Tensor& row_class, const at::Tensor& cdf,
                                const at::Tensor& order, const at::Tensor& offsets,
                                const at::Tensor& counts, int64_t per_row, int64_t seed,
                                int64_t stream) {
  auto rc = as_i64(row_class), table = as_i64(cdf), ord = as_i64(order), off = as_i64(offsets),
       cnt = as_i64(counts);
  const int64_t C = table.size(0), R = rc.numel(), total = R * per_row;
  auto out = at::empty({R, per_row}, order.options().dtype(at::kInt));
  const int64_t *c = rc.data_ptr<int64_t>(), *t = table.data_ptr<int64_t>(),
                *o = ord.data_ptr<int64_t>(), *of = off.data_ptr<int64_t>(),
                *n = cnt.data_ptr<int64_t>();
  int32_t* y = out.data_ptr<int32_t>();
  const DrawStream rng(seed, stream);
  at::parallel_for(0, total, grain_for(total, 64, kGrain), [&](int64_t begin, int64_t end) {
    uint32_t w[4];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t cls = c[i / per_row];
      if (cls < 0) { y[i] = -1; continue; }
      rng.draw(i, w);
      const int64_t r = static_cast<int64_t>(w[0]);
      const int64_t* row = t + cls * C;
      int64_t lo = 0, hi = C;                       // first k with row[k] > r
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (row[mid] <= r) lo = mid + 1; else hi = mid;
      }
      if (lo >= C || n[lo] <= 0) { y[i] = -1; continue; }
      y[i] = static_cast<int32_t>(o[of[lo] + uniform_index(w[1], n[lo])]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("sample_in_groups", &sample_in_groups_cpu);
  m.impl("sample_negatives", &sample_negatives_cpu);
}

}  // namespace pixcon
