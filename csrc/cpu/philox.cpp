// CPU (OpenMP) Philox4x32-10, bit-identical to Triton's tl.randint4x and to
// pixcon.reference.rng.philox4x32 (the torch-integer-op reference).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace pixcon {
namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;

inline void philox_one(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

at::Tensor philox4x32_cpu(const at::Tensor& counters, int64_t seed, int64_t stream) {
  TORCH_CHECK(counters.scalar_type() == at::kLong, "philox4x32: counters must be int64, got ",
              counters.scalar_type());
  auto c = counters.contiguous();
  auto sizes = c.sizes().vec();
  sizes.push_back(4);
  auto out = at::empty(sizes, c.options());
  const int64_t n = c.numel();
  const int64_t* cp = c.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(s & 0xFFFFFFFFu), k1 = static_cast<uint32_t>(s >> 32);
  const uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(stream) & 0xFFFFFFFFu);
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    uint32_t r[4];
    for (int64_t i = begin; i < end; ++i) {
      philox_one(static_cast<uint32_t>(cp[i]), c1, k0, k1, r);
      for (int j = 0; j < 4; ++j) op[4 * i + j] = static_cast<int64_t>(r[j]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pixcon, CPU, m) { m.impl("philox4x32", &philox4x32_cpu); }

}  // namespace pixcon
