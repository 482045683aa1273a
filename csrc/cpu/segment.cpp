// Class sums and counts of pixel vectors on the CPU: deterministic and independent of the thread
// count (each task owns a block of channels and adds the pixels in index order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "pool.h"
#include "parallel.h"

namespace pixcon {
namespace {

std::tuple<at::Tensor, at::Tensor> class_sums_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                  int64_t num_classes) {
  const Pool pool(x);
  const int64_t C = num_classes, P = pool.P, D = pool.D;
  TORCH_CHECK(labels.numel() == P, "class_sums: labels must have one entry per row (", P, ")");
  auto lab = labels.to(at::kLong).contiguous();
  const int64_t* l = lab.data_ptr<int64_t>();
  auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::zeros({C, D}, x.options().dtype(acc_type));
  auto counts = at::zeros({C}, x.options().dtype(at::kLong));
  int64_t* n = counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    if (l[p] >= 0 && l[p] < C) ++n[l[p]];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = pool.t.data_ptr<scalar_t>();
    acc_t* s = sums.data_ptr<acc_t>();
    constexpr int64_t kBlock = 16;                 // channels per task
    const int64_t blocks = (D + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, grain_for(blocks, P * kBlock), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t d0 = b * kBlock, d1 = std::min(D, d0 + kBlock);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t c = l[p];
          if (c < 0 || c >= C) continue;
          const scalar_t* row = xp + pool.row(p);
          acc_t* out = s + c * D;
          for (int64_t d = d0; d < d1; ++d) out[d] += static_cast<acc_t>(row[d * pool.s_d]);
        }
      }
    });
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(pixcon, CPU, m) { m.impl("class_sums", &class_sums_cpu); }

}  // namespace pixcon
