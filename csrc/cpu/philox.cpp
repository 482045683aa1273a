// CPU (OpenMP) Philox4x32-10, bit-identical to Triton's tl.randint4x and to
// pixcon.reference.rng.philox4x32 (the torch-integer-op reference).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "philox.h"
#include "parallel.h"

namespace pixcon {
namespace {

at::Tensor philox4x32_cpu(const at::Tensor& counters, int64_t seed, int64_t stream) {
  TORCH_CHECK(at::isIntegralType(counters.scalar_type(), /*includeBool=*/false),
              "philox: counters must be integers, got ", counters.scalar_type());
  auto c = counters.to(at::kLong).contiguous();   // each counter's low 32 bits are used
  auto sizes = c.sizes().vec();
  sizes.push_back(4);
  auto out = at::empty(sizes, c.options());
  const int64_t n = c.numel();
  const int64_t* cp = c.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  uint32_t k0, k1;
  philox_key(seed, &k0, &k1);
  const uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(stream) & 0xFFFFFFFFu);
  at::parallel_for(0, n, grain_for(n, 64, 4096), [&](int64_t begin, int64_t end) {
    uint32_t r[4];
    for (int64_t i = begin; i < end; ++i) {
      philox4x32_10(static_cast<uint32_t>(cp[i]), c1, k0, k1, r);
      for (int j = 0; j < 4; ++j) op[4 * i + j] = static_cast<int64_t>(r[j]);
    }
  });
  return out;
}

}  // namespace

// The CPU kernel of pixcon::philox (pixcon/ops/_library.py).
TORCH_LIBRARY_IMPL(pixcon, CPU, m) { m.impl("philox", &philox4x32_cpu); }

}  // namespace pixcon
